"""The budget-aware, loop-proof constraint measured: where its defaults come from and what it costs.

Claims measured (results in benchmarks/results/guard_bench.json):
1. `values`: the loop guard's defaults (`fcdistill.grammars.guard.LoopGuard`) trip on no BFCL ground
   truth. Every single-turn BFCL ground-truth answer is rendered as the wire format renders a target,
   tokenized by SmolLM2's tokenizer and fed through `ValueTracker` with the limits off; reported are
   the longest value in tokens (strings and arrays/objects apart, with percentiles), the most times
   one n-gram repeats inside a value, and the most copies of one call in a call list, each with the
   answer it comes from.
2. `steps`: the constraint's own cost per decoding step (mask + advance, SmolLM2's full vocabulary,
   a BFCL-sized tool set, seeded random logits), without the budget and guard, with them while they
   do not narrow, and on the steps where they do; and what the closing table adds to a compile.
3. `serve` (optional, minutes): end-to-end decode tokens/s of `fcd serve` (hf engine) on the same
   `required` requests with `--no-guard` and with the guard.

Usage: .venv/bin/python benchmarks/guard_bench.py [values] [steps] [serve]   (default: values steps)
"""

from __future__ import annotations

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

from fcdistill.grammars.guard import LoopGuard, ValueTracker  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "guard_bench.json"
NO_LIMITS = LoopGuard(value_tokens=1 << 30, repeats=1 << 30, same_calls=1 << 30)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from fcdistill.models import ensure_fc_token, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ensure_fc_token(tok, "<tool_call>")
    return tok


def _percentile(xs: list[Any], q: float) -> Any:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0


def measure_values() -> dict[str, Any]:
    """Value lengths, n-gram repeats and repeated calls over every BFCL ground-truth answer."""
    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import SINGLE_TURN_CATEGORIES, load_category
    from fcdistill.grammars.vocabulary import token_pieces

    tok = _tokenizer()
    chat = ChatFormat(tok)
    pieces = token_pieces(tok, len(tok))
    fc_id = tok.convert_tokens_to_ids("<tool_call>")
    lengths: dict[str, list[int]] = {"string": [], "container": []}
    longest: dict[str, tuple[int, str, str]] = {"string": (0, "", ""), "container": (0, "", "")}
    repeats: dict[int, tuple[int, str, str]] = {}  # n -> (most repeats, id, text)
    same_calls = (0, "")
    answers, with_copies, tripped = 0, 0, []
    for category in SINGLE_TURN_CATEGORIES:
        records, _ = load_category(category)
        for rec in records:
            if not rec.ground_truth:
                continue
            answers += 1
            ids = tok.encode(chat.render_assistant(None, rec.ground_truth), add_special_tokens=False)
            ids = ids[ids.index(fc_id) + 1:]
            guarded = ValueTracker(LoopGuard(), calls=True)
            for token in ids:
                guarded.feed(token, pieces[token])
                if guarded.narrowing is not None:
                    tripped.append(rec.id)
                    break
            tracker = ValueTracker(NO_LIMITS, calls=True)
            open_len: dict[int, int] = {}
            for token in ids:
                before = {id(f): f for f in tracker.frames[tracker.roots:]}
                tracker.feed(token, pieces[token])
                n_ids = len(tracker.ids)
                values = tracker.frames[tracker.roots:]
                for f in values:
                    open_len[id(f)] = n_ids - f.start
                for n in range(1, len(tracker.runs)):
                    span = tracker.runs[n] + n
                    inner = next((f for f in reversed(values) if n_ids - f.start >= 2 * n), None)
                    if inner is None or span < 2 * n:
                        continue
                    k = min(span, n_ids - inner.start) // n
                    if k > repeats.get(n, (0, "", ""))[0]:
                        text = tok.decode(tracker.ids[n_ids - k * n:])
                        repeats[n] = (k, rec.id, text)
                closed = [f for key, f in before.items() if all(key != id(g) for g in values)]
                for f in closed:
                    kind = "string" if f.kind == ord('"') else "container"
                    n_tok = open_len.pop(id(f))
                    lengths[kind].append(n_tok)
                    if n_tok > longest[kind][0]:
                        longest[kind] = (n_tok, rec.id, tracker.text[f.offset:f.offset + 160].decode(errors="replace"))
            most = max(tracker.calls_seen.values(), default=0)
            with_copies += most > 1
            if most > same_calls[0]:
                same_calls = (most, rec.id)
    out: dict[str, Any] = {"answers": answers, "tokenizer": "SmolLM2-135M-Instruct"}
    for kind, xs in lengths.items():
        out[f"{kind}_values"] = {"count": len(xs), "p50": _percentile(xs, 0.5), "p99": _percentile(xs, 0.99),
                                 "p999": _percentile(xs, 0.999), "max": max(xs, default=0),
                                 "longest": {"tokens": longest[kind][0], "id": longest[kind][1], "head": longest[kind][2]}}
    out["ngram_repeats"] = {str(n): {"most": k, "id": i, "text": t[:120]} for n, (k, i, t) in sorted(repeats.items())}
    out["most_repeats_any_n"] = max((k for k, _, _ in repeats.values()), default=0)
    out["same_call_copies"] = {"most": same_calls[0], "id": same_calls[1], "answers_with_a_repeated_call": with_copies}
    out["default_guard"] = {**LoopGuard().__dict__, "answers_tripped": len(tripped), "tripped_ids": tripped[:20]}
    return out


