"""What the budget-aware, loop-proof grammar changes on BFCL: one trained student, guard off vs on.

The same adapter is served twice by `fcd serve` (once with `--no-guard`, once with the default
guard) and `fcd eval run`'s runner asks both the same held-out questions. Per category the result
holds accuracy with its Wilson CI95, answers cut at max_tokens (split into cut inside a tool call,
which the guard exists to prevent, and cut inside free text, which no grammar constrains), the
guard's forced closes by reason, and the McNemar comparison of the two runs.

Both runs are resumable (answered ids are skipped), so a killed benchmark continues where it
stopped. The vllm engine serves the student merged (vLLM's LoRA cannot add the FC token); the hf
engine serves the adapter itself.

Usage:
  .venv/bin/python benchmarks/guard_eval.py --adapter runs/x/train/adapter --data runs/x/data \
      --out runs/guard-eval [--engine vllm|hf] [--categories a,b] [--max-tokens 256] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULT = ROOT / "benchmarks" / "results" / "guard_eval.json"
CATEGORIES = "live_simple,live_multiple,simple_python,irrelevance,live_irrelevance"


def _cuts(outputs: Path) -> dict[str, dict[str, int]]:
    """Per category: answers cut at max_tokens inside a tool call vs inside free text."""
    from fcdistill.eval.runner import read_outputs

    cuts: dict[str, dict[str, int]] = {}
    for row in read_outputs(outputs).values():
        c = cuts.setdefault(row["category"], {"cut_in_call": 0, "cut_in_text": 0})
        if row.get("finish_reason") == "length":
            in_call = bool(row.get("tool_calls")) or "<tool_call>" in (row.get("content") or "")
            c["cut_in_call" if in_call else "cut_in_text"] += 1
    return cuts


def _served_args(args: argparse.Namespace, out: Path) -> tuple[list[str], str]:
    """Server arguments and the model name requests use."""
    if args.engine == "hf":
        return ["--model", args.base, "--adapter", f"tuned={args.adapter}"], "tuned"
    from fcdistill.train.export import merge_adapter

    merged = out / "merged"
    if not (merged / "config.json").is_file():
        merge_adapter(args.adapter, merged, overwrite=True)
    return ["--model", str(merged), "--served-model-name", "tuned"], "tuned"


def student_args(ap: argparse.ArgumentParser) -> None:
    """The options of a benchmark that serves one trained student and evaluates it (`_served_args`)."""
    ap.add_argument("--adapter", required=True, help="trained adapter (fcd train's adapter/ or a checkpoint-N/)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="data dir of `fcd data bfcl` (its eval split is asked)")
    ap.add_argument("--out", required=True, help="run directory (eval runs, server logs, merged model)")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    student_args(ap)
    ap.add_argument("--categories", default=CATEGORIES)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="ask only the first N items per category (a smoke run)")
    ap.add_argument("--result", default=str(RESULT))
    args = ap.parse_args()

    from fcdistill.eval.report import compare_runs
    from fcdistill.eval.runner import run_eval
    from fcdistill.serve.process import start_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    served, model = _served_args(args, out)
    runs: dict[str, Any] = {}
    for state in ("off", "on"):
        run_dir = out / f"guard-{state}"
        summary_path = run_dir / "summary.json"
        if summary_path.is_file() and json.loads(summary_path.read_text()).get("complete"):
            runs[state] = {"dir": run_dir, "summary": json.loads(summary_path.read_text()), "seconds": None}
            continue
        flags = served + ([] if state == "on" else ["--no-guard"])
        started = time.time()
        with start_server(flags, out / f"serve-{state}.log", engine=args.engine, timeout=900) as server:
            summary = run_eval(f"{server.url}/v1", model, args.data, args.categories.split(","), run_dir,
                               mode="fc", concurrency=args.concurrency, max_tokens=args.max_tokens,
                               label=f"guard-{state}", limit_per_category=args.limit, progress=False)
        runs[state] = {"dir": run_dir, "summary": summary, "seconds": round(time.time() - started, 1)}

    table = compare_runs([runs["off"]["dir"], runs["on"]["dir"]], out / "compare")
    paired = json.loads((out / "compare" / "compare.json").read_text())["runs"][1].get("vs_first")
    categories: dict[str, Any] = {}
    for state, run in runs.items():
        cuts = _cuts(run["dir"] / "outputs.jsonl")
        for cat, c in run["summary"]["categories"].items():
            categories.setdefault(cat, {})[f"guard_{state}"] = {
                "correct": c["correct"], "answered": c["answered"], "accuracy": c["accuracy"], "ci95": c["ci95"],
                "cut": c["cut"], **cuts.get(cat, {}), "forced_close": c["forced_close"]}
    result = {
        "benchmark": "guard_eval",
        "adapter": str(args.adapter),
        "engine": args.engine,
        "data": str(args.data),
        "max_tokens": args.max_tokens,
        "limit_per_category": args.limit,
        "concurrency": args.concurrency,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "seconds": {state: run["seconds"] for state, run in runs.items()},
        "categories": categories,
        "paired": paired,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(table)
    for cat, both in categories.items():
        print(cat, {s: (v["correct"], v["answered"], v["cut_in_call"], v["cut_in_text"], v["forced_close"])
                    for s, v in both.items()})
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
