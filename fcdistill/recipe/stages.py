"""What each recipe stage reads, decides on, runs and writes.

A stage is declared by five functions of the recipe: the stages it reads (`after`), the user files it
reads (`files`, hashed into its key), the options that decide its output (`config`), a one-line plan
(`describe`), and `run`, which does the work in RUN/STAGE/ by calling the same functions as the
stage's own command, and returns its counts. `outputs` names what the next stages read; their
digest goes into the next stages' keys. Every `run` resumes a killed attempt where its command does
(labels, synth requests, training checkpoints, eval answers).
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcdistill.recipe.model import WHEN_SET, EvalModel, Recipe


class StageFailed(RuntimeError):
    """A stage that stopped and resumes when the recipe is run again (exit 1)."""


class Stopped(BaseException):
    """A signal stopped the run (SIGTERM; Ctrl-C raises KeyboardInterrupt instead). A BaseException like
    KeyboardInterrupt, so no stage's `except Exception` swallows it and every server and child process
    stops on the way out; the stage resumes when the recipe is run again."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@dataclass
class Context:
    recipe: Recipe
    out: Path
    say: Callable[[str], None]

    def dir(self, stage: str) -> Path:
        return self.out / stage

    @property
    def bfcl_dir(self) -> Path:
        return self.out / "data" / "bfcl"

    def teacher(self) -> Any:
        from fcdistill.teacher.config import TeacherConfig

        return TeacherConfig.model_validate({"progress": False, **(self.recipe.teacher or {})})


@dataclass
class Stage:
    after: Callable[[Recipe], list[str]]
    files: Callable[[Recipe], list[Path]]
    config: Callable[[Recipe], dict[str, Any]]
    describe: Callable[[Recipe], str]
    run: Callable[[Context], dict[str, Any]]
    outputs: Callable[[Context], list[Path]]


def _dump(model: Any) -> Any:
    """A recipe section as its stage's key sees it. A field marked WHEN_SET (one added after run
    directories existed) counts only when set away from its default: upgrading fcdistill must not turn
    a finished stage's key stale, which would rerun it and clear what it made."""
    if model is None:
        return None
    return _without_unset_additions(model, json.loads(model.model_dump_json()))


def _without_unset_additions(model: Any, dumped: Any) -> Any:
    from pydantic import BaseModel

    if not isinstance(model, BaseModel) or not isinstance(dumped, dict):
        return dumped
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(WHEN_SET)
                and value == field.get_default(call_default_factory=True)):
            dumped.pop(field.alias or name, None)
        elif name in dumped:
            dumped[name] = _without_unset_additions(value, dumped[name])
    return dumped


def _teacher_identity(r: Recipe) -> dict[str, Any]:
    """What decides a teacher's answers (not its concurrency, timeouts or cache)."""
    t = r.teacher or {}
    return {k: t.get(k) for k in ("base_url", "model", "mode", "structured", "temperature", "max_tokens", "seed",
                                  "extra_body")}


def _bfcl_train_source(r: Recipe) -> str:
    """The stage whose directory holds the BFCL train split that training (or augment) reads."""
    return "label" if r.label.source == "teacher" else "data"


def _train_inputs(r: Recipe) -> list[str]:
    bfcl = ["augment"] if r.augment is not None else [_bfcl_train_source(r)] if r.data.bfcl is not None else []
    return bfcl + [s for s in ("synth", "verify") if getattr(r, s) is not None]


def _data_dir_of(ctx: Context, stage: str) -> Path:
    return {"data": ctx.bfcl_dir, "label": ctx.dir("label"), "augment": ctx.dir("augment")}[stage]


