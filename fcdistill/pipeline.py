"""`fcd quickstart`: BFCL data -> augment -> LoRA-train SmolLM2 -> serve base and adapter -> evaluate both -> compare.

Each stage writes into the run directory and is skipped when its output is already there, so a
killed quickstart resumes where it stopped (training resumes from its last checkpoint). The default
settings fit a 2-core CPU in about 20 minutes: a stratified sample of the train split, a short
training run and a few eval items per category. `--full` trains on the whole augmented train split
for several epochs (a killed run resumes from its last checkpoint on the next invocation, so training
can span several sessions) and evaluates every held-out item plus larger live samples: the real
measurement.

A rerun into the same directory with other options (`--full` after the default run, another seed or
engine) does not reuse outputs made for the old ones: OUT/stages.json records what each stage ran
with; cheap stages run again, training and evaluation answers are refused (see StageRecords).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel

TRAIN_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
TRAIN_ONLY_LANGUAGES = ["simple_java", "simple_javascript"]  # their train halves teach Java/JS argument types
LIVE_CATEGORIES = ["live_simple", "live_multiple", "live_irrelevance"]
CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "smollm2-135m-cpu.yaml"


STAGES_FILE = "stages.json"


class QuickstartError(ValueError):
    """A rerun into a run directory whose outputs were made with other options; the CLI prints it (exit 2)."""


class StageRecords:
    """What each stage of a run directory was run with, in OUT/stages.json, so a rerun with other
    options neither reuses an output made for different ones nor mixes two runs.

    Each stage is recorded before it runs (a killed stage resumes only under the same options) with
    its own options and the stages it reads from; its key folds in theirs, so a change upstream is a
    change downstream. A stage whose output exists under other options is run again when it is cheap
    (data, augmentation, exports, the merge) and refused when it holds hours of work (training,
    evaluation answers): the caller then names another --out or deletes the stage's folder. A run
    directory made before stages were recorded has no record: its outputs are taken as matching (it
    resumes as before), with a warning, and recorded from then on.
    """

    def __init__(self, out: Path, say: Callable[[str], None]):
        self.path = out / STAGES_FILE
        self.say = say
        self.recorded: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.wanted: dict[str, dict] = {}
        self._warned = False

    def want(self, stage: str, options: dict, after: list[str] = ()) -> None:
        """Declare a stage's options (and the stages it reads) before anything runs."""
        key = json.dumps({"options": options, "after": {a: self.wanted[a]["key"] for a in after}}, sort_keys=True)
        self.wanted[stage] = {"options": options, "after": list(after),
                              "key": hashlib.sha256(key.encode()).hexdigest()[:16]}

    def changed(self, stage: str) -> bool:
        old = self.recorded.get(stage)
        return old is not None and old["key"] != self.wanted[stage]["key"]

    def why(self, stage: str) -> str:
        """The stage's own options that changed, else the upstream stages that did."""
        old, new = self.recorded[stage]["options"], self.wanted[stage]["options"]
        own = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        if own:
            return ", ".join(own)
        inputs = [f"{a} ({self.why(a)})" if self.changed(a) else a for a in self.wanted[stage]["after"]
                  if self.changed(a) or a not in self.recorded]
        return "its input changed: " + ", ".join(inputs)

    def check(self, expensive: dict[str, bool]) -> None:
        """Refuse, before anything runs, when a stage holding hours of work (present: True) would be
        redone under other options."""
        clash = [s for s, present in expensive.items() if present and self.changed(s)]
        if clash:
            parts = "; ".join(f"{s} ({self.why(s)})" for s in clash)
            dirs = " and ".join(str(self.path.parent / s) for s in clash)
            raise QuickstartError(f"{self.path.parent} holds a run made with other options, not mixing the two: {parts}. "
                                  f"Use another --out for this run, or delete {dirs} to redo "
                                  f"{'them' if len(clash) > 1 else 'it'} here")

    def begin(self, stage: str, exists: bool) -> bool:
        """Record the stage as starting; True when its existing output is reused, False when it runs
        (cheap stages whose options changed run again, and say so)."""
        reuse = exists
        if exists and stage not in self.recorded:
            if not self._warned:
                self.say(f"warning: {self.path.parent} has no record of the options its stages ran with (made "
                         "before fcdistill recorded them): its outputs are reused as they are")
                self._warned = True
        elif exists and self.changed(stage):
            self.say(f"rerunning {stage}: {self.why(stage)}")
            reuse = False
        self.recorded[stage] = self.wanted[stage]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.recorded, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)
        return reuse


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

    # -- what each stage is run with, checked against what the directory holds before anything runs
    data_dir = out / "data"
    train_data = out / "data-aug" if opts.augment_multiplier else data_dir
    train_file = train_data / "export" / "train.trl.jsonl"
    sample = train_data / "export" / f"train.sample{opts.train_examples}.trl.jsonl"
    train_dir = out / "train"
    adapter = train_dir / "adapter"
    merged = train_dir / "merged"
    limit = opts.eval_per_category if opts.eval_per_category is not None else (None if opts.full else 5)
    categories = TRAIN_CATEGORIES + LIVE_CATEGORIES
    stages = StageRecords(out, say)
    stages.want("data", {"categories": TRAIN_CATEGORIES + TRAIN_ONLY_LANGUAGES + LIVE_CATEGORIES, "seed": opts.seed,
                         "live_sample": opts.live_sample})
    if opts.augment_multiplier:
        stages.want("data-aug", {"multiplier": opts.augment_multiplier, "seed": opts.seed}, ["data"])
    stages.want("export", {"format": "trl", "labels": "ground-truth"}, ["data-aug" if opts.augment_multiplier else "data"])
    train_from = "export"
    if not opts.full:
        stages.want("sample", {"examples": opts.train_examples, "seed": opts.seed}, ["export"])
        train_from = "sample"
    train_options = {"full": opts.full, "config": CPU_CONFIG.name}
    train_options.update({"epochs": opts.epochs} if opts.full else {"steps": opts.train_steps})
    stages.want("train", train_options, [train_from])
    if opts.engine == "vllm":
        stages.want("train/merged", {"merge": True}, ["train"])
    tuned_from = "train/merged" if opts.engine == "vllm" else "train"
    stages.want("eval/base", {"engine": opts.engine, "model": "smollm2-135m", "max_tokens": 256}, ["data"])
    stages.want("eval/tuned", {"engine": opts.engine, "model": "tuned", "max_tokens": 256}, ["data", tuned_from])
    has_train = (adapter / "adapter_config.json").is_file() or any(train_dir.glob("checkpoint-*"))
    stages.check({"train": has_train, **{f"eval/{label}": (out / "eval" / label / "outputs.jsonl").is_file()
                                         for label in ("base", "tuned")}})

    stage("1/5 data: BFCL split (non-live trained, live held out)")
    if not stages.begin("data", (data_dir / "manifest.json").is_file()):
        shutil.rmtree(data_dir, ignore_errors=True)
        prepare_bfcl(SplitOptions(categories=TRAIN_CATEGORIES + TRAIN_ONLY_LANGUAGES + LIVE_CATEGORIES, seed=opts.seed,
                                  max_per_category={c: opts.live_sample for c in LIVE_CATEGORIES}), data_dir)
    if opts.augment_multiplier and not stages.begin("data-aug", (train_data / "manifest.json").is_file()):
        stage(f"1/5 data: augmenting the train split (x{opts.augment_multiplier}: masked names, distractors, "
              "composed and deleted calls, swapped values)")
        shutil.rmtree(train_data, ignore_errors=True)
        run_augment(AugmentOptions(data=data_dir, out=train_data, seed=opts.seed,
                                   multiplier=opts.augment_multiplier))
    if not stages.begin("export", train_file.is_file()):
        export_split(train_data, "train", "trl", train_file, labels="ground-truth")
    if not opts.full:
        if not stages.begin("sample", sample.is_file()):
            _sample_train(train_file, sample, opts.train_examples, opts.seed, TRAIN_CATEGORIES)  # the evaluated ones
        train_file = sample

    stage("2/5 train: LoRA SFT of SmolLM2-135M around the FC token (CPU)")
    stages.begin("train", has_train)  # a changed one was refused above
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

    runs = []

    def evaluate(url: str, model: str, label: str) -> None:
        stage(f"{4 + len(runs)}/5 eval: {label} on held-out BFCL "
              f"({'all items' if limit is None else f'up to {limit} per category'})")
        run_dir = out / "eval" / label
        stages.begin(f"eval/{label}", (run_dir / "outputs.jsonl").is_file())  # a changed one was refused above
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

        if not stages.begin("train/merged", (merged / "config.json").is_file()):
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

