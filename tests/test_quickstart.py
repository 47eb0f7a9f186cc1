"""`fcd quickstart` end to end on a tiny slice: the real BFCL split, real training steps, a real
server process with base and adapter, the real evaluation and comparison. Then a rerun into the same
directory reuses every stage instead of redoing it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
              "live_simple", "live_multiple", "live_irrelevance"]


def _quickstart(out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcdistill", "quickstart", "--out", str(out), "--train-examples", "8",
                           "--train-steps", "2", "--eval-per-category", "1", "--augment-multiplier", "0", *extra],
                          capture_output=True, text=True, timeout=1200)


def test_quickstart_on_a_tiny_slice_then_a_rerun_reuses_it(tmp_path):
    out = tmp_path / "q"
    first = _quickstart(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("1/5 data", "2/5 train", "3/5 serve", "4/5 eval: base", "5/5 eval: tuned", "done in"):
        assert stage in first.stderr, (stage, first.stderr[-2000:])

    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2
    for label in ("base", "tuned"):
        answers = [json.loads(line) for line in (out / "eval" / label / "outputs.jsonl").read_text().splitlines()]
        assert sorted(a["category"] for a in answers) == sorted(CATEGORIES), label
        assert json.loads((out / "eval" / label / "summary.json").read_text())["complete"] is True
    # the comparison printed on stdout names both runs and every category
    assert "base" in first.stdout and "tuned" in first.stdout
    assert all(c in first.stdout for c in CATEGORIES), first.stdout
    stages = json.loads((out / "stages.json").read_text())
    assert {"data", "export", "sample", "train", "eval/base", "eval/tuned"} <= set(stages)

    adapter_mtime = (out / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = _quickstart(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stderr.splitlines() if line.startswith(("rerunning", "warning"))], again.stderr
    assert (out / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert again.stdout == first.stdout  # the same answers, compared again
