"""`fcd run`: a recipe's stages, in order, each in its own folder of the run directory with a manifest.

RUN/STAGE/stage.json records what the stage ran with and what it made: its key, its config, its
inputs (the upstream stages' keys and output digests, the user files' hashes), package versions,
counts, start, end and status. The key folds in the stage's config and its inputs, so:
- a stage whose key is unchanged and whose status is done is skipped: rerunning a finished recipe
  reads manifests and hashes the user's files, nothing more;
- a stage whose config or inputs changed runs again from scratch, and so does every stage after it
  (their inputs changed): a new learning rate reruns train, export, eval and report;
- a stage that was killed (status running or failed, same key) runs again in place and resumes
  where its command does: labels, synth requests, the last training checkpoint, eval answers.
One `fcd run` at a time may use a run directory (a lock file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fcdistill.recipe.manifest import STAGE_FILE, read_stage, write_stage
from fcdistill.recipe.model import STAGES, Recipe, RecipeError, flatten
from fcdistill.recipe.stages import STAGE_DEFS, Context, StageFailed, Stopped

RECIPE_FILE = "recipe.yaml"
_VERSIONED = ("fcdistill", "torch", "transformers", "trl", "peft", "accelerate", "bfcl-eval", "outlines-core", "vllm")


@dataclass
class Step:
    """One stage of the plan: what will happen to it, and why."""

    stage: str
    action: str  # skip | run | rerun | resume
    why: str
    describe: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(paths: list[Path], root: Path) -> str:
    """One hash over the files at `paths` (directories walked in a fixed order), named relative to root."""
    h = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file() and p.name != STAGE_FILE) if top.is_dir() else [top]
        for f in files:
            if not f.is_file():
                raise RecipeError(f"{f} is missing: a stage's output was removed; delete {top} to redo it")
            h.update(f"{f.relative_to(root)}\0{_sha256(f)}\0".encode())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class Planner:
    """Keys and decisions for each stage of one recipe over one run directory."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe = recipe
        self.out = out
        self.stages = recipe.enabled()
        self._keys: dict[str, str | None] = {}

    def inputs(self, stage: str) -> dict[str, Any] | None:
        """The stage's inputs, or None while an upstream stage has not finished under its current key."""
        d = STAGE_DEFS[stage]
        upstream = {}
        for u in d.after(self.recipe):
            rec = read_stage(self.out, u)
            if rec is None or rec.get("status") != "done" or rec.get("key") != self.key(u):
                return None
            upstream[u] = {"key": rec["key"], "outputs": rec["outputs"]}
        return {"upstream": upstream, "files": {str(p): _sha256(p) for p in d.files(self.recipe)}}

    def key(self, stage: str) -> str | None:
        if stage not in self._keys:
            inputs = self.inputs(stage)
            if inputs is None:
                self._keys[stage] = None
            else:
                payload = json.dumps({"stage": stage, "config": STAGE_DEFS[stage].config(self.recipe),
                                      "inputs": inputs}, sort_keys=True, default=str)
                self._keys[stage] = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return self._keys[stage]

    def forget(self, stage: str) -> None:
        """After a stage ran: it and every later stage compute their keys again."""
        for s in self.stages[self.stages.index(stage):]:
            self._keys.pop(s, None)

    def why_changed(self, stage: str, rec: dict[str, Any]) -> str:
        """The config fields that differ, else the inputs that did."""
        old, new = flatten(rec.get("config") or {}), flatten(STAGE_DEFS[stage].config(self.recipe))
        fields = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        if fields:
            return ", ".join(fields[:4]) + (f" and {len(fields) - 4} more" if len(fields) > 4 else "")
        before = rec.get("inputs") or {}
        now = self.inputs(stage) or {}
        files = [f for f in {**before.get("files", {}), **now.get("files", {})}
                 if before.get("files", {}).get(f) != now.get("files", {}).get(f)]
        ups = [u for u in {**before.get("upstream", {}), **now.get("upstream", {})}
               if before.get("upstream", {}).get(u) != now.get("upstream", {}).get(u)]
        return "changed input " + ", ".join(ups + files) if ups or files else "its inputs changed"

    def decide(self, stage: str, forced: bool = False) -> Step:
        describe = STAGE_DEFS[stage].describe(self.recipe)
        rec = read_stage(self.out, stage)
        key = self.key(stage)
        if forced:
            return Step(stage, "rerun" if rec else "run", "--from", describe)
        if rec is None:
            return Step(stage, "run", "new", describe)
        if key is None:
            return Step(stage, "rerun", "an earlier stage runs first", describe)
        if rec.get("key") != key:
            return Step(stage, "rerun", self.why_changed(stage, rec), describe)
        if rec.get("status") == "done":
            ctx = Context(self.recipe, self.out, print)
            missing = [p for p in STAGE_DEFS[stage].outputs(ctx) if not p.exists()]
            if missing:
                return Step(stage, "rerun", f"its output {missing[0].relative_to(self.out)} is missing", describe)
            return Step(stage, "skip", f"done {rec.get('finished', '')}".strip(), describe)
        why = {"running": "killed while running", "stopped": "interrupted", "failed": "failed"}
        return Step(stage, "resume", f"{why.get(rec.get('status'), rec.get('status'))} last time", describe)

    def plan(self, start: str | None = None, until: str | None = None) -> list[Step]:
        """What a run would do, read from the manifests alone (a dry run); a stage after one that runs
        is shown as rerun until then."""
        steps, forcing, ran = [], False, False
        for stage in self._window(start, until):
            forcing = forcing or stage == start
            step = self.decide(stage, forced=forcing)
            if ran and step.action == "skip":
                step = Step(stage, "rerun", "an earlier stage runs first", step.describe)
            ran = ran or step.action != "skip"
            steps.append(step)
        return steps

    def _window(self, start: str | None, until: str | None) -> list[str]:
        for name, flag in ((start, "--from"), (until, "--until")):
            if name is not None and name not in self.stages:
                known = "a stage it does not run" if name in STAGES else "not a stage"
                raise RecipeError(f"{flag} {name}: {known}; this recipe runs {', '.join(self.stages)}")
        last = self.stages.index(until) + 1 if until else len(self.stages)
        if start and self.stages.index(start) >= last:
            raise RecipeError(f"--from {start} comes after --until {until}")
        return self.stages[:last]


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f"another `fcd run` is using {out}; wait for it, or give another --out") from None
        yield


