"""Teacher client throughput and overhead against a local endpoint that answers instantly.

Claims measured (results in benchmarks/results/teacher_bench.json):
1. the client adds under 2 ms of its own per request: (a) instrumented time inside TeacherClient.chat
   that is neither the HTTP exchange nor queueing, and (b) end-to-end latency of TeacherClient.chat
   minus that of a bare HTTP POST (same transport library, same body) to the same instant server,
   both at concurrency 1;
2. it sustains the configured concurrency: with more work offered than slots and an endpoint with
   latency (100 ms to 1 s, as a teacher has), the number of requests the client has in flight
   (sampled every 2 ms, ramp-up and drain excluded) stays at the configured concurrency, throughput
   is concurrency / latency, and the server sees that many at once, never more. Against the instant
   endpoint throughput is bounded by CPU (client and server share this small box), so the maximum
   rate and the client's CPU per request are reported as well.

The server is `python -m fcdistill.devtools.replay_teacher` in its own process (so it does not share the
client's GIL). Usage: .venv/bin/python benchmarks/teacher_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcdistill.serve.process import free_port  # noqa: E402
from fcdistill.teacher.ask import TeacherClient  # noqa: E402
from fcdistill.teacher.config import TeacherConfig  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
REPLY = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}


def start_server(script: dict[str, Any]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    path = Path(tempfile.mkdtemp()) / "script.json"
    path.write_text(json.dumps(script))
    proc = subprocess.Popen([sys.executable, "-m", "fcdistill.devtools.replay_teacher", "--port", str(port), "--script", str(path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, path
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("replay server did not start")


def server_stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/stats", timeout=5).json()


def control(url: str, **cmd: Any) -> None:
    import httpx

    httpx.post(f"{url}/control", json=cmd, timeout=5).raise_for_status()


async def bare_latencies(url: str, n: int) -> list[float]:
    """A bare POST + JSON decode with the transport openai uses: the floor any client pays."""
    try:
        import httpx2 as httpx_mod
    except ImportError:
        import httpx as httpx_mod
    out = []
    async with httpx_mod.AsyncClient(base_url=url) as http:
        for i in range(n + 20):
            body = {"model": "bench", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 64, "seed": i}
            t = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer EMPTY"})
            r.json()
            if i >= 20:  # warm-up excluded
                out.append(time.perf_counter() - t)
    return out


async def client_latencies(url: str, n: int, cache: Path | None) -> tuple[list[float], dict[str, Any]]:
    cfg = TeacherConfig(base_url=f"{url}/v1", model="bench", concurrency=1, progress=False, cache=cache)
    out = []
    async with TeacherClient(cfg, measure=True) as client:
        for i in range(n + 20):
            t = time.perf_counter()
            r = await client.chat(MESSAGES, sample=i, max_tokens=64)
            assert r.error is None, r.error
            if i >= 20:
                out.append(time.perf_counter() - t)
        stats = client.stats.as_dict(cfg)
        own = sorted(client.stats.own_samples[20:])
    stats["own_ms_median"] = 1000 * statistics.median(own)
    stats["own_ms_p99_steady"] = 1000 * own[int(0.99 * (len(own) - 1))]
    stats["own_ms_mean_steady"] = 1000 * statistics.fmean(own)
    return out, stats


async def throughput(url: str, concurrency: int, n: int) -> dict[str, Any]:
    """n requests offered at once; a sampler reads the client's in-flight count every 2 ms."""
    cfg = TeacherConfig(base_url=f"{url}/v1", model="bench", concurrency=concurrency, progress=False)
    async with TeacherClient(cfg) as client:
        async def one(i: int) -> None:
            r = await client.chat(MESSAGES, sample=i, max_tokens=64)
            assert r.error is None, r.error
        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the connection pool
        samples: list[int] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                samples.append(client._in_flight)
                await asyncio.sleep(0.002)
        task = asyncio.ensure_future(sampler())
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(10_000 + i) for i in range(n)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop.set()
        await task
        stats = client.stats.as_dict(cfg)
    steady = samples[len(samples) // 10: len(samples) - len(samples) // 10] or samples  # ramp up/down excluded
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "throughput_rps": n / wall,
            "client_max_in_flight": stats["max_in_flight"],
            "client_mean_in_flight": statistics.fmean(steady),
            "share_of_time_at_limit": sum(1 for x in steady if x == concurrency) / len(steady),
            "client_cpu_ms_per_request": 1000 * cpu / n, "own_ms_mean": stats["own_ms_mean"]}


