"""Decode-step time of the hf engine's KV cache (GrowingCache) against transformers' DynamicCache.

DynamicCache appends each step with `torch.cat`, copying every layer's whole cache every step; the
engine's GrowingCache writes into spare room. The cost that saves grows with rows x width, which is
what an agent workload has (8 conversations of ~1,000 tokens). Same model, same inputs, left padding
on one row when there are several (as the engine's batches have), greedy steps, glibc tuned as the
server tunes it (serve/memory.py); both caches are warmed up, their order alternates from repeat to
repeat, medians of `--repeats`, and the tokens each picks are compared. Steady decoding only: the
steps stay within the spare room, so a regrow (or a batch merge's copy) is not in the figure.

    .venv/bin/python benchmarks/kv_cache_bench.py [--steps 16] [--repeats 4]
        [--shapes 1x300,8x300,8x1000] [--out benchmarks/results/kv_cache_bench.json]
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

MODEL = "smollm2-135m"


def decode(model: Any, make_cache: Any, rows: int, width: int, steps: int) -> tuple[float, list[list[int]]]:
    """Seconds per decode step after a left-padded prefill of rows x width, and the tokens picked."""
    import torch

    from fcdistill.models import cache_keyword

    kw = cache_keyword(model)
    ids = torch.randint(100, 40000, (rows, width), generator=torch.Generator().manual_seed(width))
    mask = torch.ones((rows, width), dtype=torch.long)
    if rows > 1:
        mask[0, : width // 4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    picked = []
    with torch.inference_mode():
        cache = make_cache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{kw: cache})
        nxt, last = out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:]
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], 1)
            last = last + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=last, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            picked.append(nxt.flatten().tolist())
        seconds = (time.perf_counter() - start) / steps
        assert cache.get_seq_length() == width + steps, "the model did not use the cache it was given"
        return seconds, picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--shapes", default="1x300,8x300,8x1000", help="rows x prompt width, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_cache_bench.json")
    args = ap.parse_args()
    load_at_start = os.getloadavg()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from fcdistill.models import resolve_model
    from fcdistill.serve.engines.kv_buffer import GrowingCache
    from fcdistill.serve.memory import tune_malloc

    malloc = tune_malloc()

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    caches = {"DynamicCache": DynamicCache, "GrowingCache": GrowingCache}
    rows_out = []
    for shape in args.shapes.split(","):
        rows, width = (int(x) for x in shape.lower().split("x"))
        for make in caches.values():  # warm-up
            decode(model, make, rows, width, 2)
        times: dict[str, list[float]] = {name: [] for name in caches}
        tokens: dict[str, list] = {}
        for repeat in range(args.repeats):
            for name, make in list(caches.items())[:: 1 if repeat % 2 == 0 else -1]:
                seconds, tokens[name] = decode(model, make, rows, width, args.steps)
                times[name].append(seconds)
        ms = {name: round(statistics.median(t) * 1000, 1) for name, t in times.items()}
        rows_out.append({"rows": rows, "width": width, "ms_per_step": ms,
                         "runs_ms": {name: [round(t * 1000, 1) for t in v] for name, v in times.items()},
                         "speedup": round(ms["DynamicCache"] / ms["GrowingCache"], 3),
                         "same_tokens": tokens["DynamicCache"] == tokens["GrowingCache"]})
        print(json.dumps(rows_out[-1]), flush=True)
    result = {"benchmark": "kv_cache_bench", "model": MODEL, "dtype": "fp32", "steps": args.steps,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "malloc": malloc,
              "machine": platform.processor() or platform.machine(), "load_average_at_start": load_at_start,
              "rows": rows_out, "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
