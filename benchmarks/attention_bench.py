"""Forward-pass time of SmolLM2-135M with transformers' SDPA attention against its eager attention, on the
shapes the hf engine runs: decode steps (1 token, or a few with jumps and drafts) and a turn's prefill
(about 100 new tokens) after a long cached context, one row or a batch of rows with left padding.

Why: in bf16 on a 2-core CPU, 100 new tokens cost 85 ms with no context and about 250 ms after 1,900
cached tokens, so attention over the cache, not the MLP, sets an agent turn's latency. Both attention
paths run on the same inputs in the same process, interleaved repetition by repetition (these machines
drift), each pass writing into the same cache and cropping it back (the engine's GrowingCache). The
last-token logits of both paths are compared too.

    .venv/bin/python benchmarks/attention_bench.py [--dtype bf16 fp32] [--repeats 9]
        [--out benchmarks/results/attention_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMPLS = ("sdpa", "eager")
# (rows, cached context, new tokens): decode at short and long context, a step with drafts, a turn's
# prefill, 8 agents' decode step, 2 rows with drafts
SHAPES = ((1, 400, 1), (1, 1900, 1), (1, 1900, 7), (1, 1900, 100), (8, 1700, 1), (2, 1700, 7))


def run(dtype_name: str, repeats: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from fcdistill.models import cache_keyword, resolve_model
    from fcdistill.serve.engines.kv_buffer import GrowingCache

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    models = {impl: AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=dtype,
                                                         attn_implementation=impl).eval() for impl in IMPLS}
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.inference_mode():
        for rows, ctx, new in SHAPES:
            context = torch.randint(100, 40000, (rows, ctx), generator=gen)
            ids = torch.randint(100, 40000, (rows, new), generator=gen)
            mask = torch.ones((rows, ctx + new), dtype=torch.long)
            if rows > 1:
                mask[0, : ctx // 3] = 0  # one row left-padded, as a batch of unequal prompts is
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            caches, times, last = {}, {impl: [] for impl in IMPLS}, {}
            for impl, model in models.items():
                kw = cache_keyword(model)
                caches[impl] = GrowingCache()
                model(input_ids=context, attention_mask=mask[:, :ctx], position_ids=positions[:, :ctx], use_cache=True,
                      logits_to_keep=1, **{kw: caches[impl]})
            for _ in range(repeats + 1):  # the first round warms up and is dropped
                for impl, model in models.items():
                    start = time.perf_counter()
                    out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, ctx:], use_cache=True,
                                logits_to_keep=1, **{cache_keyword(model): caches[impl]})
                    times[impl].append(time.perf_counter() - start)
                    caches[impl].crop(-new)
                    last[impl] = out.logits[:, -1].float()
            ms = {impl: round(1000 * statistics.median(t[1:]), 1) for impl, t in times.items()}
            row = {"dtype": dtype_name, "rows": rows, "context": ctx, "new_tokens": new, "median_ms": ms,
                   "eager_vs_sdpa": round(ms["eager"] / ms["sdpa"], 3),
                   "same_argmax": bool((last["sdpa"].argmax(-1) == last["eager"].argmax(-1)).all()),
                   "max_logit_diff": round(float((last["sdpa"] - last["eager"]).abs().max()), 4)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention_bench.json"))
    args = parser.parse_args()
    result = {"benchmark": "attention_bench", "model": "smollm2-135m", "cpus": os.cpu_count(),
              "repeats": args.repeats, "load_average_at_start": os.getloadavg()}
    result["shapes"] = [row for dtype in args.dtype for row in run(dtype, args.repeats)]
    result["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