# -- data ---------------------------------------------------------------------------------------------
def _data_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl

    r, counts = ctx.recipe, {}
    if r.data.bfcl is not None:
        b = r.data.bfcl
        res = prepare_bfcl(SplitOptions(categories=b.categories, eval_only=b.eval_only, eval_fraction=b.eval_fraction,
                                        live_eval_only=b.live_eval_only, mix_in_fraction=b.mix_in,
                                        max_per_category=b.max_per_category, eval_per_category=b.eval_per_category,
                                        seed=r.seed, optional_args=b.optional_args),
                           ctx.bfcl_dir)
        for warning in res.warnings:
            ctx.say(f"warning: {warning}")
        manifest = json.loads((ctx.bfcl_dir / "manifest.json").read_text())
        counts.update({split: len(ids) for split, ids in manifest["splits"].items()})
    if r.data.tools is not None:
        user = ctx.dir("data") / "user"
        user.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.data.tools, user / "tools.json")
        shutil.copyfile(r.data.seeds, user / "seeds.jsonl")
        counts["tools"] = len(json.loads(r.data.tools.read_text()))
        counts["seeds"] = sum(1 for line in r.data.seeds.read_text().splitlines() if line.strip())
    return counts


def _data_config(r: Recipe) -> dict[str, Any]:
    from fcdistill.bfcl_env import bfcl_version

    return {"bfcl": _dump(r.data.bfcl), "seed": r.seed,
            "bfcl_eval": bfcl_version() if r.data.bfcl is not None else None}


def _data_describe(r: Recipe) -> str:
    parts = []
    if r.data.bfcl is not None:
        b = r.data.bfcl
        caps = f", caps {b.max_per_category}" if b.max_per_category else ""
        caps += f", eval items {b.eval_per_category}" if b.eval_per_category else ""
        caps += "" if b.live_eval_only else ", live categories trained on"
        parts.append(f"BFCL {', '.join(b.categories)} (eval share {b.eval_fraction}{caps})")
    if r.data.tools is not None:
        parts.append(f"your tools {r.data.tools} and seeds {r.data.seeds}")
    return " + ".join(parts)


# -- label --------------------------------------------------------------------------------------------
def _label_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.data.bfcl import read_records
    from fcdistill.data.labels import TEACHER_LABELED, apply_teacher_labels
    from fcdistill.jsonl import write_jsonl_atomic
    from fcdistill.teacher.label import LabelOptions, run_label
    from fcdistill.teacher.templates import load_templates

    out = ctx.dir("label")
    opts = LabelOptions(data=ctx.bfcl_dir, out=out / "labels", **ctx.recipe.label.options)
    summary = run_label(ctx.teacher(), opts, load_templates(None))
    ctx.say(summary.text())
    if summary.teacher_errors:
        raise StageFailed(f"label: {summary.teacher_errors} items failed at the teacher after retries; run the "
                          "recipe again to resume")
    # A data dir of its own: the teacher's labels applied, items the teacher did not label left out
    # (BFCL's answers to them are not ours to train on), the eval split as it was.
    records, _ = apply_teacher_labels(read_records(ctx.bfcl_dir, "train"), out)
    kept = [rec for rec in records if rec.label_source in ("ground_truth", TEACHER_LABELED)]
    write_jsonl_atomic(out / "train.jsonl", [json.loads(rec.model_dump_json(exclude_none=True)) for rec in kept])
    for name in ("eval.jsonl", "manifest.json"):
        shutil.copyfile(ctx.bfcl_dir / name, out / name)
    return {"teacher_labeled": sum(rec.label_source == TEACHER_LABELED for rec in kept),
            "ground_truth": sum(rec.label_source == "ground_truth" for rec in kept),
            "left_out": len(records) - len(kept)}


# -- synth and verify ---------------------------------------------------------------------------------
def _synth_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.teacher.inputs import Domain, SynthOptions, load_seeds, load_tools
    from fcdistill.teacher.synth import run_synth
    from fcdistill.teacher.templates import load_templates

    r = ctx.recipe
    user = ctx.dir("data") / "user"
    specs = load_tools(user / "tools.json")
    opts = SynthOptions(out=ctx.dir("synth"), eval_data=ctx.bfcl_dir if r.data.bfcl is not None else None,
                        seed=r.seed, export=["openai"], model=r.student, fc_token=r.fc_token, **r.synth.options)
    result = run_synth(ctx.teacher(), opts, load_templates(None), Domain(specs, load_seeds(user / "seeds.jsonl", specs)))
    ctx.say(result.text())
    if result.teacher_errors:
        raise StageFailed(f"synth: {result.teacher_errors} examples failed at the teacher after retries; run the "
                          "recipe again to resume")
    return {split: _count_lines(ctx.dir("synth") / f"{split}.jsonl") for split in ("train", "val")}