def _set_aside(directory: Path, say: Callable[[str], None]) -> None:
    """Before a stage runs again: what its last run made (a trained adapter, answers) moves to
    STAGE.previous, replacing an older one, rather than being deleted."""
    import shutil

    if not directory.exists():
        return
    if not any(directory.iterdir()):
        directory.rmdir()
        return
    kept = directory.with_name(directory.name + ".previous")
    if kept.exists():
        shutil.rmtree(kept)
    directory.rename(kept)
    say(f"  {directory.name}: the last run's outputs are kept in {kept}")


@contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) raises Stopped in the main thread, as Ctrl-C raises
    KeyboardInterrupt: servers and child processes stop on the way out, and the stage is recorded as
    stopped. A second SIGTERM kills at once."""
    if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_recipe(recipe: Recipe, out: Path, *, start: str | None = None, until: str | None = None,
               say: Callable[[str], None] = print) -> list[Step]:
    """Run the recipe's stages into `out`; returns what was done to each. Raises StageFailed (the run
    resumes when called again; also when a signal stopped a stage) or RecipeError (bad input, before
    the stage concerned starts)."""
    with _stopped_by_sigterm(), _locked(out):
        (out / RECIPE_FILE).write_text(yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False),
                                       encoding="utf-8")
        planner = Planner(recipe, out)
        ctx = Context(recipe, out, say)
        done: list[Step] = []
        started = time.time()
        forcing = False
        for stage in planner._window(start, until):
            forcing = forcing or stage == start
            step = planner.decide(stage, forced=forcing)
            done.append(step)
            if step.action == "skip":
                say(f"[{time.time() - started:6.0f}s] {stage}: skipped ({step.why})")
                continue
            say(f"[{time.time() - started:6.0f}s] {stage}: {step.action} ({step.why}): {step.describe}")
            if step.action in ("run", "rerun"):
                if read_stage(out, stage) is None and (out / stage).is_dir() and any((out / stage).iterdir()):
                    raise RecipeError(f"{out / stage} holds files that no recipe run made (no {STAGE_FILE}), e.g. "
                                      "from an older `fcd quickstart`; not deleting them: move them away or give "
                                      "another --out")
                _set_aside(out / stage, say)
            key, inputs = planner.key(stage), planner.inputs(stage)
            record = {"stage": stage, "key": key, "status": "running", "config": STAGE_DEFS[stage].config(recipe),
                      "inputs": inputs, "versions": _versions(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "attempts": 1}
            previous = read_stage(out, stage)
            if step.action == "resume" and previous:
                record["attempts"] = int(previous.get("attempts", 1)) + 1
                record["seconds_before"] = previous.get("seconds", 0) + previous.get("seconds_before", 0)
            write_stage(out, stage, record)
            t0 = time.time()
            try:
                counts = STAGE_DEFS[stage].run(ctx)
            except BaseException as exc:
                record.update(status="failed" if isinstance(exc, Exception) else "stopped",
                              error=f"{type(exc).__name__}: {exc}"[:500], seconds=round(time.time() - t0, 1))
                write_stage(out, stage, record)
                if isinstance(exc, (Stopped, KeyboardInterrupt)):
                    why = str(exc) if isinstance(exc, Stopped) else "interrupted"
                    raise StageFailed(f"{stage}: {why}; run the recipe again to resume where it stopped") from exc
                raise
            record.update(status="done", counts=counts, seconds=round(time.time() - t0, 1),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                          outputs=digest(STAGE_DEFS[stage].outputs(ctx), out))
            write_stage(out, stage, record)
            planner.forget(stage)
        say(f"[{time.time() - started:6.0f}s] done: {out}")
        return done
