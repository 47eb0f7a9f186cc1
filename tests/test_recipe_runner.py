"""The recipe runner's bookkeeping, with each stage's work replaced by a fake that writes its outputs:
what is skipped, what runs again and why, how a stopped stage resumes, --from, --until, the lock.
(tests/test_recipe.py runs the real stages end to end.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fcdistill.recipe import runner as runner_mod
from fcdistill.recipe import stages as stages_mod
from fcdistill.recipe.model import RecipeError, load_recipe
from fcdistill.recipe.runner import Planner, run_recipe
from fcdistill.recipe.stages import StageFailed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fake_stages(monkeypatch):
    """Each stage's run writes one file per call into its folder and returns its call number."""
    calls: list[str] = []
    fail_once: set[str] = set()

    def make(name: str):
        def run(ctx):
            calls.append(name)
            out = ctx.dir(name)
            out.mkdir(parents=True, exist_ok=True)
            (out / "progress.txt").open("a").write("x")  # what a killed attempt leaves behind
            if name in fail_once:
                fail_once.discard(name)
                raise KeyboardInterrupt  # stopped mid-way (Ctrl-C, or a kill the runner sees)
            for path in stages_mod.STAGE_DEFS[name].outputs(ctx):
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.suffix:
                    path.mkdir(exist_ok=True)
                    path = path / "weights.bin"
                path.write_text(f"{name} {(out / 'progress.txt').read_text()}")
            return {"calls": calls.count(name)}
        return run

    patched = {k: dataclasses.replace(v, run=make(k)) for k, v in stages_mod.STAGE_DEFS.items()}
    monkeypatch.setattr(stages_mod, "STAGE_DEFS", patched)
    monkeypatch.setattr(runner_mod, "STAGE_DEFS", patched)
    return calls, fail_once


def _recipe(*sets: str):
    return load_recipe(ROOT / "recipes" / "quickstart-cpu.yaml", list(sets))


def _run(out: Path, *sets: str, **kw) -> list[str]:
    said: list[str] = []
    run_recipe(_recipe(*sets), out, say=said.append, **kw)
    return said


def _actions(out: Path, *sets: str, start=None, until=None) -> dict[str, str]:
    return {s.stage: s.action for s in Planner(_recipe(*sets), out).plan(start, until)}


ALL = ["data", "augment", "train", "eval", "report"]