def _verify_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.teacher.inputs import VerifyOptions
    from fcdistill.teacher.templates import load_templates
    from fcdistill.teacher.verify import run_verify

    r = ctx.recipe
    opts = VerifyOptions(input=r.verify.input, out=ctx.dir("verify"), progress=False,
                         eval_data=ctx.bfcl_dir if r.data.bfcl is not None else None, **r.verify.options)
    table = run_verify(ctx.teacher() if r.teacher else None, opts, load_templates(None))
    return {"verified": table.kept, "rejected": table.generated - table.kept}


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


# -- augment ------------------------------------------------------------------------------------------
def _augment_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.data.augment import AugmentOptions, run_augment

    a = ctx.recipe.augment
    extra: dict[str, Any] = {"transforms": a.transforms} if a.transforms is not None else {}
    if a.max_length is not None:
        extra.update(max_length=a.max_length, model=ctx.recipe.student, fc_token=ctx.recipe.fc_token)
    result = run_augment(AugmentOptions(data=_data_dir_of(ctx, _bfcl_train_source(ctx.recipe)), out=ctx.dir("augment"),
                                        seed=ctx.recipe.seed, multiplier=a.multiplier, dedup_threshold=a.dedup_threshold,
                                        ngram=a.ngram, **extra))
    original = result.stats.get("original", {}).get("out", 0)
    return {"written": result.written, "original": original, "augmented": result.written - original}


# -- train --------------------------------------------------------------------------------------------
def sample_rows(rows: list[dict[str, Any]], n: int, seed: int, categories: list[str] | None) -> list[dict[str, Any]]:
    """A seeded sample of `n` prompt-completion rows, stratified by category (read from the id)."""
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        category = row["id"].rsplit("_", 1)[0]
        if categories is None or category in categories:
            by_cat.setdefault(category, []).append(row)
    rng = random.Random(seed)
    picked: list[dict[str, Any]] = []
    cats = sorted(by_cat)
    for i, cat in enumerate(cats):
        share = n // len(cats) + (1 if i < n % len(cats) else 0)
        picked += rng.sample(by_cat[cat], min(share, len(by_cat[cat])))
    rng.shuffle(picked)
    return picked


def training_rows(ctx: Context) -> list[dict[str, Any]]:
    """Prompt-completion pairs from every training input, rendered by the wire format's one module."""
    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import Record, read_records
    from fcdistill.data.export import select_records, trl_records
    from fcdistill.models import ensure_fc_token, load_tokenizer

    r = ctx.recipe
    tokenizer = load_tokenizer(r.student)
    ensure_fc_token(tokenizer, r.fc_token)
    chat = ChatFormat(tokenizer, fc_token=r.fc_token)
    records: list[Record] = []
    for source in _train_inputs(r):
        if source in ("data", "label", "augment"):
            records += select_records(read_records(_data_dir_of(ctx, source), "train"), "train", "ground-truth")[0]
        else:
            path = ctx.dir(source) / ("train.jsonl" if source == "synth" else "verified.jsonl")
            records += [Record.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip()]
    rows = [row for rec in records for row in trl_records(chat, rec)]
    if r.train.sample is not None:
        rows = sample_rows(rows, r.train.sample.examples, r.seed, r.train.sample.categories)
    return rows


def _use_accelerate(r: Recipe) -> bool:
    t = r.train
    if t.launcher != "auto":
        return t.launcher == "accelerate"
    if t.accelerate_config is None:
        return False
    import torch

    return torch.cuda.is_available()


