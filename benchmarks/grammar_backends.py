"""Grammar backends side by side: outlines-core (what `fcd serve` uses) against llguidance.

For every unique tool set of the chosen BFCL categories, the same call schema (`calls_schema` after
`compilable_schema`, objects closed as the outlines regex closes them) is compiled by each backend over
SmolLM2's vocabulary with the FC token:
- outlines-core: `compile_grammar` as the server runs it (regex, Index, and the close table the budget
  guarantee needs), and the Index alone;
- llguidance: `LLMatcher` built from the JSON schema, plus its first mask (llguidance builds lazily, so
  the first mask is part of what a new tool set costs).
Times are the compiling thread's CPU time (`time.thread_time`), which another busy process does not
inflate much. Then, along each item's canonical answer (its FC payload, tokenized), the per-token mask
time of each backend and whether the two allow the same tokens at every step.

  .venv/bin/python benchmarks/grammar_backends.py [--categories simple_python,multiple,live_multiple]
      [--limit N] [--out benchmarks/results/grammar_backends.json]

llguidance is not a dependency of fcdistill: `pip install llguidance` into .venv first (vLLM's
environment has it).
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
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise SystemExit("error: llguidance is not installed here; `pip install llguidance` into this environment")
    import numpy as np
    import outlines_core
    import torch
    from outlines_core import Guide
    from outlines_core.kernels.torch import fill_next_token_bitmask as outlines_fill
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import canonical_calls, load_category
    from fcdistill.grammars import compile_grammar, token_vocabulary
    from fcdistill.grammars import constraint as _constraint
    from fcdistill.grammars.constraint import _compile_index, calls_schema, compilable_schema
    from fcdistill.models import ensure_fc_token, resolve_model
    from fcdistill.tools import closed_schema

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ensure_fc_token(tok, "<tool_call>")
    vocab = token_vocabulary(tok, "<tool_call>")
    fmt = ChatFormat(tok)
    t0 = time.thread_time()
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab.size)
    ll_tokenizer_ms = (time.thread_time() - t0) * 1000
    words = (vocab.size + 31) // 32

    report: dict[str, Any] = {}
    for category in args.categories.split(","):
        records, _ = load_category(category)
        unique: dict[str, Any] = {}
        for r in records:
            unique.setdefault(json.dumps([t.model_dump() for t in r.tools], sort_keys=True), r)
        items = list(unique.values())[: args.limit or None]
        full_ms, index_ms, ll_ms, ll_first_mask_ms = [], [], [], []
        mask_us = {"outlines": [], "llguidance": []}
        agree_steps = steps = 0
        disagreements: list[dict[str, Any]] = []
        failures: list[str] = []
        for rec in tqdm(items, desc=category, unit="set"):
            schema = compilable_schema(calls_schema(rec.tools))
            t0 = time.thread_time()
            try:
                grammar, _ = compile_grammar(vocab, rec.tools, "auto", True)
            except ValueError as exc:
                failures.append(f"outlines {[t.name for t in rec.tools]}: {exc}"[:300])
                continue
            full_ms.append((time.thread_time() - t0) * 1000)
            _constraint._cache.clear()
            t0 = time.thread_time()
            _compile_index(calls_schema(rec.tools), vocab)
            index_ms.append((time.thread_time() - t0) * 1000)

            t0 = time.thread_time()
            grm = llguidance.LLMatcher.grammar_from_json_schema(closed_schema(schema),
                                                               defaults={"whitespace_flexible": False})
            matcher = llguidance.LLMatcher(ll_tok, grm, log_level=0)
            ll_mask = llguidance.torch.allocate_token_bitmask(1, ll_tok.vocab_size)
            built = time.thread_time()
            llguidance.torch.fill_next_token_bitmask(matcher, ll_mask, 0)
            done = time.thread_time()
            if matcher.is_error():
                failures.append(f"llguidance {[t.name for t in rec.tools]}: {matcher.get_error()}"[:300])
                continue
            ll_ms.append((done - t0) * 1000)
            ll_first_mask_ms.append((done - built) * 1000)

            # along the canonical answer: both masks at every step, and the time each takes
            calls = rec.ground_truth or canonical_calls(rec.possible_answer or [], "python", None)
            if not calls:
                continue
            payload = fmt.render_target(None, calls)  # FC token, the JSON list, end-of-turn
            ids = tok.encode(payload, add_special_tokens=False)
            ids = [i for i in ids if i not in (vocab.fc_id, vocab.eot_id)]
            guide = Guide(grammar.index)
            o_mask = torch.zeros((1, words), dtype=torch.int32)
            matcher.reset()
            for token in ids:
                t0 = time.perf_counter()
                outlines_fill(guide, o_mask)
                t1 = time.perf_counter()
                llguidance.torch.fill_next_token_bitmask(matcher, ll_mask, 0)
                t2 = time.perf_counter()
                mask_us["outlines"].append((t1 - t0) * 1e6)
                mask_us["llguidance"].append((t2 - t1) * 1e6)
                a = np.unpackbits(o_mask.numpy().view(np.uint8), bitorder="little")[: vocab.size]
                b = np.unpackbits(ll_mask.numpy().view(np.uint8), bitorder="little")[: vocab.size]
                a[vocab.eot_id] = b[vocab.eot_id] = 0  # end-of-turn: ours is the caller's, not the grammar's
                steps += 1
                if np.array_equal(a, b):
                    agree_steps += 1
                elif len(disagreements) < 5:
                    only_o = np.flatnonzero(a & ~b)[:5].tolist()
                    only_l = np.flatnonzero(b & ~a)[:5].tolist()
                    disagreements.append({"id": rec.id, "after": tok.decode(ids[: ids.index(token)]),
                                          "only_outlines": [tok.convert_ids_to_tokens(i) for i in only_o],
                                          "only_llguidance": [tok.convert_ids_to_tokens(i) for i in only_l]})
                if not (a[token] and b[token]):
                    failures.append(f"{rec.id}: target token {tok.convert_ids_to_tokens(token)!r} refused "
                                    f"(outlines {bool(a[token])}, llguidance {bool(b[token])})")
                    break
                guide.advance(token)
                matcher.consume_token(token)
        report[category] = {
            "tool_sets": len(items), "failures": failures[:10], "failed": len(failures),
            "outlines_compile_grammar_ms": summary(full_ms), "outlines_index_only_ms": summary(index_ms),
            "llguidance_matcher_and_first_mask_ms": summary(ll_ms), "llguidance_first_mask_ms": summary(ll_first_mask_ms),
            "mask_us_per_token": {k: summary(v) for k, v in mask_us.items()},
            "steps_compared": steps, "steps_same_mask": agree_steps, "disagreements": disagreements,
        }
        print(json.dumps({category: {k: v for k, v in report[category].items() if k not in ("disagreements", "failures")}}),
              flush=True)
    result = {"benchmark": "grammar_backends", "tokenizer": "smollm2-135m + <tool_call>", "vocab": vocab.size,
              "outlines_core": getattr(outlines_core, "__version__", "?"), "llguidance": llguidance.get_version()
              if hasattr(llguidance, "get_version") else "?", "llguidance_tokenizer_ms": round(ll_tokenizer_ms, 1),
              "timing": "thread CPU time (compile); wall time per mask", "load_average": os.getloadavg(),
              "machine": platform.processor() or platform.machine(), "categories": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
