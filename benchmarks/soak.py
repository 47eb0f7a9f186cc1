"""Soak test: mixed traffic against a real `fcd serve` on loopback for a long stretch (20 min by default).

What an agent fleet does to a local endpoint for hours, compressed: good requests in every
tool_choice mode (auto, required, none, a named function) whole and streamed; clients that leave
mid-stream; bad requests (unknown model, broken JSON, wrong types, too many tools); tool sets never
seen before (each a new grammar compile); and bursts beyond `--max-concurrent-requests`, which must
be answered with 429s, not queued without end (a client told 429 waits its Retry-After, as the
openai client does).

Reported per window (default 60 s): requests by status, p50/p99 latency of the answered ones. Over
the run: the server's RSS at the start, after warm-up and at the end (goal: growth after warm-up
<= 5%), the count of 5xx answers (goal 0) and of hung requests (no answer within `--timeout`; goal 0),
the grammar cache's entries and memory, and the prefix cache's memory, from /metrics. The new tool
sets fill the grammar cache (bounded by `--grammar-cache-mb`, 32 MB here, about 1 MB a small tool
set) during the warm-up (a quarter of the run); the prefix cache fills toward `--prefix-cache-mb`
(512 MB) for longer; what grows beyond both is what the server does not bound. Both caches' sizes are
read from /metrics with every RSS sample, so the result also gives the growth after warm-up net of theirs. Writes
benchmarks/results/soak.json.

    .venv/bin/python benchmarks/soak.py [--minutes 20] [--workers 4] [--window-s 60] [--engine hf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
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
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}}
CONVERT = {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money.",
           "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                           "to": {"type": "string"}},
                          "required": ["amount", "from", "to"]}}}
ASKS = ["What's the weather in Paris?", "Convert 120 US dollars to euros.", "Tell me a short joke.",
        "Is it raining in Tokyo right now, in fahrenheit?", "How much is 5 pounds in yen?"]


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its children (the vllm engine's core runs in one)."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def fresh_tool(rng: random.Random) -> dict[str, Any]:
    name = f"tool_{rng.randrange(10**9):09d}"
    props = {f"p{i}": rng.choice([{"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                                  {"type": "string", "enum": ["a", "b", "c"]}]) for i in range(rng.randint(1, 4))}
    return {"type": "function", "function": {"name": name, "description": "A tool no request has used before.",
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": list(props)[:1]}}}


def pick(rng: random.Random) -> tuple[str, str, Any, bool, bool]:
    """(kind, path, body, stream, leave_mid_stream): the traffic mix."""
    ask = [{"role": "user", "content": rng.choice(ASKS)}]
    chat = {"model": MODEL, "messages": ask, "temperature": 0, "max_tokens": rng.choice([16, 32, 48])}
    roll = rng.random()
    if roll < 0.45:
        choice = rng.choice(["auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}])
        stream = rng.random() < 0.4
        kind = f"tools:{choice if isinstance(choice, str) else 'named'}" + (":stream" if stream else "")
        return kind, "/v1/chat/completions", {**chat, "tools": [WEATHER, CONVERT], "tool_choice": choice,
                                              "stream": stream}, stream, False
    if roll < 0.55:
        return "leave-mid-stream", "/v1/chat/completions", {**chat, "max_tokens": 64, "stream": True}, True, True
    if roll < 0.65:
        return "new-tool-set", "/v1/chat/completions", {**chat, "tools": [fresh_tool(rng)], "tool_choice": "required"}, \
            False, False
    if roll < 0.75:
        return "completion", "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16,
                                                 "temperature": 0}, False, False
    bad = rng.choice([
        ("bad:model", {**chat, "model": "nope"}),
        ("bad:json", b'{"model": "smollm2-135m", "messages": ['),
        ("bad:types", {**chat, "max_tokens": "many", "messages": "hi"}),
        ("bad:too-many-tools", {**chat, "tools": [WEATHER] * 500}),
        ("bad:role", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("bad:empty", {**chat, "messages": []}),
    ])
    return bad[0], "/v1/chat/completions", bad[1], False, False


async def one(client: Any, url: str, rng: random.Random, timeout: float, log: list[dict[str, Any]]) -> None:
    import httpx

    kind, path, body, stream, leave = pick(rng)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.perf_counter()
    rec: dict[str, Any] = {"t": time.time(), "kind": kind}
    try:
        async with asyncio.timeout(timeout):
            if stream:
                async with client.stream("POST", url + path, content=content,
                                         headers={"content-type": "application/json"}) as r:
                    rec["status"] = r.status_code
                    n = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and '"error"' in line and '"server_error"' in line:
                            rec["stream_error"] = line[:200]
                        n += 1
                        if leave and n >= 3:
                            break  # the client goes away mid-stream
            else:
                r = await client.post(url + path, content=content, headers={"content-type": "application/json"})
                rec["status"] = r.status_code
                if r.status_code == 429:  # as the openai client does: wait what the server asks, then go on
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    except TimeoutError:
        rec["status"] = "hung"
    except httpx.HTTPError as exc:
        rec["status"] = f"transport:{type(exc).__name__}"
    rec["seconds"] = round(time.perf_counter() - start, 4)
    log.append(rec)


async def drive(url: str, minutes: float, workers: int, burst_every_s: float, burst_size: int, timeout: float,
                seed: int, on_tick: Any) -> list[dict[str, Any]]:
    import httpx

    log: list[dict[str, Any]] = []
    end = time.monotonic() + minutes * 60
    limits = httpx.Limits(max_connections=workers + burst_size + 4)
    async with httpx.AsyncClient(timeout=timeout + 5, limits=limits) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                await one(client, url, rng, timeout, log)

        async def bursts() -> None:
            rng = random.Random(seed)
            while time.monotonic() + burst_every_s < end:
                await asyncio.sleep(burst_every_s)
                await asyncio.gather(*(one(client, url, rng, timeout, log) for _ in range(burst_size)))

        async def ticks() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(10)
                on_tick()

        await asyncio.gather(*(worker(i) for i in range(workers)), bursts(), ticks())
    return log


def windows(log: list[dict[str, Any]], start: float, width: float) -> list[dict[str, Any]]:
    out = []
    for w in range(int(max((r["t"] - start for r in log), default=0) // width) + 1):
        rows = [r for r in log if w * width <= r["t"] - start < (w + 1) * width]
        ok = sorted(r["seconds"] for r in rows if r["status"] == 200)
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        out.append({"window": w, "from_s": w * width, "requests": len(rows), "by_status": dict(sorted(statuses.items())),
                    "p50_s": round(statistics.median(ok), 3) if ok else None,
                    "p99_s": round(ok[min(len(ok) - 1, int(0.99 * (len(ok) - 1) + 0.5))], 3) if ok else None})
    return out


def metric(metrics: str, name: str) -> float | None:
    """One unlabelled value from /metrics' text, or None when the server does not report it."""
    found = re.search(rf"^{name} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else None


def cache_mb(metrics: str) -> float:
    """The grammar cache's and the prefix cache's bytes from /metrics, in MB (0 for one not reported)."""
    return sum(metric(metrics, f"fcd_{name}_cache_bytes") or 0.0 for name in ("grammar", "prefix")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=4, help="clients sending one request after another")
    ap.add_argument("--burst-every-s", type=float, default=90.0)
    ap.add_argument("--burst-size", type=int, default=16, help="requests fired at once (more than the limit below)")
    ap.add_argument("--max-concurrent-requests", type=int, default=8, help="the server's limit")
    ap.add_argument("--grammar-cache-mb", type=float, default=32.0,
                    help="the server's grammar cache: small enough that the new tool sets fill it during warm-up")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="default: a quarter of the run (the grammar cache fills), at least 1")
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()

    import httpx

    from fcdistill.serve.process import start_server

    warmup = args.warmup_minutes if args.warmup_minutes is not None else max(1.0, args.minutes / 4)
    log_path = args.out.with_suffix(".serve.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with start_server(["--model", MODEL, "--max-concurrent-requests", str(args.max_concurrent_requests),
                       "--grammar-cache-mb", str(args.grammar_cache_mb)], log_path,
                      engine=args.engine, timeout=900) as server:
        pid = server.proc.pid
        started = time.time()
        rss = {"start_mb": round(rss_mb(pid), 1)}
        samples: list[tuple[float, float, float]] = []  # seconds, RSS MB, grammar + prefix cache MB

        def tick() -> None:
            caches = cache_mb(httpx.get(f"{server.url}/metrics", timeout=30).text)
            samples.append((time.time() - started, rss_mb(pid), caches))
            print(f"[{samples[-1][0]:6.0f}s] rss {samples[-1][1]:.0f} MB, caches {caches:.0f} MB", file=sys.stderr,
                  flush=True)

        log = asyncio.run(drive(server.url, args.minutes, args.workers, args.burst_every_s, args.burst_size,
                                args.timeout, args.seed, tick))
        after_warmup = [(mb, caches) for t, mb, caches in samples if t >= warmup * 60]
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        rss.update({"after_warmup_mb": round(after_warmup[0][0], 1) if after_warmup else None,
                    "end_mb": round(rss_mb(pid), 1), "max_mb": round(max(s[1] for s in samples), 1) if samples else None})
        if after_warmup:
            rss["growth_after_warmup_pct"] = round(100 * (rss["end_mb"] / after_warmup[0][0] - 1), 2)
            # what the two bounded caches took after warm-up is theirs, not a leak: the rest is what to judge
            cache_growth = cache_mb(metrics) - after_warmup[0][1]
            rss["cache_growth_after_warmup_mb"] = round(cache_growth, 1)
            rss["growth_after_warmup_beyond_caches_pct"] = round(
                100 * ((rss["end_mb"] - cache_growth) / after_warmup[0][0] - 1), 2)
        healthy = httpx.get(f"{server.url}/health", timeout=30).json()
    cache_bytes, prefix_bytes = metric(metrics, "fcd_grammar_cache_bytes"), metric(metrics, "fcd_prefix_cache_bytes")
    statuses: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    for r in log:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        k = kinds.setdefault(r["kind"], {})
        k[str(r["status"])] = k.get(str(r["status"]), 0) + 1
    result = {
        "benchmark": "soak", "engine": args.engine, "model": MODEL, "minutes": args.minutes, "workers": args.workers,
        "burst_size": args.burst_size, "max_concurrent_requests": args.max_concurrent_requests,
        "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
        "requests": len(log), "by_status": dict(sorted(statuses.items())), "by_kind": dict(sorted(kinds.items())),
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "stream_server_errors": sum(1 for r in log if r.get("stream_error")),
        "hung": statuses.get("hung", 0), "rss": rss, "warmup_minutes": warmup,
        "grammar_cache_entries": metric(metrics, "fcd_grammar_cache_entries"),
        "grammar_cache_mb": round(cache_bytes / 2**20, 1) if cache_bytes is not None else None,
        "grammar_cache_limit_mb": args.grammar_cache_mb,
        # the hf engine's prefix cache fills toward its bound (--prefix-cache-mb, 512 by default) as new
        # prompts arrive: RSS growth up to that much after warm-up is the cache, not a leak
        "prefix_cache_mb": round(prefix_bytes / 2**20, 1) if prefix_bytes is not None else None,
        "healthy_at_end": healthy,
        "windows": windows(log, started, args.window_s),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