def _time_walk(make: Any, ids: list[int] | None, vocab: Any, logits: Any) -> tuple[list[float], list[float], Any]:
    """Per-step seconds of mask_ and advance along `ids` (teacher-forced) or, when None, along the
    argmax of the masked logits until end-of-turn."""
    import torch

    c = make()
    masks, advances = [], []
    for step in range(4096):
        row = logits[step % len(logits)].clone()
        t0 = time.perf_counter()
        c.mask_(row)
        masks.append(time.perf_counter() - t0)
        token = ids[step] if ids is not None else int(torch.argmax(row))
        if token == vocab.eot_id or (ids is not None and step == len(ids) - 1):
            break
        t0 = time.perf_counter()
        c.advance(token)
        advances.append(time.perf_counter() - t0)
    return masks, advances, c


def measure_steps(records: int = 40) -> dict[str, Any]:
    """mask_ + advance per step on BFCL live_multiple answers (SmolLM2's full vocabulary): the plain
    constraint, the same tokens with budget and guard on (they never narrow there), and answers forced
    to the shortest call by max_tokens = the minimum (every step narrows)."""
    import torch
    from outlines_core import Guide

    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import load_category
    from fcdistill.grammars import SequenceConstraint, compile_grammar, token_vocabulary
    from fcdistill.grammars.closing import build_close_table

    torch.set_num_threads(1)  # a 49k-row masked_fill_ gains nothing from threads, and waits for them on a busy box
    tok = _tokenizer()
    vocab = token_vocabulary(tok, "<tool_call>")
    chat = ChatFormat(tok)
    logits = torch.randn(64, vocab.size, generator=torch.Generator().manual_seed(0))
    rows, _ = load_category("live_multiple")
    timings: dict[str, dict[str, list[float]]] = {k: {"mask": [], "advance": []} for k in ("plain", "guarded", "narrowing")}
    compile_ms: list[float] = []
    table_ms: list[float] = []  # building the closing table, part of compile_ms
    used = 0
    for rec in rows:
        if used == records:
            break
        if not rec.ground_truth:
            continue
        grammar, _ = compile_grammar(vocab, rec.tools, "required", True)
        ids = tok.encode(chat.render_target(None, rec.ground_truth), add_special_tokens=False)
        if not Guide(grammar.index).accepts_tokens(ids[1:-1]):
            continue  # arguments out of the schema's property order, or not valid against it
        used += 1
        start = time.perf_counter()
        build_close_table(grammar.index, vocab.eot_id)
        table_ms.append(1000 * (time.perf_counter() - start))
        compile_ms.append(grammar.compile_ms)
        for name, make, path in (
                ("plain", lambda: SequenceConstraint(grammar), ids),
                ("guarded", lambda: SequenceConstraint(grammar, 4096, LoopGuard()), ids),
                ("narrowing", lambda: SequenceConstraint(grammar, grammar.min_tokens, LoopGuard()), None)):
            masks, advances, _ = _time_walk(make, path, vocab, logits)
            timings[name]["mask"] += masks
            timings[name]["advance"] += advances

    def us(xs: list[float]) -> dict[str, float]:
        """Median and p90: on a shared 2-core box the mean is other processes' scheduling."""
        return {"p50_us": round(1e6 * statistics.median(xs), 1), "p90_us": round(1e6 * _percentile(xs, 0.9), 1),
                "steps": len(xs)}

    out: dict[str, Any] = {"records": used, "category": "live_multiple", "vocab": vocab.size,
                           "compile_ms_mean": round(statistics.fmean(compile_ms), 1),
                           "of_which_close_table_ms_mean": round(statistics.fmean(table_ms), 1)}
    for name, t in timings.items():
        out[name] = {"mask": us(t["mask"]), "advance": us(t["advance"])}
    plain = statistics.median(timings["plain"]["mask"]) + statistics.median(timings["plain"]["advance"])
    guarded = statistics.median(timings["guarded"]["mask"]) + statistics.median(timings["guarded"]["advance"])
    out["guard_overhead_us_per_step_p50"] = round(1e6 * (guarded - plain), 1)
    return out