def _train_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.jsonl import write_jsonl_atomic
    from fcdistill.recipe.model import _yaml_scalar
    from fcdistill.train.sft import find_checkpoint

    r, out = ctx.recipe, ctx.dir("train")
    data = out / "data" / "train.trl.jsonl"
    if not data.is_file():  # written once: a resumed run trains on the same rows
        rows = training_rows(ctx)
        if not rows:
            raise StageFailed("train: the training inputs hold no example")
        write_jsonl_atomic(data, rows)
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in r.train.set.items()]
    overrides += [f"data.train={data}", f"output_dir={out}", f"student={r.student}", f"fc_token={r.fc_token}",
                  f"seed={r.seed}"]
    resume = find_checkpoint(out) is not None
    if resume:
        ctx.say(f"train: resuming from {find_checkpoint(out).name}")
    # Training runs in a child process either way: its memory (gigabytes at long max_length) and its
    # OpenMP threads go back to the system before the eval stage starts servers beside this process.
    args = ["-m", "fcdistill.train", "--config", str(r.train.config)] + [a for o in overrides for a in ("--set", o)]
    args += ["--resume"] if resume else []
    if _use_accelerate(r):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(r.train.accelerate_config)]
        if r.train.num_processes:
            cmd += ["--num_processes", str(r.train.num_processes)]
        cmd += args
        what = "accelerate launch"
    else:
        cmd = [sys.executable, *args]
        what = "python -m fcdistill.train"
    ctx.say("train: " + shlex.join(["python", *cmd[1:]]))
    code = _run_child(cmd)
    if code != 0:
        how = f"was stopped by {signal.Signals(-code).name}" if code < 0 else f"failed (exit {code}; its output is above)"
        raise StageFailed(f"train: {what} {how}; run the recipe again to resume from the last checkpoint")
    result = json.loads((out / "train_result.json").read_text())
    counts = {"examples": _count_lines(data), "steps": result.get("global_step")}
    for key in ("train_loss", "eval_loss"):
        if isinstance(result.get(key), (int, float)):
            counts[key] = round(result[key], 4)
    return counts


def _run_child(cmd: list[str]) -> int:
    """Run a stage's child process. Its stdout joins our stderr as it comes (our stdout holds only the
    comparison); when we are stopped (Stopped, KeyboardInterrupt) it is stopped too, so no orphan goes on
    writing checkpoints beside the rerun that resumes from them."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1) as child:  # noqa: S603 - our module
        try:
            for line in child.stdout:
                sys.stderr.write(line)
                sys.stderr.flush()
        except BaseException:
            child.terminate()
            raise
    return child.returncode


def _train_describe(r: Recipe) -> str:
    t = r.train
    sets = ", ".join(f"{k}={v}" for k, v in t.set.items())
    sample = f", a sample of {t.sample.examples}" if t.sample else ""
    launch = {"python": "a child process", "accelerate": f"accelerate ({t.accelerate_config})",
              "auto": f"accelerate ({t.accelerate_config}) on GPUs, else a child process" if t.accelerate_config
              else "a child process"}[t.launcher]
    return f"{r.student} on {' + '.join(_train_inputs(r))}{sample}: {t.config}{f' with {sets}' if sets else ''}; {launch}"


# -- export -------------------------------------------------------------------------------------------
def _export_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.train.export import merge_adapter

    path = merge_adapter(_trained(ctx), ctx.dir("export") / "merged", dtype=ctx.recipe.export.dtype, overwrite=True)
    return {"merged": str(path)}


def _trained(ctx: Context) -> Path:
    """The train stage's result: `adapter/`, or `model/` for a full fine-tune."""
    from fcdistill.train.config import final_dir_name

    return ctx.dir("train") / final_dir_name(ctx.recipe.train.finetune)


def _export_describe(r: Recipe) -> str:
    if r.train is not None and r.train.finetune == "full":
        return f"write the fully fine-tuned {r.student} ({r.export.dtype})"
    return f"merge the adapter into {r.student} ({r.export.dtype})"


