"""Two settings of the hf engine side by side on BFCL items: do greedy answers agree, and how fast is each?

The same held-out BFCL items (tools sent as `fcd eval run` sends them, tool_choice auto, greedy,
max_tokens 256) go through the serving logic (OpenAIServing over the hf engine: grammar, guard and
all) once per setting, one request at a time. Reported per category: identical answers (text and
calls), the same calls (names and arguments); per setting: completion tokens per second of wall time,
p50 request latency, and the engine's counters (jumped tokens, prefill computed and reused).

  --a dtype=fp32 --b dtype=bf16                      is bf16 answering as fp32 does (`--dtype auto` stays
                                                     fp32 on a CPU until it is), and faster?
  --a jump_forward=false --b jump_forward=true       the share of tokens jump-forward places, the latency gain
  --a prefix_cache_mb=0 --b prefix_cache_mb=512      the prefix cache on BFCL's one-request-per-tool-set traffic
  --a grammar_backend=outlines --b grammar_backend=llguidance
                                                     the same answers with a ~1 ms grammar per new tool set?
                                                     (grammar_backend goes to the serving logic, not the engine)

Usage: .venv/bin/python benchmarks/engine_ab.py --a KEY=VALUE --b KEY=VALUE [--per-category 25] [--adapter DIR]
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


def answers(name: str, engine_kw: dict[str, Any], items: list[Any], adapter: str | None) -> dict[str, Any]:
    from fcdistill.eval.runner import fc_request
    from fcdistill.grammars import grammar_cache_info
    from fcdistill.serve.engines.hf import HFEngine
    from fcdistill.serve.protocol import ChatCompletionRequest
    from fcdistill.serve.serving import OpenAIServing

    engine_kw = dict(engine_kw)
    backend = engine_kw.pop("grammar_backend", "outlines")
    engine = HFEngine("smollm2-135m", adapters={"tuned": adapter} if adapter else None, **engine_kw)
    serving = OpenAIServing(engine, grammar_backend=backend)
    before = grammar_cache_info()
    model = "tuned" if adapter else "smollm2-135m"
    out: dict[str, dict[str, Any]] = {}

    async def one(item: Any) -> dict[str, Any]:
        tools, _ = fc_request(item, safe=True)
        req = ChatCompletionRequest(model=model, messages=item.record.messages, tools=tools, temperature=0,
                                    max_tokens=256)
        t0 = time.perf_counter()
        reply = await serving.chat_completion(await serving.prepare_chat(req))
        msg = reply.choices[0].message
        return {"seconds": time.perf_counter() - t0, "tokens": reply.usage.completion_tokens,
                "text": msg.content, "calls": [(c.function.name, json.loads(c.function.arguments))
                                               for c in msg.tool_calls or []]}
    try:
        for n, item in enumerate(items, 1):
            out[item.id] = asyncio.run(one(item))
            if n % 20 == 0:
                print(f"{name}: {n}/{len(items)}", flush=True)
        stats = engine.stats()
        after = grammar_cache_info()
        stats |= {f"grammar_{k}": after[k] - before[k] for k in ("misses", "exact_compiles", "exact_ms")}
    finally:
        asyncio.run(engine.shutdown())
    return {"answers": out, "engine": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=setting, help="the first setting, e.g. dtype=fp32")
    ap.add_argument("--b", required=True, type=setting, help="the second, e.g. dtype=bf16")
    ap.add_argument("--per-category", type=int, default=25)
    ap.add_argument("--adapter", default=None, help="ask this adapter instead of the base model")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()

    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
    from fcdistill.eval.dataset import load_eval_set

    with tempfile.TemporaryDirectory() as tmp:
        prepare_bfcl(SplitOptions(categories=CATEGORIES, max_per_category={c: 2 * args.per_category for c in CATEGORIES}),
                     Path(tmp))
        _, _, items = load_eval_set(tmp, CATEGORIES, args.per_category)
    names = {"a": ",".join(f"{k}={v}" for k, v in args.a.items()), "b": ",".join(f"{k}={v}" for k, v in args.b.items())}
    load = os.getloadavg()
    runs = {side: answers(names[side], getattr(args, side), items, args.adapter) for side in ("a", "b")}
    per_cat: dict[str, dict[str, Any]] = {}
    differences: list[dict[str, Any]] = []
    for item in items:
        a, b = runs["a"]["answers"][item.id], runs["b"]["answers"][item.id]
        c = per_cat.setdefault(item.category, {"n": 0, "same_answer": 0, "same_calls": 0})
        c["n"] += 1
        same = a["text"] == b["text"] and a["calls"] == b["calls"]
        c["same_answer"] += same
        c["same_calls"] += a["calls"] == b["calls"]
        if not same:
            differences.append({"id": item.id, **{side: {"text": r["text"], "calls": r["calls"], "tokens": r["tokens"]}
                                                  for side, r in (("a", a), ("b", b))}})
    settings = {}
    for side in ("a", "b"):
        rows = runs[side]["answers"].values()
        seconds = sorted(r["seconds"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        settings[side] = {"engine_kwargs": getattr(args, side), "completion_tokens": tokens,
                          "tokens_per_s": round(tokens / sum(seconds), 2),
                          "p50_latency_s": round(seconds[len(seconds) // 2], 3), "engine": runs[side]["engine"]}
    total = {k: sum(c[k] for c in per_cat.values()) for k in ("n", "same_answer", "same_calls")}
    result = {"benchmark": "engine_ab", "model": "smollm2-135m", "adapter": args.adapter, "settings": settings,
              "per_category": per_cat, "total": total, "differences": differences,
              "b_over_a_tokens_per_s": round(settings["b"]["tokens_per_s"] / settings["a"]["tokens_per_s"], 3),
              "loadavg_before": load, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count()}
    path = Path(args.result or RESULTS / f"engine_ab-{names['a']}-vs-{names['b']}.json".replace("=", "_").replace(",", "_"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total", "b_over_a_tokens_per_s")}))
    print(json.dumps({side: {k: v for k, v in s.items() if k != "engine_kwargs"} for side, s in settings.items()}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