def ms(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"mean": 1000 * statistics.fmean(s), "median": 1000 * statistics.median(s),
            "p99": 1000 * s[int(0.99 * (len(s) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_bench.json"))
    args = ap.parse_args()
    n_lat = 100 if args.quick else 400
    n_tp = 200 if args.quick else 1000
    proc, url, _ = start_server({"default": REPLY})
    try:
        result: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                              "loadavg_1m_at_start": os.getloadavg()[0]}}
        bare = asyncio.run(bare_latencies(url, n_lat))
        ours, stats = asyncio.run(client_latencies(url, n_lat, None))
        with tempfile.TemporaryDirectory() as tmp:
            cached_miss, stats_miss = asyncio.run(client_latencies(url, n_lat, Path(tmp) / "c.sqlite"))
            cached_hit, stats_hit = asyncio.run(client_latencies(url, n_lat, Path(tmp) / "c.sqlite"))
        bare_ms, ours_ms = ms(bare), ms(ours)
        result["instant_endpoint_concurrency_1"] = {
            "requests": n_lat,
            "bare_http_post_ms": bare_ms,
            "teacher_client_ms": ours_ms,
            "client_minus_bare_ms": {"mean": ours_ms["mean"] - bare_ms["mean"],
                                     "median": ours_ms["median"] - bare_ms["median"]},
            "own_overhead_ms": {"mean": stats["own_ms_mean_steady"], "median": stats["own_ms_median"],
                                "p99": stats["own_ms_p99_steady"]},
            "with_cache_miss_ms": ms(cached_miss),
            "with_cache_miss_own_overhead_ms": {"mean": stats_miss["own_ms_mean_steady"],
                                                "median": stats_miss["own_ms_median"],
                                                "p99": stats_miss["own_ms_p99_steady"]},
            "cache_hit_ms": ms(cached_hit),
            "cache_hits": stats_hit["cache_hits"],
        }
        result["instant_endpoint_max_throughput"] = [asyncio.run(throughput(url, c, n_tp)) for c in (8, 64)]
        # An endpoint with real latency (as a teacher has): the client should keep exactly `c` requests
        # outstanding, so throughput ~ c / latency, as long as c / latency fits this box's CPU.
        delayed = []
        for c, delay, seconds in ((8, 0.1, 4), (32, 0.2, 4), (128, 1.0, 5)):
            control(url, script={"default": REPLY, "delay_s": delay}, reset=True)
            r = asyncio.run(throughput(url, c, int(c / delay * seconds)))
            r["endpoint_latency_s"] = delay
            r["ideal_rps"] = c / delay
            r["efficiency"] = r["throughput_rps"] / r["ideal_rps"]
            r["server_max_in_flight"] = server_stats(url)["max_in_flight"]
            delayed.append(r)
        result["endpoint_with_latency"] = delayed
        own = result["instant_endpoint_concurrency_1"]
        result["claims"] = {
            "own_overhead_under_2ms": own["own_overhead_ms"]["p99"] < 2.0,
            "client_minus_bare_under_2ms": own["client_minus_bare_ms"]["mean"] < 2.0,
            "never_exceeds_concurrency": all(r["client_max_in_flight"] <= r["concurrency"] for r in delayed),
            "reaches_concurrency": all(r["client_max_in_flight"] == r["concurrency"] for r in delayed),
            "sustains_concurrency_95pct": all(r["client_mean_in_flight"] >= 0.95 * r["concurrency"] for r in delayed),
            "server_never_sees_more": all(r["server_max_in_flight"] <= r["concurrency"] for r in delayed),
        }
        result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    finally:
        proc.kill()
        proc.wait()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