# -- eval ---------------------------------------------------------------------------------------------
def _eval_after(r: Recipe) -> list[str]:
    after = ["data" if r.eval.split == "bfcl" else "synth"]
    if any(m.tuned for m in r.eval.models):
        after.append("export" if r.serve.engine == "vllm" else "train")
    return after


def _served(ctx: Context, m: EvalModel) -> tuple[str, list[str], str]:
    """(the model it is served from, `fcd serve` args for this model, the name to ask for)."""
    r = ctx.recipe
    base = m.model or r.student
    if m.tuned and r.serve.engine == "vllm":
        return str(ctx.dir("export") / "merged"), ["--served-model-name", m.name], m.name
    if m.tuned and r.train.finetune == "full":
        return str(_trained(ctx)), ["--served-model-name", m.name], m.name
    adapter = _trained(ctx) if m.tuned else m.adapter
    if adapter is not None:
        return base, ["--adapter", f"{m.name}={adapter}"], m.name
    if m.model is None:
        return base, [], base  # the student as it is: served under its own name
    return base, ["--served-model-name", m.name], m.name


def _eval_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.serve.process import start_server

    r, out = ctx.recipe, ctx.dir("eval")
    todo = [m for m in r.eval.models if not _complete(out / m.name)]
    for m in [m for m in todo if m.endpoint]:
        _ask(ctx, m.endpoint, m.model, m, _key(m))
    # One server per base model on the hf engine (adapters ride along); one per model on vllm.
    groups: dict[str, list[EvalModel]] = {}
    for m in [m for m in todo if not m.endpoint]:
        base, _, _ = _served(ctx, m)
        groups.setdefault(base if r.serve.engine == "hf" else m.name, []).append(m)
    for key, models in groups.items():
        base = _served(ctx, models[0])[0]
        args = ["--model", base] + [a for m in models for a in _served(ctx, m)[1]] + list(r.serve.args)
        names = ", ".join(m.name for m in models)
        ctx.say(f"eval: serving {names} on the {r.serve.engine} engine")
        with start_server(args, out / f"serve-{key.replace('/', '_')}.log", engine=r.serve.engine, port=r.serve.port,
                          timeout=r.serve.start_timeout_s) as server:
            for m in models:
                _ask(ctx, server.url, _served(ctx, m)[2], m, None)
    counts = {}
    for m in r.eval.models:
        summary = json.loads((out / m.name / "summary.json").read_text())
        acc = summary["overall"]["accuracy"]
        counts[m.name] = None if acc is None else round(100 * acc, 1)
    return counts


def _key(m: EvalModel) -> str | None:
    import os

    return os.environ.get(m.api_key_env) if m.api_key_env else None


def _complete(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("complete"))


def _ask(ctx: Context, url: str, model: str, m: EvalModel, api_key: str | None) -> None:
    from fcdistill.eval import run_eval

    e = ctx.recipe.eval
    ctx.say(f"eval: {m.name} on the {e.split} held-out split "
            f"({'every item' if e.limit_per_category is None else f'up to {e.limit_per_category} a category'})")
    data = ctx.bfcl_dir if e.split == "bfcl" else ctx.dir("synth")
    run_eval(url, model, data, e.categories,
             ctx.dir("eval") / m.name, mode=e.mode, concurrency=e.concurrency, max_tokens=e.max_tokens,
             api_key=api_key, limit_per_category=e.limit_per_category, label=m.name, progress=False)
    if not _complete(ctx.dir("eval") / m.name):
        raise StageFailed(f"eval: {m.name} has unanswered items after the retries; run the recipe again to resume")


def _eval_describe(r: Recipe) -> str:
    e = r.eval
    per = "every item" if e.limit_per_category is None else f"{e.limit_per_category} a category"
    names = ", ".join(m.name for m in e.models)
    cats = ", ".join(e.categories) if e.categories else "every category"
    return f"{names} on the {e.split} split ({cats}; {per}), served by the {r.serve.engine} engine"


# -- report -------------------------------------------------------------------------------------------
def _report_run(ctx: Context) -> dict[str, Any]:
    from fcdistill.recipe.report import write_report

    return write_report(ctx)


