"""Two `fcd serve` settings side by side on BFCL: the same trained student, the same held-out items.

Each setting is a list of extra `fcd serve` flags (e.g. `--grammar-backend outlines` against
`--grammar-backend llguidance`); the student is served once per setting and `fcd eval run`'s runner
asks both the same questions. Reported per setting: wall time of the eval (server start excluded),
request latency p50/p95, completion tokens, accuracy per category with CI95, what the server's
/metrics say about grammar compiles; and between the two, answers that differ and the McNemar
comparison. engine_ab.py does the same in-process for the hf engine; this goes through real servers,
so it measures either engine.

Usage:
  .venv/bin/python benchmarks/serve_eval_ab.py --adapter runs/x/train/adapter --data runs/x/data/bfcl \
      --out runs/ab --a "--grammar-backend outlines" --b "--grammar-backend llguidance" \
      [--engine vllm|hf] [--categories a,b] [--limit 8] [--max-tokens 256] [--concurrency 8]
(one flag alone is given with `=`: --b=--no-guard). Every run asks afresh: earlier answers in --out
are cleared, so times are never those of a resumed run.
Result: benchmarks/results/serve_eval_ab-NAME.json (NAME from the engine and settings)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CATEGORIES = "simple_python,multiple,parallel,irrelevance,live_simple,live_multiple"
METRICS = ("fcd_grammar_cache_misses_total", "fcd_grammar_compile_seconds_sum", "fcd_grammar_index_compiles",
           "fcd_completion_tokens_total", "fcd_jump_forward_tokens")


def _metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in METRICS:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def _answers(run_dir: Path) -> dict[str, Any]:
    from fcdistill.eval.runner import read_outputs

    return {i: (row.get("content"), row.get("tool_calls")) for i, row in read_outputs(run_dir / "outputs.jsonl").items()}


def _latencies(run_dir: Path) -> dict[str, float]:
    from fcdistill.eval.runner import read_outputs

    xs = sorted(row["latency_s"] for row in read_outputs(run_dir / "outputs.jsonl").values() if "latency_s" in row)
    if not xs:
        return {}
    return {"p50": round(statistics.median(xs), 2), "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2)}


def _slug(flags: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", flags).strip("_") or "default"


def main() -> None:
    from benchmarks.guard_eval import _served_args, student_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    student_args(ap)
    ap.add_argument("--a", required=True, help="extra `fcd serve` flags of the first setting")
    ap.add_argument("--b", required=True, help="... of the second")
    ap.add_argument("--categories", default=CATEGORIES)
    ap.add_argument("--limit", type=int, default=8, help="items per category")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()

    from fcdistill.eval.report import compare_runs
    from fcdistill.eval.runner import run_eval
    from fcdistill.serve.process import start_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    served, model = _served_args(args, out)
    settings = {"a": args.a, "b": args.b}
    runs: dict[str, Any] = {}
    for key, flags in settings.items():
        run_dir = out / f"{args.engine}-{key}-{_slug(flags)}"
        shutil.rmtree(run_dir, ignore_errors=True)
        with start_server(served + shlex.split(flags), out / f"serve-{key}.log", engine=args.engine,
                          timeout=900) as server:
            started = time.perf_counter()
            summary = run_eval(f"{server.url}/v1", model, args.data, args.categories.split(","), run_dir,
                               mode="fc", concurrency=args.concurrency, max_tokens=args.max_tokens,
                               label=f"{key}: {flags}", limit_per_category=args.limit, progress=False)
            seconds = round(time.perf_counter() - started, 1)
            metrics = _metrics(server.url)
        runs[key] = {"flags": flags, "dir": str(run_dir), "eval_seconds": seconds, "latency_s": _latencies(run_dir),
                     "server_metrics": metrics, "accuracy": {c: {k: v[k] for k in ("correct", "answered", "accuracy", "ci95")}
                                                             for c, v in summary["categories"].items()}}
        print(key, flags, seconds, "s", runs[key]["latency_s"], metrics, flush=True)

    compare_runs([Path(runs["a"]["dir"]), Path(runs["b"]["dir"])], out / f"compare-{args.engine}")
    paired = json.loads((out / f"compare-{args.engine}" / "compare.json").read_text())["runs"][1].get("vs_first")
    a, b = _answers(Path(runs["a"]["dir"])), _answers(Path(runs["b"]["dir"]))
    shared = sorted(set(a) & set(b))
    result = {
        "benchmark": "serve_eval_ab", "adapter": str(args.adapter), "engine": args.engine, "data": str(args.data),
        "categories": args.categories.split(","), "limit_per_category": args.limit, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()), "runs": runs,
        "answers_compared": len(shared), "answers_identical": sum(a[i] == b[i] for i in shared),
        "differing_ids": [i for i in shared if a[i] != b[i]][:50], "paired": paired,
    }
    path = Path(args.result or ROOT / "benchmarks" / "results" /
                f"serve_eval_ab-{args.engine}-{_slug(args.a)}-vs-{_slug(args.b)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"identical answers {result['answers_identical']}/{len(shared)}; wrote {path}")


if __name__ == "__main__":
    main()
