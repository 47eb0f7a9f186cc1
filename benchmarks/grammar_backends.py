"""Grammar backends side by side, as `fcd serve` runs them: `--grammar-backend outlines` against
`--grammar-backend llguidance`.

For every unique tool set of the chosen BFCL categories (`tool_choice` auto, parallel calls, SmolLM2's
vocabulary with the FC token):
- compile: `compile_grammar` with each backend plus the first grammar mask (llguidance builds lazily,
  so its first mask is part of what a new tool set costs). Times are the compiling thread's CPU time
  (`time.thread_time`), which another busy process does not inflate much;
- along the item's canonical answer (its FC payload, tokenized), through `SequenceConstraint` with
  max_tokens 512 (what `fcd eval run` sends) and the loop guard: each step's mask time, whether the
  llguidance mask is within the outlines one and allows the answer's token, and whether the outlines
  Index had to be compiled for it (the budget or the loop guard could bind);
- `close_bound` (the llguidance side's threshold) against the largest distance of any Index state.

    .venv/bin/python benchmarks/grammar_backends.py [--categories simple_python,multiple,live_multiple]
        [--limit N] [--out benchmarks/results/grammar_backends.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_TOKENS = 512


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    return {"p50": round(pct(xs, 0.5), 3), "p95": round(pct(xs, 0.95), 3), "max": round(max(xs), 3),
            "mean": round(statistics.mean(xs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", default="simple_python,multiple,live_multiple")
    ap.add_argument("--limit", type=int, default=None, help="tool sets per category (default: every unique set)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grammar_backends.json")
    args = ap.parse_args()
    import llguidance
    import numpy as np
    import outlines_core
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import canonical_calls, load_category
    from fcdistill.grammars import LoopGuard, SequenceConstraint, compile_grammar, token_vocabulary
    from fcdistill.grammars import constraint as _constraint
    from fcdistill.grammars.closing import UNREACHABLE
    from fcdistill.grammars.llguidance_masks import ll_tokenizer
    from fcdistill.models import ensure_fc_token, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ensure_fc_token(tok, "<tool_call>")
    vocab = token_vocabulary(tok, "<tool_call>")
    fmt = ChatFormat(tok)
    t0 = time.thread_time()
    ll_tokenizer(vocab)
    ll_tokenizer_ms = (time.thread_time() - t0) * 1000

    def first_mask(grammar: Any) -> SequenceConstraint:
        c = SequenceConstraint(grammar)
        c.advance(vocab.fc_id)  # into the calls
        c.mask_(torch.zeros(vocab.size))
        return c

    report: dict[str, Any] = {}
    for category in args.categories.split(","):
        records, _ = load_category(category)
        unique: dict[str, Any] = {}
        for r in records:
            unique.setdefault(json.dumps([t.model_dump() for t in r.tools], sort_keys=True), r)
        items = list(unique.values())[: args.limit or None]
        compile_ms: dict[str, list[float]] = {"outlines": [], "llguidance": []}
        mask_us: dict[str, list[float]] = {"outlines": [], "llguidance": []}
        slack: list[float] = []
        steps = same = outside = index_needed = 0
        failures: list[str] = []
        for rec in tqdm(items, desc=category, unit="set"):
            grammars = {}
            try:
                for backend in ("outlines", "llguidance"):
                    _constraint._cache.clear()
                    t0 = time.thread_time()
                    grammars[backend], _ = compile_grammar(vocab, rec.tools, "auto", True, backend=backend)
                    first_mask(grammars[backend])
                    compile_ms[backend].append((time.thread_time() - t0) * 1000)
            except ValueError as exc:
                failures.append(f"{rec.id}: {exc}"[:300])
                continue
            outl, llg = grammars["outlines"], grammars["llguidance"]
            if llg.close_bound is not None:
                slack.append(llg.close_bound / max(d for d in outl.table.dist.values() if d < UNREACHABLE))
            calls = rec.ground_truth or canonical_calls(rec.possible_answer or [], "python", None)
            if not calls:
                continue
            ids = tok.encode(fmt.render_target(None, calls), add_special_tokens=False)
            cs = {b: SequenceConstraint(g, MAX_TOKENS, LoopGuard()) for b, g in grammars.items()}
            for token in ids:
                rows = {}
                for backend, c in cs.items():
                    row = torch.zeros(vocab.size)
                    t0 = time.perf_counter()
                    c.mask_(row)
                    mask_us[backend].append((time.perf_counter() - t0) * 1e6)
                    rows[backend] = torch.isfinite(row).numpy()
                a, b = rows["outlines"], rows["llguidance"]
                steps += 1
                same += bool(np.array_equal(a, b))
                outside += bool((b & ~a).any())
                if not (a[token] and b[token]):
                    failures.append(f"{rec.id}: answer token {tok.convert_ids_to_tokens(token)!r} refused "
                                    f"(outlines {bool(a[token])}, llguidance {bool(b[token])})")
                    break
                if token == vocab.eot_id:
                    break
                for c in cs.values():
                    c.advance(token)
            index_needed += cs["llguidance"].matcher is None and cs["llguidance"].phase != "text"
        report[category] = {
            "tool_sets": len(items), "failed": len(failures), "failures": failures[:10],
            "compile_and_first_mask_ms": {k: summary(v) for k, v in compile_ms.items()},
            "mask_us_per_token": {k: summary(v) for k, v in mask_us.items()},
            "steps_compared": steps, "steps_same_mask": same, "steps_llguidance_outside_outlines": outside,
            "answers_that_needed_the_index_under_llguidance": index_needed,
            "close_bound_over_largest_distance": summary(slack),
        }
        print(json.dumps({category: {k: v for k, v in report[category].items() if k != "failures"}}), flush=True)
    result = {"benchmark": "grammar_backends", "tokenizer": "smollm2-135m + <tool_call>", "vocab": vocab.size,
              "max_tokens": MAX_TOKENS, "outlines_core": getattr(outlines_core, "__version__", "?"),
              "llguidance": getattr(llguidance, "__version__", "?"), "llguidance_tokenizer_ms": round(ll_tokenizer_ms, 1),
              "timing": "thread CPU time (compile); wall time per mask", "load_average": os.getloadavg(),
              "machine": platform.processor() or platform.machine(), "categories": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