STAGE_DEFS: dict[str, Stage] = {
    "data": Stage(after=lambda r: [], files=lambda r: [p for p in (r.data.tools, r.data.seeds) if p],
                  config=_data_config, describe=_data_describe, run=_data_run,
                  outputs=lambda c: [c.dir("data")]),
    "label": Stage(after=lambda r: ["data"], files=lambda r: [],
                   config=lambda r: {"options": r.label.options, "teacher": _teacher_identity(r)},
                   describe=lambda r: f"the teacher ({(r.teacher or {}).get('model')}) labels the BFCL train items "
                                      f"({r.label.options or 'defaults'})",
                   run=_label_run, outputs=lambda c: [c.dir("label") / n for n in ("train.jsonl", "eval.jsonl")]),
    "synth": Stage(after=lambda r: ["data"], files=lambda r: [],
                   config=lambda r: {"options": r.synth.options, "teacher": _teacher_identity(r), "seed": r.seed,
                                     "student": r.student, "fc_token": r.fc_token},
                   describe=lambda r: f"the teacher ({(r.teacher or {}).get('model')}) writes examples for your tools "
                                      f"({r.synth.options or 'defaults'})",
                   run=_synth_run, outputs=lambda c: [c.dir("synth") / n for n in ("train.jsonl", "val.jsonl")]),
    "verify": Stage(after=lambda r: ["data"],
                    files=lambda r: [r.verify.input] + [Path(r.verify.options[k]) for k in ("tools", "exec_module")
                                                        if r.verify.options.get(k) not in (None, "example")],
                    config=lambda r: {"options": r.verify.options, "teacher": _teacher_identity(r)},
                    describe=lambda r: f"format, execution, duplicate and contamination checks of {r.verify.input}",
                    run=_verify_run, outputs=lambda c: [c.dir("verify") / "verified.jsonl"]),
    "augment": Stage(after=lambda r: [_bfcl_train_source(r)], files=lambda r: [],
                     config=lambda r: {"augment": _dump(r.augment), "seed": r.seed,
                                       # with a token budget, the student's tokenizer decides what is made
                                       **({"student": r.student, "fc_token": r.fc_token}
                                          if r.augment.max_length is not None else {})},
                     describe=lambda r: f"x{r.augment.multiplier} of the train split "
                                        f"({', '.join(r.augment.transforms or ['every transform'])}"
                                        + (f"; <= {r.augment.max_length} tokens of {r.student}"
                                           if r.augment.max_length is not None else "") + ")",
                     run=_augment_run, outputs=lambda c: [c.dir("augment") / "train.jsonl"]),
    "train": Stage(after=_train_inputs,
                   files=lambda r: [r.train.config] + ([r.train.accelerate_config] if r.train.accelerate_config else []),
                   config=lambda r: {"train": _dump(r.train), "student": r.student, "fc_token": r.fc_token,
                                     "seed": r.seed},
                   describe=_train_describe, run=_train_run,
                   outputs=lambda c: [_trained(c)]),
    "export": Stage(after=lambda r: ["train"], files=lambda r: [], config=lambda r: {"export": _dump(r.export)},
                    describe=_export_describe, run=_export_run,
                    outputs=lambda c: [c.dir("export") / "merged"]),
    "eval": Stage(after=_eval_after, files=lambda r: [],
                  config=lambda r: {"eval": _dump(r.eval), "serve": _dump(r.serve), "student": r.student},
                  describe=_eval_describe, run=_eval_run,
                  outputs=lambda c: [c.dir("eval") / m.name / "outputs.jsonl" for m in c.recipe.eval.models]),
    "report": Stage(after=lambda r: ["eval"] + (["train"] if r.train is not None else []), files=lambda r: [],
                    config=lambda r: {"report": _dump(r.report), "order": r.eval_order()},
                    describe=lambda r: f"report.md: {' vs '.join(r.eval_order())}, charts, links", run=_report_run,
                    outputs=lambda c: [c.dir("report") / "report.md"]),
}
