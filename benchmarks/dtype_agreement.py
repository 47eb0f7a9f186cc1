"""fp32 vs bf16 serving on this CPU: how often greedy answers agree on BFCL items, and how fast each is.

The same held-out BFCL items (tools sent as `fcd eval run` sends them, tool_choice auto, greedy,
max_tokens 256) go through the serving logic (OpenAIServing over the hf engine: grammar, guard and
all) once per dtype, one request at a time. Reported per category: identical answer text, the same
calls (names and arguments), and completion tokens per second of wall time. `fcd serve --dtype auto`
stays fp32 on a CPU until these numbers say bf16 answers as fp32 does.

Usage: .venv/bin/python benchmarks/dtype_agreement.py [--per-category 25] [--adapter DIR]
Result: benchmarks/results/dtype_agreement.json
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
RESULT = ROOT / "benchmarks" / "results" / "dtype_agreement.json"


def answers(dtype: str, items: list[Any], adapter: str | None) -> dict[str, dict[str, Any]]:
    from fcdistill.eval.runner import fc_request
    from fcdistill.serve.engines.hf import HFEngine
    from fcdistill.serve.protocol import ChatCompletionRequest
    from fcdistill.serve.serving import OpenAIServing

    engine = HFEngine("smollm2-135m", adapters={"tuned": adapter} if adapter else None, dtype=dtype)
    serving = OpenAIServing(engine)
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
                print(f"{dtype}: {n}/{len(items)}", flush=True)
    finally:
        asyncio.run(engine.shutdown())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=25)
    ap.add_argument("--adapter", default=None, help="ask this adapter instead of the base model")
    ap.add_argument("--result", default=str(RESULT))
    args = ap.parse_args()

    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
    from fcdistill.eval.dataset import load_eval_set
    from fcdistill.models import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        sys.exit("this CPU has no native bf16 (AVX512-BF16 or AMX): nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_bfcl(SplitOptions(categories=CATEGORIES, max_per_category={c: 2 * args.per_category for c in CATEGORIES}),
                     Path(tmp))
        _, _, items = load_eval_set(tmp, CATEGORIES, args.per_category)
    load = os.getloadavg()
    runs = {dtype: answers(dtype, items, args.adapter) for dtype in ("fp32", "bf16")}
    per_cat: dict[str, dict[str, Any]] = {}
    for item in items:
        a, b = runs["fp32"][item.id], runs["bf16"][item.id]
        c = per_cat.setdefault(item.category, {"n": 0, "same_text": 0, "same_calls": 0})
        c["n"] += 1
        c["same_text"] += a["text"] == b["text"] and a["calls"] == b["calls"]
        c["same_calls"] += a["calls"] == b["calls"]
    speed = {d: round(sum(r["tokens"] for r in runs[d].values()) / sum(r["seconds"] for r in runs[d].values()), 2)
             for d in runs}
    total = {k: sum(c[k] for c in per_cat.values()) for k in ("n", "same_text", "same_calls")}
    result = {"benchmark": "dtype_agreement", "model": "smollm2-135m", "adapter": args.adapter,
              "per_category": per_cat, "total": total, "tokens_per_s": speed,
              "bf16_speedup": round(speed["bf16"] / speed["fp32"], 3), "loadavg_before": load,
              "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count()}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total", "tokens_per_s", "bf16_speedup")}))
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
