"""The server's per-token overhead: one request to `fcd serve` (hf engine) against a bare decode loop.

Single-request tokens/s as a client sees it (prefill included, the HTTP round trip and the serving
logic too) for the same model, dtype, prompt and token count as a bare transformers loop (prefill,
then one greedy token a forward pass with transformers' own DynamicCache, nothing else; the server
uses its GrowingCache, so the ratio includes the difference between the two caches). Three servers, one after another
in the same run: no adapter; an adapter loaded with PEFT's layers (`--merge-adapters off`); the same
adapter merged (`--merge-adapters on`). Each is asked for the base model and, where loaded, for the
adapter; each answer's token count is what the bare loop then decodes (the base model, or the adapter
merged into it). Served and bare runs alternate, one warm-up each, and the medians of `--repeats` are
compared, so a slow spell of a shared machine lands on both sides. The server tunes glibc's malloc
(fcdistill/serve/memory.py); the bare loop gets the same settings unless `--bare-malloc default`, so
the ratio compares the serving path, not two allocator settings.

  .venv/bin/python benchmarks/overhead_bench.py --adapter runs/quality-aug/train/adapter \\
      [--dtype fp32] [--max-tokens 128] [--repeats 5] [--out benchmarks/results/overhead_bench.json]
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

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and his dog."}]
MODEL = "smollm2-135m"


def bare_once(model: Any, prompt_ids: list[int], tokens: int) -> float:
    """Seconds for prefill + `tokens` greedy decode steps: one forward pass a token with a KV cache, nothing
    else, under inference_mode."""
    import torch
    from transformers import DynamicCache

    from fcdistill.models import cache_keyword

    kw = cache_keyword(model)
    start = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


def served_once(client: Any, model: str, max_tokens: int) -> tuple[float, int]:
    """One request through the openai client: seconds over the whole request, completion tokens."""
    start = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
    return time.perf_counter() - start, r.usage.completion_tokens


def side_by_side(url: str, requested: str, bare_model: Any, prompt_ids: list[int], max_tokens: int,
                 repeats: int) -> dict[str, Any]:
    """Served and bare runs alternated (one warm-up each), so a slow spell of this shared machine lands on
    both; medians over `repeats`. The bare loop decodes as many tokens as the server answered with."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    _, tokens = served_once(client, requested, max_tokens)
    bare_once(bare_model, prompt_ids, tokens)
    served_s, bare_s = [], []
    for _ in range(repeats):
        seconds, n = served_once(client, requested, max_tokens)
        assert n == tokens, (n, tokens)  # greedy: the same answer every time
        served_s.append(seconds)
        bare_s.append(bare_once(bare_model, prompt_ids, tokens))

    def summary(times: list[float]) -> dict[str, Any]:
        wall = statistics.median(times)
        return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
                "runs": [round(t, 3) for t in times]}

    served, bare = summary(served_s), summary(bare_s)
    return {"served": served, "bare": bare, "server_vs_bare": round(served["tokens_per_s"] / bare["tokens_per_s"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a trained adapter directory (fcd train's adapter/)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bare-malloc", default="tuned", choices=["tuned", "default"],
                    help="the bare loop's glibc malloc: tuned as the server tunes it, or glibc's defaults")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead_bench.json")
    args = ap.parse_args()
    load_at_start = os.getloadavg()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcdistill.chat_format import ChatFormat
    from fcdistill.models import resize_for_tokenizer, resolve_model
    from fcdistill.serve.engines.hf import _merged_copy
    from fcdistill.serve.memory import tune_malloc
    from fcdistill.serve.process import start_server

    if args.bare_malloc == "tuned":
        tune_malloc()  # exported: the servers start with them too
    bare_malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # what this process runs with
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)  # the adapter's: it has the FC token
    prompt_ids = tokenizer.encode(ChatFormat(tokenizer).render_prompt(MESSAGES, None), add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=dtype).eval()
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        resize_for_tokenizer(base, len(tokenizer))
    merged = _merged_copy(base, args.adapter, dtype)
    bare_models = {MODEL: base, "tuned": merged}

    servers = {"no adapter": [], "adapter, PEFT layers": ["--merge-adapters", "off"],
               "adapter, merged": ["--merge-adapters", "on"]}
    rows = []
    log_dir = args.out.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, extra in servers.items():
        flags = ["--dtype", args.dtype, "--prefix-cache-mb", "0", *extra]  # the bare loop prefills every time too
        if extra:
            flags += ["--adapter", f"tuned={args.adapter}"]
        with start_server(["--model", MODEL, *flags], log_dir / "overhead_bench.serve.log") as srv:
            for requested in ([MODEL, "tuned"] if extra else [MODEL]):
                rows.append({"server": name, "model": requested,
                             **side_by_side(srv.url, requested, bare_models[requested], prompt_ids,
                                            args.max_tokens, args.repeats)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "overhead_bench", "model": MODEL, "adapter": args.adapter, "dtype": args.dtype,
              "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "bare_malloc": bare_malloc,
              "load_average_at_start": load_at_start,
              "machine": platform.processor() or platform.machine(), "rows": rows,
              "goal": "server_vs_bare >= 0.9 for the base with an adapter loaded and for the adapter"}
    result["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
