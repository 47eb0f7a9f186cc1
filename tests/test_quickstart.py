"""`fcd quickstart` end to end on a tiny slice: the real BFCL split, real training steps, a real
server process with base and adapter, the real evaluation and comparison. It is `fcd run
recipes/quickstart-cpu.yaml` with its flags as overrides; a rerun into the same directory skips
every stage, and a changed flag reruns what it changes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcdistill.cli import quickstart_overrides

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
              "live_simple", "live_multiple", "live_irrelevance"]


def _command(out, steps: int = 2) -> list[str]:
    return [sys.executable, "-m", "fcdistill", "quickstart", "--out", str(out), "--train-examples", "8",
            "--train-steps", str(steps), "--eval-per-category", "1", "--augment-multiplier", "0",
            "--set", "eval.max_tokens=48"]


def _quickstart(out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(out), *extra],
                          capture_output=True, text=True, timeout=1200, cwd="/")  # the alias works from anywhere


def _trainers_writing_to(out) -> list[int]:
    """Live `fcdistill.train` processes whose command line names `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if b"fcdistill.train" in argv and any(str(out).encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_quickstart_on_a_tiny_slice_then_a_rerun_skips_it(tmp_path):
    out = tmp_path / "q"
    first = _quickstart(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for line in ("data: run (new)", "train: run (new)", "eval: serving base, tuned on the hf engine",
                 "eval: base on the bfcl held-out split", "eval: tuned on the bfcl held-out split", "report: run",
                 "done:"):
        assert line in first.stderr, (line, first.stderr[-2000:])
    assert "augment" not in first.stderr  # --augment-multiplier 0: no augment stage

    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2
    assert len((out / "train" / "data" / "train.trl.jsonl").read_text().splitlines()) == 8
    for label in ("base", "tuned"):
        answers = [json.loads(line) for line in (out / "eval" / label / "outputs.jsonl").read_text().splitlines()]
        assert sorted(a["category"] for a in answers) == sorted(CATEGORIES), label
        assert json.loads((out / "eval" / label / "summary.json").read_text())["complete"] is True
    # the comparison printed on stdout names both runs and every category
    assert "base" in first.stdout and "tuned" in first.stdout
    assert all(c in first.stdout for c in CATEGORIES), first.stdout
    assert {p.parent.name for p in out.glob("*/stage.json")} == {"data", "train", "eval", "report"}
    assert all(json.loads((out / "eval" / label / "summary.json").read_text())["run"]["max_tokens"] == 48
               for label in ("base", "tuned"))  # --set reached the recipe

    adapter_mtime = (out / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = _quickstart(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line.split("] ", 1)[1].split(" (")[0] for line in again.stderr.splitlines() if ": skipped" in line] == \
        ["data: skipped", "train: skipped", "eval: skipped", "report: skipped"], again.stderr
    assert (out / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert again.stdout == first.stdout  # the same answers, compared again


@pytest.mark.slow
def test_a_terminated_run_stops_its_training_child_and_says_how_to_resume(tmp_path):
    """SIGTERM to the runner (a scheduler's time limit, `kill PID`) stops the training child with it: no
    orphan goes on writing checkpoints into the directory that the next run resumes from."""
    out = tmp_path / "q"
    runner = subprocess.Popen(_command(out, steps=500), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd="/")
    try:
        before = []
        for line in runner.stderr:
            before.append(line)
            if line.startswith("train: python -m fcdistill.train"):
                break
        deadline = time.monotonic() + 60
        while not _trainers_writing_to(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _trainers_writing_to(out), "".join(before)[-2000:]
        time.sleep(3)  # into its start-up (imports, the model)
        runner.send_signal(signal.SIGTERM)
        _, rest = runner.communicate(timeout=120)
    finally:
        runner.kill()
    assert runner.returncode == 1, rest[-2000:]
    assert "error: train: stopped by SIGTERM; run the recipe again to resume where it stopped" in rest, rest[-2000:]
    assert _trainers_writing_to(out) == []
    assert json.loads((out / "train" / "stage.json").read_text())["status"] == "stopped"


def test_flags_become_recipe_overrides():
    kw = dict(full=False, eval_per_category=None, train_examples=None, train_steps=None, concurrency=None,
              augment_multiplier=None, epochs=None, seed=None, engine=None)
    assert quickstart_overrides(**kw) == []  # the recipe's own values
    assert quickstart_overrides(**{**kw, "train_steps": 9, "augment_multiplier": 0, "engine": "vllm"}) == [
        "train.set.max_steps=9", "train.set.save_steps=3", "augment=null", "serve.engine=vllm", "export.merge=true"]
    assert quickstart_overrides(**{**kw, "full": True, "epochs": 2.0, "eval_per_category": 7}) == [
        "eval.limit_per_category=7", "train.set.epochs=2.0"]
