"""Two settings of the hf engine side by side on BFCL items: do greedy answers agree, and how fast is each?

The same held-out BFCL items (tools sent as `fcd eval run` sends them, tool_choice auto, greedy,
max_tokens 256) go through the serving logic (OpenAIServing over the hf engine: grammar, guard and
all) of both settings, item by item, one request at a time, the side asked first alternating.
Reported per category: identical answers (text and calls), the same calls (names and arguments); per
setting: completion tokens per second of wall time, p50 request latency, the engine's counters (jumped
tokens, prefill computed and reused), and how many answers bfcl_eval's checker counts correct (`fcd
eval`'s scoring), per category and in all.

  --a dtype=fp32 --b dtype=bf16                      is bf16 answering as fp32 does (`--dtype auto` stays
                                                     fp32 on a CPU until it is), and faster?
  --a jump_forward=false --b jump_forward=true       the share of tokens jump-forward places, the latency gain
  --a prefix_cache_mb=0 --b prefix_cache_mb=512      the prefix cache on BFCL's one-request-per-tool-set traffic
  --a grammar_backend=outlines --b grammar_backend=llguidance
                                                     the same answers with a ~1 ms grammar per new tool set?
                                                     (grammar_backend goes to the serving logic, not the engine)

Usage: .venv/bin/python benchmarks/engine_ab.py --a KEY=VALUE --b KEY=VALUE [--per-category 25] [--adapter DIR]
       [--data DIR]
Result: benchmarks/results/engine_ab-NAME.json (NAME from the settings)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CATEGORIES = ["simple_python", "multiple", "parallel", "irrelevance", "live_simple", "live_multiple"]
RESULTS = ROOT / "benchmarks" / "results"


def setting(text: str) -> dict[str, Any]:
    """KEY=VALUE[,KEY=VALUE] -> HFEngine keyword arguments (values read as YAML, except YAML 1.1's
    on/off/yes/no, which stay words: `merge_adapters=off` means the word)."""
    import yaml

    out = {}
    for part in [p for p in text.split(",") if p]:
        key, _, raw = part.partition("=")
        value = yaml.safe_load(raw)
        out[key.strip()] = raw.strip() if raw.strip().lower() in ("on", "off", "yes", "no") else value
    return out


class Side:
    """One setting: its own engine and serving logic, asked one request at a time."""

    def __init__(self, engine_kw: dict[str, Any], adapter: str | None, scorer: Any):
        from fcdistill.serve.engines.hf import HFEngine
        from fcdistill.serve.serving import OpenAIServing

        self.scorer = scorer
        engine_kw = dict(engine_kw)
        backend = engine_kw.pop("grammar_backend", "outlines")
        self.engine = HFEngine("smollm2-135m", adapters={"tuned": adapter} if adapter else None, **engine_kw)
        self.serving = OpenAIServing(self.engine, grammar_backend=backend)
        self.model = "tuned" if adapter else "smollm2-135m"
        self.answers: dict[str, dict[str, Any]] = {}
        self.grammar = {"misses": 0, "compile_ms": 0, "exact_compiles": 0, "exact_ms": 0}

    def ask(self, item: Any) -> None:
        from fcdistill.eval.runner import answer_row, fc_request
        from fcdistill.grammars import grammar_cache_info
        from fcdistill.serve.protocol import ChatCompletionRequest

        tools, name_map = fc_request(item, safe=True)
        req = ChatCompletionRequest(model=self.model, messages=item.record.messages, tools=tools, temperature=0,
                                    max_tokens=256)
        before = grammar_cache_info()
        t0 = time.perf_counter()
        reply = asyncio.run(self._complete(req))
        seconds = time.perf_counter() - t0
        after = grammar_cache_info()  # one request at a time: the compiles between are this request's
        for k in self.grammar:
            self.grammar[k] += after[k] - before[k]
        msg = reply.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
        as_eval_records = answer_row(item, "fc", msg.content, calls, reply.choices[0].finish_reason, name_map)
        self.answers[item.id] = {
            # the compile the request waited for; llguidance's later exact compile runs beside decoding,
            # may end after the request, and is only counted per side (grammar_exact_ms)
            "seconds": seconds, "compile_ms": after["compile_ms"] - before["compile_ms"],
            "tokens": reply.usage.completion_tokens, "text": msg.content,
            "calls": [(c["name"], json.loads(c["arguments"])) for c in calls],
            "correct": self.scorer.score(item, as_eval_records).valid}

    async def _complete(self, req: Any) -> Any:
        return await self.serving.chat_completion(await self.serving.prepare_chat(req))

    def close(self) -> dict[str, Any]:
        stats = self.engine.stats() | {f"grammar_{k}": v for k, v in self.grammar.items()}
        asyncio.run(self.engine.shutdown())
        return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=setting, help="the first setting, e.g. dtype=fp32")
    ap.add_argument("--b", required=True, type=setting, help="the second, e.g. dtype=bf16")
    ap.add_argument("--per-category", type=int, default=25)
    ap.add_argument("--adapter", default=None, help="ask this adapter instead of the base model")
    ap.add_argument("--data", default=None, help=(
        "ask the eval split of this `fcd data bfcl` dir (an adapter's own held-out items); default: a fresh split"))
    ap.add_argument("--result", default=None)
    args = ap.parse_args()

    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
    from fcdistill.eval.dataset import load_eval_set

    if args.data:
        _, _, items = load_eval_set(args.data, CATEGORIES, args.per_category)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prepare_bfcl(SplitOptions(categories=CATEGORIES,
                                      max_per_category={c: 2 * args.per_category for c in CATEGORIES}), Path(tmp))
            _, _, items = load_eval_set(tmp, CATEGORIES, args.per_category)
    if not items:
        raise SystemExit(f"no eval items in {args.data or 'the fresh split'} for {', '.join(CATEGORIES)}")
    names = {"a": ",".join(f"{k}={v}" for k, v in args.a.items()), "b": ",".join(f"{k}={v}" for k, v in args.b.items())}
    load = os.getloadavg()
    from fcdistill.eval.score import Scorer

    scorer = Scorer()
    sides = {side: Side(getattr(args, side), args.adapter, scorer) for side in ("a", "b")}
    try:
        # Item by item, the first side alternating: a slow spell of the machine lands on both, and so
        # do the grammar compiles (same backend: whichever side meets a tool set first compiles it).
        for n, item in enumerate(items):
            for side in ("a", "b") if n % 2 == 0 else ("b", "a"):
                sides[side].ask(item)
            if (n + 1) % 20 == 0:
                print(f"{n + 1}/{len(items)}", flush=True)
    finally:
        stats = {}
        for side, s in sides.items():
            try:
                stats[side] = s.close()
            except Exception as exc:  # the other engine still shuts down
                stats[side] = {"close_error": repr(exc)}
    runs = {side: {"answers": s.answers, "engine": stats[side]} for side, s in sides.items()}
    per_cat: dict[str, dict[str, Any]] = {}
    differences: list[dict[str, Any]] = []
    for item in items:
        a, b = runs["a"]["answers"][item.id], runs["b"]["answers"][item.id]
        c = per_cat.setdefault(item.category, {"n": 0, "same_answer": 0, "same_calls": 0, "a_correct": 0,
                                               "b_correct": 0, "only_a_correct": 0, "only_b_correct": 0})
        c["n"] += 1
        c["a_correct"] += a["correct"]
        c["b_correct"] += b["correct"]
        c["only_a_correct"] += a["correct"] and not b["correct"]
        c["only_b_correct"] += b["correct"] and not a["correct"]
        same = a["text"] == b["text"] and a["calls"] == b["calls"]
        c["same_answer"] += same
        c["same_calls"] += a["calls"] == b["calls"]
        if not same:
            differences.append({"id": item.id, **{side: {"text": r["text"], "calls": r["calls"], "tokens": r["tokens"],
                                                         "correct": r["correct"]}
                                                  for side, r in (("a", a), ("b", b))}})
    settings = {}
    for side in ("a", "b"):
        rows = runs[side]["answers"].values()
        seconds = sorted(r["seconds"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        compile_s = sum(r["compile_ms"] for r in rows) / 1000
        settings[side] = {"engine_kwargs": getattr(args, side), "completion_tokens": tokens,
                          "tokens_per_s": round(tokens / sum(seconds), 2),
                          "tokens_per_s_without_grammar_compiles": round(tokens / (sum(seconds) - compile_s), 2),
                          "p50_latency_s": round(seconds[len(seconds) // 2], 3), "engine": runs[side]["engine"]}
    total = {k: sum(c[k] for c in per_cat.values()) for k in next(iter(per_cat.values()))}
    result = {"benchmark": "engine_ab", "model": "smollm2-135m", "adapter": args.adapter, "settings": settings,
              "per_category": per_cat, "total": total, "differences": differences,
              "b_over_a_tokens_per_s": round(settings["b"]["tokens_per_s"] / settings["a"]["tokens_per_s"], 3),
              "b_over_a_tokens_per_s_without_grammar_compiles": round(
                  settings["b"]["tokens_per_s_without_grammar_compiles"]
                  / settings["a"]["tokens_per_s_without_grammar_compiles"], 3),
              "order": "item by item, the first side alternating",
              "loadavg_before": load, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count()}
    path = Path(args.result or RESULTS / f"engine_ab-{names['a']}-vs-{names['b']}.json".replace("=", "_").replace(",", "_"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total", "b_over_a_tokens_per_s")}))
    print(json.dumps({side: {k: v for k, v in s.items() if k != "engine_kwargs"} for side, s in settings.items()}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
