"""`fcd quickstart`: BFCL data -> augment -> LoRA-train SmolLM2 -> serve base and adapter -> evaluate both -> compare.

Each stage writes into the run directory and is skipped when its output is already there, so a
killed quickstart resumes where it stopped (training resumes from its last checkpoint). The default
settings fit a 2-core CPU in about 20 minutes: a stratified sample of the train split, a short
training run and a few eval items per category. `--full` trains on the whole augmented train split
for several epochs (a killed run resumes from its last checkpoint on the next invocation, so training
can span several sessions) and evaluates every held-out item plus larger live samples: the real
measurement.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel

TRAIN_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
TRAIN_ONLY_LANGUAGES = ["simple_java", "simple_javascript"]  # their train halves teach Java/JS argument types
LIVE_CATEGORIES = ["live_simple", "live_multiple", "live_irrelevance"]
CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "smollm2-135m-cpu.yaml"


class QuickstartOptions(BaseModel):
    out: Path = Path("runs/quickstart")
    full: bool = False
    seed: int = 42
    train_examples: int = 96  # default run: a stratified sample of the train split
    train_steps: int = 32  # packed 1024-token rows: about one epoch of the sample
    eval_per_category: int | None = None  # None: 5 in the default run, every held-out item with --full
    live_sample: int = 50  # live items drawn into the eval split (never trained on)
    augment_multiplier: int = 2  # augmented records tried per train record (`fcd data augment`); 0: none
    epochs: float = 3.0  # --full: passes over the augmented train split
    concurrency: int = 8
    port: int | None = None
    engine: Literal["hf", "vllm"] = "hf"

    def resolved(self) -> "QuickstartOptions":
        if self.full:
            return self.model_copy(update={"live_sample": max(self.live_sample, 200)})
        return self


def _sample_train(src: Path, dst: Path, n: int, seed: int, categories: list[str]) -> int:
    """A seeded sample of `n` prompt-completion rows of `categories`, stratified by BFCL category (from the id)."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        if (category := r["id"].rsplit("_", 1)[0]) in categories:
            by_cat.setdefault(category, []).append(r)
    rng = random.Random(seed)
    picked: list[dict] = []
    cats = sorted(by_cat)
    for i, cat in enumerate(cats):
        share = n // len(cats) + (1 if i < n % len(cats) else 0)
        picked += rng.sample(by_cat[cat], min(share, len(by_cat[cat])))
    rng.shuffle(picked)
    dst.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in picked))
    return len(picked)


def run_quickstart(opts: QuickstartOptions, say: Callable[[str], None] = print) -> str:
    """Run every stage; returns the comparison table (Markdown)."""
    from fcdistill.data.augment import AugmentOptions, run_augment
    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
    from fcdistill.data.export import export_split
    from fcdistill.eval import compare_runs, run_eval
    from fcdistill.serve.process import start_server
    from fcdistill.train.sft import run as train_run

    opts = opts.resolved()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def stage(name: str) -> None:
        say(f"[{time.time() - started:6.0f}s] {name}")

    data_dir = out / "data"
    stage("1/5 data: BFCL split (non-live trained, live held out)")
    if not (data_dir / "manifest.json").is_file():
        prepare_bfcl(SplitOptions(categories=TRAIN_CATEGORIES + TRAIN_ONLY_LANGUAGES + LIVE_CATEGORIES, seed=opts.seed,
                                  max_per_category={c: opts.live_sample for c in LIVE_CATEGORIES}), data_dir)
    train_data = data_dir
    if opts.augment_multiplier:
        train_data = out / "data-aug"
        if not (train_data / "manifest.json").is_file():
            stage(f"1/5 data: augmenting the train split (x{opts.augment_multiplier}: masked names, distractors, "
                  "composed and deleted calls, swapped values)")
            run_augment(AugmentOptions(data=data_dir, out=train_data, seed=opts.seed,
                                       multiplier=opts.augment_multiplier))
    train_file = train_data / "export" / "train.trl.jsonl"
    if not train_file.is_file():
        export_split(train_data, "train", "trl", train_file, labels="ground-truth")
    if not opts.full:
        sample = train_data / "export" / f"train.sample{opts.train_examples}.trl.jsonl"
        if not sample.is_file():
            _sample_train(train_file, sample, opts.train_examples, opts.seed, TRAIN_CATEGORIES)  # the evaluated ones
        train_file = sample

    stage("2/5 train: LoRA SFT of SmolLM2-135M around the FC token (CPU)")
    train_dir = out / "train"
    adapter = train_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        overrides = [f"data.train={train_file}", f"output_dir={train_dir}", "tensorboard=false"]
        if not opts.full:
            overrides += [f"max_steps={opts.train_steps}", "optim.learning_rate=2.0e-3",
                          "optim.warmup_ratio=0.1", "optim.scheduler=linear", "data.eval_fraction=0.0", "eval_steps=null",
                          "grad_accum=1", f"save_steps={max(1, opts.train_steps // 3)}"]
        else:
            overrides += [f"epochs={opts.epochs}"]
        has_checkpoint = any(train_dir.glob("checkpoint-*"))
        train_run(CPU_CONFIG, resume=has_checkpoint, overrides=overrides)

    limit = opts.eval_per_category if opts.eval_per_category is not None else (None if opts.full else 5)
    categories = TRAIN_CATEGORIES + LIVE_CATEGORIES
    runs = []

    def evaluate(url: str, model: str, label: str) -> None:
        stage(f"{4 + len(runs)}/5 eval: {label} on held-out BFCL "
              f"({'all items' if limit is None else f'up to {limit} per category'})")
        run_dir = out / "eval" / label
        run_eval(f"{url}/v1", model, data_dir, categories, run_dir, mode="fc", concurrency=opts.concurrency,
                 max_tokens=256, limit_per_category=limit, label=label)
        runs.append(run_dir)

    if opts.engine == "hf":
        stage("3/5 serve: base and adapter from one server (hf engine)")
        with start_server(["--model", "smollm2-135m", "--adapter", f"tuned={adapter}"], out / "serve.log",
                          port=opts.port, timeout=300) as server:
            evaluate(server.url, "smollm2-135m", "base")
            evaluate(server.url, "tuned", "tuned")
    else:
        # vLLM's LoRA cannot add the FC token: the tuned student is served merged, after the base
        from fcdistill.train.export import merge_adapter

        merged = train_dir / "merged"
        if not (merged / "config.json").is_file():
            stage("3/5 serve: merging the adapter for the vllm engine")
            merge_adapter(adapter, merged, overwrite=True)
        for model, label, args in (("smollm2-135m", "base", ["--model", "smollm2-135m"]),
                                   ("tuned", "tuned", ["--model", str(merged), "--served-model-name", "tuned"])):
            if (out / "eval" / label / "summary.json").is_file() and \
                    json.loads((out / "eval" / label / "summary.json").read_text()).get("complete"):
                runs.append(out / "eval" / label)
                continue
            stage(f"3/5 serve: {label} on the vllm engine")
            with start_server(args, out / f"serve-{label}.log", engine="vllm", port=opts.port, timeout=900) as server:
                evaluate(server.url, model, label)
    table = compare_runs(runs, out / "eval" / "compare")
    stage(f"done in {(time.time() - started) / 60:.1f} min; report in {out / 'eval' / 'compare'}")
    return table