def test_a_finished_recipe_is_skipped_whole(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(tmp_path)
    assert calls == ALL
    said = _run(tmp_path)
    assert calls == ALL  # nothing ran again
    assert all(any(line.endswith(f"{s}: skipped (done {json.loads((tmp_path / s / 'stage.json').read_text())['finished']})")
                   for line in said) for s in ALL), said
    assert set(_actions(tmp_path).values()) == {"skip"}
    rec = json.loads((tmp_path / "train" / "stage.json").read_text())
    assert rec["status"] == "done" and rec["counts"] == {"calls": 1} and rec["versions"]["fcdistill"]
    assert set(rec["inputs"]["upstream"]) == {"augment"}
    assert list(rec["inputs"]["files"]) == ["configs/train/smollm2-135m-cpu.yaml"]  # hashed: an edit reruns train


def test_a_changed_option_reruns_its_stage_and_every_later_one(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(tmp_path)
    lr = "train.set.optim.learning_rate=5.0e-4"
    assert _actions(tmp_path, lr) == {"data": "skip", "augment": "skip", "train": "rerun", "eval": "rerun",
                                      "report": "rerun"}
    step = Planner(_recipe(lr), tmp_path).plan()[2]
    assert step.why == "train.set.optim.learning_rate: 0.002 -> 0.0005", step.why
    first_weights = (tmp_path / "train" / "adapter" / "weights.bin").read_text()
    calls.clear()
    said = _run(tmp_path, lr)
    assert calls == ["train", "eval", "report"], said
    # what the earlier run made is set aside, not deleted; a second rerun replaces that copy
    assert (tmp_path / "train.previous" / "adapter" / "weights.bin").read_text() == first_weights
    assert any("train: the last run's outputs are kept in" in line for line in said), said
    _run(tmp_path, "train.set.optim.learning_rate=1.0e-4")
    assert json.loads((tmp_path / "train.previous" / "stage.json").read_text())["config"]["train"]["set"][
        "optim.learning_rate"] == 5.0e-4
    # an upstream option: everything from there on, and the reason names the changed input
    assert _actions(tmp_path, "augment.multiplier=3")["augment"] == "rerun"
    assert _actions(tmp_path, "augment.multiplier=3")["train"] == "rerun"


def test_a_rerun_whose_output_is_identical_leaves_later_stages_alone(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(tmp_path)
    calls.clear()
    _run(tmp_path, start="augment", until="augment")  # forced, writes the same bytes again
    assert calls == ["augment"]
    calls.clear()
    _run(tmp_path)
    assert calls == []  # the same output digest: train's key did not change


def test_a_stopped_stage_resumes_in_place(tmp_path, fake_stages):
    calls, fail_once = fake_stages
    fail_once.add("train")
    with pytest.raises(StageFailed, match="^train: interrupted; run the recipe again to resume where it stopped$") as exc:
        _run(tmp_path)  # Ctrl-C: one line naming the stage and what to do, not a traceback
    assert isinstance(exc.value.__cause__, KeyboardInterrupt)
    rec = json.loads((tmp_path / "train" / "stage.json").read_text())
    assert rec["status"] == "stopped" and "KeyboardInterrupt" in rec["error"]
    assert _actions(tmp_path)["train"] == "resume"
    said = _run(tmp_path)
    assert any("train: resume (interrupted last time)" in line for line in said), said
    assert (tmp_path / "train" / "progress.txt").read_text() == "xx"  # kept, not cleared: the stage resumes
    rec = json.loads((tmp_path / "train" / "stage.json").read_text())
    assert rec["status"] == "done" and rec["attempts"] == 2
    assert calls == ["data", "augment", "train", "train", "eval", "report"]


def test_from_and_until(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(tmp_path, until="train")
    assert calls == ["data", "augment", "train"] and not (tmp_path / "eval").exists()
    assert _actions(tmp_path) == {"data": "skip", "augment": "skip", "train": "skip", "eval": "run", "report": "run"}
    calls.clear()
    _run(tmp_path, start="train")
    assert calls == ["train", "eval", "report"]
    with pytest.raises(RecipeError, match="--from export: a stage it does not run"):
        _run(tmp_path, start="export")
    with pytest.raises(RecipeError, match="--from trian: not a stage"):
        _run(tmp_path, start="trian")
    with pytest.raises(RecipeError, match="--from eval comes after --until train"):
        _run(tmp_path, start="eval", until="train")


def test_a_removed_output_reruns_its_stage(tmp_path, fake_stages):
    calls, _ = fake_stages
    _run(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "train" / "adapter")
    step = Planner(_recipe(), tmp_path).plan()[2]
    assert (step.action, step.why) == ("rerun", "its output train/adapter is missing")
    calls.clear()
    _run(tmp_path)
    assert calls == ["train"]  # the same bytes again: eval and report stay as they were
    assert (tmp_path / "train" / "adapter" / "weights.bin").is_file()


def test_one_run_at_a_time(tmp_path, fake_stages):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with (tmp_path / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RecipeError, match="another `fcd run` is using"):
            _run(tmp_path)


def test_files_no_recipe_run_made_are_never_deleted(tmp_path, fake_stages):
    calls, _ = fake_stages
    (tmp_path / "train" / "checkpoint-250").mkdir(parents=True)  # e.g. an older quickstart's training
    with pytest.raises(RecipeError, match="holds files that no recipe run made"):
        _run(tmp_path)
    assert calls == ["data", "augment"] and (tmp_path / "train" / "checkpoint-250").is_dir()


def test_an_option_added_later_counts_only_when_set(tmp_path, fake_stages):
    """A run directory made before `data.bfcl.optional_args` existed recorded no such field: at its
    default the data stage's key is unchanged, so an upgrade skips the finished stages; set, it reruns."""
    calls, _ = fake_stages
    _run(tmp_path)
    rec = json.loads((tmp_path / "data" / "stage.json").read_text())
    for added in ("optional_args", "live_eval_only", "eval_per_category"):  # as a record from before they existed
        assert added not in rec["config"]["bfcl"], added
    assert set(_actions(tmp_path).values()) == {"skip"}
    assert _actions(tmp_path, "data.bfcl.optional_args=given")["data"] == "rerun"
    step = Planner(_recipe("data.bfcl.optional_args=given"), tmp_path).plan()[0]
    assert step.why == "bfcl.optional_args: None -> 'given'", step.why



def test_a_full_finetune_is_kept_served_and_exported_from_its_model_directory(tmp_path, fake_stages):
    """`train.set.finetune=full`: the train stage's output is `train/model`, which the hf engine serves
    as the tuned student and the export stage writes; a removed `model/` reruns the stage."""
    full = ("train.set.finetune=full", "export.merge=true")
    recipe = _recipe(*full)
    assert recipe.train.finetune == "full" and _recipe().train.finetune == "lora"
    steps = {s.stage: s for s in Planner(recipe, tmp_path).plan()}
    assert steps["export"].describe.startswith("write the fully fine-tuned smollm2-135m")
    _run(tmp_path, *full)
    assert (tmp_path / "train" / "model").is_dir() and not (tmp_path / "train" / "adapter").exists()
    tuned = next(m for m in recipe.eval.models if m.tuned)
    ctx = stages_mod.Context(recipe, tmp_path, print)
    assert stages_mod._served(ctx, tuned) == (str(tmp_path / "train" / "model"), ["--served-model-name", "tuned"],
                                              "tuned")
    assert set(_actions(tmp_path, *full).values()) == {"skip"}
    import shutil

    shutil.rmtree(tmp_path / "train" / "model")
    assert _actions(tmp_path, *full)["train"] == "rerun"