def measure_serve(requests: int = 24, max_tokens: int = 128, rounds: int = 2) -> dict[str, Any]:
    """Completion tokens/s of `fcd serve` (hf engine, one request at a time) on BFCL simple_python
    questions under `required`, alternating servers with --no-guard and with the guard, `rounds` times
    each (a busy box drifts). Tokens/s are compared over the answers both servers gave identically,
    so the same tokens are decoded; answers the guard changed are counted apart."""
    import openai

    from fcdistill.data.bfcl import load_category
    from fcdistill.serve.process import start_server

    records, _ = load_category("simple_python")
    chosen = records[:requests]
    runs: dict[str, list[dict[str, tuple[str, int, float]]]] = {"no_guard": [], "guard": []}
    for _ in range(rounds):
        for name, extra in (("no_guard", ["--no-guard"]), ("guard", [])):
            log = Path(f"/tmp/guard_bench_serve_{name}.log")
            with start_server(["--model", "smollm2-135m", *extra], log, timeout=900) as srv:
                client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=600)
                answers: dict[str, tuple[str, int, float]] = {}
                for rec in chosen:
                    tools = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in rec.tools]
                    start = time.perf_counter()
                    r = client.chat.completions.create(model="smollm2-135m", messages=rec.messages, tools=tools,
                                                       tool_choice="required", temperature=0, max_tokens=max_tokens)
                    msg = r.choices[0].message
                    text = json.dumps([c.function.model_dump() for c in msg.tool_calls or []]) + (msg.content or "")
                    answers[rec.id] = (text, r.usage.completion_tokens, time.perf_counter() - start)
                runs[name].append(answers)
    same = [i for i in runs["guard"][0] if all(r[i][0] == runs["guard"][0][i][0] for v in runs.values() for r in v)]

    def rate(name: str) -> float:
        return sum(r[i][1] for r in runs[name] for i in same) / sum(r[i][2] for r in runs[name] for i in same)

    out = {"requests": len(chosen), "identical_answers": len(same), "max_tokens": max_tokens, "rounds": rounds,
           "tokens_per_s_no_guard": round(rate("no_guard"), 2), "tokens_per_s_guard": round(rate("guard"), 2),
           "answers_the_guard_changed": len(chosen) - len(same)}
    out["guard_slowdown_pct"] = round(100 * (1 - out["tokens_per_s_guard"] / out["tokens_per_s_no_guard"]), 2)
    return out


def main(argv: list[str]) -> None:
    parts = argv or ["values", "steps"]
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for part in parts:
        start = time.perf_counter()
        results[part] = {"values": measure_values, "steps": measure_steps, "serve": measure_serve}[part]()
        results[part]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({part: results[part]}, indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
