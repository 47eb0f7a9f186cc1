"""Training throughput of the real training path (fcdistill.train.sft: TRL SFTTrainer + PEFT LoRA).

SmolLM2-135M-Instruct on CPU, LoRA r=16 all-linear plus the FC token row, on prompt-completion pairs
rendered by the wire format from BFCL's own questions (simple_python, multiple, parallel,
parallel_multiple, irrelevance: the non-live categories we train on), so the sequence lengths follow
BFCL's distribution. Variants (`--variants`), measured side by side in one invocation, each in its
own process so that peak RSS is its own:
  - unpacked: padded batches of `--batch` examples, shuffled;
  - unpacked-grouped-by-length: the same, batches drawn from examples of similar length (less padding);
  - packed: TRL's best-fit-decreasing packing into one `--pack-length`-token row per step, fp32, LoRA
    dropout 0.05, attention over the whole row under a block-diagonal mask and the LM head scoring
    every position: the quickstart's setting when issue 12 was filed (the baseline of its 3x goal);
  - packed-bf16: the same with the frozen base in bf16 and no autocast (LoRA weights stay fp32);
  - packed-bf16-nodropout: and LoRA dropout 0 (PEFT then skips the dropout copy of every input);
  - +segments: and each packed example attended on its own (fcdistill/train/throughput.py);
  - +labelled-head: packed-bf16-nodropout with the LM head projecting only labelled positions;
  - fast-peft-token-rows: both, the FC token's row trained through PEFT's own path (a copy of the
    embedding matrix a forward for the input side and another for the LM head);
  - fast: both, and the FC row trained without those copies (the default from 2026-11-29);
  - fast+lora-bf16: and LoRA's matmuls in the bf16 activations' dtype (fp32 weights cast per forward);
  - fast+matmul-attention: fast with bf16 examples attended by two matmuls and an fp32 softmax instead
    of CPU SDPA's flash kernel;
  - fast+dense-head: fast with the LM head's CPU positions scored by one matmul and a log-softmax, the
    FC row taking its own gradient only (not TRL's tiles and a whole-matrix weight gradient);
  - faster: all of them (the training default now);
  - fast-fp32-peft-token-rows, fast-fp32, faster-fp32: the same in fp32 (CPUs without native bf16,
    e.g. AVX2 only; the LoRA dtype and matmul-attention changes apply to bf16 only);
  - grouped-bf16-nodropout: bf16, no dropout, unpacked batches grouped by length.
Each variant names the throughput changes it runs with (CHANGES); its child process turns the others
off, so it runs the training code as it was before them.
Every variant trains one epoch over the same examples, so each sees the same tokens and steps, then
reports its loss on `--eval-examples` held-out pairs. Reported: train tokens/s (real, non-padding
tokens, steady state: from the end of step 1 to the end of the last step), peak RSS of the process
(ru_maxrss), eval loss, steps, tokens, seconds, and the load average before and after.

GPU throughput and MFU: benchmarks/gpu_check.py (scripts/gpu/check.sh), run on a GPU box.

Usage: .venv/bin/python benchmarks/train_bench.py [--examples 64] [--steps N] [--variants a,b,...]
Writes benchmarks/results/train_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]


# -- data ------------------------------------------------------------------------------------------
def bfcl_pairs(work: Path, n: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """`n` prompt-completion pairs sampled (seeded) from BFCL's trainable categories, ground-truth targets,
    and `n_eval` others for the eval loss each variant reaches after the same steps."""
    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
    from fcdistill.data.export import export_split

    data = work / "data"
    prepare_bfcl(SplitOptions(categories=CATEGORIES, eval_fraction=0.5, mix_in_fraction=0.5, seed=seed), data)
    path, _, _ = export_split(data, "train", "trl", None, labels="ground-truth")
    rows = path.read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(rows)
    out, held = work / "bench.trl.jsonl", work / "bench-eval.trl.jsonl"
    out.write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
    held.write_text("\n".join(rows[n:n + n_eval]) + "\n", encoding="utf-8")
    return out, held


def length_stats(tokenizer: Any, path: Path, max_length: int | None = None) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = sorted(len(ids) for ids in tokenizer([r["prompt"] + r["completion"] for r in rows])["input_ids"])
    completions = [len(ids) for ids in tokenizer([r["completion"] for r in rows])["input_ids"]]

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    return {"examples": len(rows), "mean_tokens": round(sum(lengths) / len(rows), 1), "p50": pct(0.5),
            "p90": pct(0.9), "max": lengths[-1], "mean_completion_tokens": round(sum(completions) / len(rows), 1),
            "dropped_over_max_length": sum(n > max_length for n in lengths) if max_length else 0}


# -- one variant, in its own process ---------------------------------------------------------------
def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec` for a few steps through fcdistill.train.sft and time it from inside."""
    import resource

    from transformers import TrainerCallback

    from fcdistill.train.config import TrainConfig
    from fcdistill.train.sft import train

    marks: list[tuple[float, float, int]] = []

    class Timer(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs and "num_tokens" in logs and "loss" in logs:
                marks.append((time.perf_counter(), float(logs["num_tokens"]), state.global_step))

    cfg = TrainConfig.model_validate(spec["config"])
    t0 = time.perf_counter()
    trained = train(cfg, callbacks=[Timer()])
    wall = time.perf_counter() - t0
    if len(marks) < 2:
        raise RuntimeError("too few logged steps to time")
    (t_a, tok_a, step_a), (t_b, tok_b, step_b) = marks[0], marks[-1]
    result = {
        "name": spec["name"], "steps": step_b, "tokens": int(tok_b),
        "steps_timed": step_b - step_a, "tokens_timed": int(tok_b - tok_a),
        "seconds_timed": round(t_b - t_a, 2), "train_tokens_per_second": round((tok_b - tok_a) / (t_b - t_a), 1),
        "tokens_per_step": round((tok_b - tok_a) / (step_b - step_a), 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "wall_seconds_with_load": round(wall, 1), "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "batch_size": cfg.batch_size, "max_length": cfg.max_length, "packing": cfg.packing, "sampling": cfg.sampling,
        "attn_implementation": cfg.attn_implementation, "precision": cfg.precision, "lora_r": cfg.lora.r,
        "lora_dropout": cfg.lora.dropout, "throughput_changes": spec["changes"],
        "eval_loss": trained.metrics.get("eval_loss"),
        "final_train_loss": trained.metrics.get("train_loss"),
    }
    return result


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    use_throughput_changes(spec["changes"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    print("RESULT " + json.dumps(run_variant(spec)), flush=True)


def launch(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    path = work / f"{spec['name']}.spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"variant {spec['name']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def base_config(student: str, data: Path, eval_data: Path | None, out: Path, steps: int | None, *, batch: int,
                max_length: int, packing: bool, precision: str, attn: str, threads: int | None, sampling: str = "random",
                dropout: float = 0.05) -> dict[str, Any]:
    return {"student": student, "data": {"train": str(data), "eval": str(eval_data) if eval_data else None,
                                         "drop_overlength": True},
            "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
            "optim": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
            "epochs": 1, "max_steps": steps, "max_length": max_length, "batch_size": batch, "grad_accum": 1, "packing": packing,
            "precision": precision, "attn_implementation": attn, "num_threads": threads, "seed": 0, "sampling": sampling,
            "output_dir": str(out), "logging_steps": 1, "save_steps": 10_000, "tensorboard": False}


# The training path's throughput changes (fcdistill/train/throughput.py), each of which a variant can
# leave out: its child process then runs the path as it was before that change.
CHANGES = ("segments", "labelled_head", "copy_free", "lora_dtype", "matmul_attention", "dense_head")
BEFORE_DENSE = ("segments", "labelled_head", "copy_free")  # the default from 2026-11-29 to 2026-12-01


def variant(batch: int | None, packing: bool, sampling: str, precision: str, dropout: float,
            changes: tuple[str, ...] = CHANGES) -> dict[str, Any]:
    return {"batch": batch, "packing": packing, "sampling": sampling, "precision": precision, "dropout": dropout,
            "changes": list(changes)}


VARIANTS: dict[str, dict[str, Any]] = {
    "unpacked": variant(None, False, "random", "fp32", 0.05),
    "unpacked-grouped-by-length": variant(None, False, "group_by_length", "fp32", 0.05),
    "packed": variant(1, True, "random", "fp32", 0.05, ()),
    "packed-bf16": variant(1, True, "random", "bf16", 0.05, ()),
    "packed-bf16-nodropout": variant(1, True, "random", "bf16", 0.0, ()),
    "+segments": variant(1, True, "random", "bf16", 0.0, ("segments",)),
    "+labelled-head": variant(1, True, "random", "bf16", 0.0, ("labelled_head",)),
    "fast-peft-token-rows": variant(1, True, "random", "bf16", 0.0, ("segments", "labelled_head")),
    "fast": variant(1, True, "random", "bf16", 0.0, BEFORE_DENSE),
    "fast+lora-bf16": variant(1, True, "random", "bf16", 0.0, (*BEFORE_DENSE, "lora_dtype")),
    "fast+matmul-attention": variant(1, True, "random", "bf16", 0.0, (*BEFORE_DENSE, "matmul_attention")),
    "fast+dense-head": variant(1, True, "random", "bf16", 0.0, (*BEFORE_DENSE, "dense_head")),
    "faster": variant(1, True, "random", "bf16", 0.0),
    "fast-fp32-peft-token-rows": variant(1, True, "random", "fp32", 0.0, ("segments", "labelled_head")),
    "fast-fp32": variant(1, True, "random", "fp32", 0.0, BEFORE_DENSE),
    "faster-fp32": variant(1, True, "random", "fp32", 0.0),
    "grouped-bf16-nodropout": variant(None, False, "group_by_length", "bf16", 0.0),
}


def use_throughput_changes(changes: list[str]) -> None:
    """In a variant's own process: turn off the changes it measures without (the training code's old path)."""
    import fcdistill.train.sft as sft
    import fcdistill.train.throughput as throughput

    unknown = set(changes) - set(CHANGES)
    if unknown:
        raise ValueError(f"unknown throughput changes: {sorted(unknown)}")
    if "segments" not in changes:
        sft.register_packed_sdpa = lambda: "sdpa"
    if "labelled_head" not in changes:
        sft.score_only_labelled_positions = lambda: False
    if "copy_free" not in changes:
        sft.trainable_tokens_without_copies = lambda model: 0
    if "lora_dtype" not in changes:
        sft.lora_in_activation_dtype = lambda model: 0
    if "matmul_attention" not in changes:
        throughput.LOW_PRECISION_MATMUL_ATTENTION = False
    if "dense_head" not in changes:
        sft.dense_cpu_lm_head = lambda: False


# -- parts -----------------------------------------------------------------------------------------
def cpu_part(args: argparse.Namespace, work: Path, data: Path, eval_data: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from fcdistill.models import cpu_has_native_bf16, ensure_fc_token, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ensure_fc_token(tok, "<tool_call>")
    threads = args.threads or os.cpu_count()
    loadavg_before = round(os.getloadavg()[0], 2)  # other work on the machine skews CPU timings: recorded
    variants = {}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        cfg = base_config("smollm2-135m", data, eval_data, work / name, args.steps, batch=v["batch"] or args.batch,
                          max_length=args.pack_length if v["packing"] else args.max_length, packing=v["packing"],
                          precision=v["precision"], attn="sdpa", threads=threads, sampling=v["sampling"],
                          dropout=v["dropout"])
        print(f"cpu: {name} ...", file=sys.stderr, flush=True)
        variants[name] = launch({"name": name, "config": cfg, "threads": threads, "changes": v["changes"]}, work)
        print(f"  {variants[name]}", file=sys.stderr, flush=True)
    base = variants.get("packed") or next(iter(variants.values()))
    ratios = {f"{n}_vs_{base['name']}": {
        "tokens_per_second": round(v["train_tokens_per_second"] / base["train_tokens_per_second"], 3),
        "peak_rss": round(v["peak_rss_gb"] / base["peak_rss_gb"], 3),
        "eval_loss_difference": round(v["eval_loss"] - base["eval_loss"], 4)} for n, v in variants.items() if v is not base}
    return {"model": "SmolLM2-135M-Instruct", "threads": threads, "loadavg_1min_before": loadavg_before,
            "loadavg_1min_after": round(os.getloadavg()[0], 2), "cpu": platform.processor() or platform.machine(),
            "cpu_native_bf16": cpu_has_native_bf16(), "cores": os.cpu_count(),
            "data": length_stats(tok, data, args.max_length), "eval_examples": sum(1 for _ in eval_data.open()),
            "variants": list(variants.values()), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=64, help="BFCL pairs sampled for the run")
    parser.add_argument("--steps", type=int, default=None,
                        help="cap on optimizer steps per CPU variant (default: one epoch over the same examples)")
    parser.add_argument("--batch", type=int, default=4, help="unpacked batch size (CPU)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--pack-length", type=int, default=1024, help="tokens per packed row (CPU, batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--eval-examples", type=int, default=32, help="held-out pairs for each variant's eval loss")
    parser.add_argument("--variants", default="packed,fast,fast+lora-bf16,fast+matmul-attention,fast+dense-head,faster",
                        help=f"comma-separated, side by side in this order: {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_bench.json")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    with tempfile.TemporaryDirectory(prefix="fcd-train-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("BFCL_PROJECT_ROOT", str(work / "bfcl"))
        data, eval_data = bfcl_pairs(work, args.examples, args.eval_examples, args.seed)
        result: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "command": " ".join(["benchmarks/train_bench.py", *sys.argv[1:]]),
                                  "versions": __import__("fcdistill.train.sft", fromlist=["_versions"])._versions(),
                                  "cpu": cpu_part(args, work, data, eval_data)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["cpu"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
