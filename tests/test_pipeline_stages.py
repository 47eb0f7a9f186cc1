"""`fcd quickstart` reruns: a stage's output is reused only under the options it was made with.

The stages' work (split, augmentation, export, training, serving, evaluation) is replaced by fakes
that write the files each stage leaves, so these tests exercise the run directory's bookkeeping in
seconds: what is reused, rerun or refused, and that a directory from before the bookkeeping (like
an in-progress --full run) still resumes its training from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fcdistill.pipeline import STAGES_FILE, QuickstartError, QuickstartOptions, run_quickstart


@pytest.fixture()
def fakes(monkeypatch):
    calls = SimpleNamespace(prepare=0, augment=0, export=0, train=[], evals=[])

    def prepare_bfcl(opts, out):
        calls.prepare += 1
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"live": opts.max_per_category}))

    def run_augment(opts, progress=True):
        calls.augment += 1
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "manifest.json").write_text("{}")

    def export_split(data, split, fmt, out, **kw):
        calls.export += 1
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": f"{c}_{i}", "prompt": "p", "completion": "c"}
                for c in ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance") for i in range(40)]
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out, len(rows), 0

    def train_run(config, resume=False, overrides=()):
        calls.train.append({"resume": resume, "overrides": list(overrides)})
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")

    @contextlib.contextmanager
    def start_server(args, log, **kw):
        yield SimpleNamespace(url="http://127.0.0.1:1")

    def run_eval(endpoint, model, data_dir, categories, out_dir, **kw):
        calls.evals.append((model, kw.get("limit_per_category")))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "outputs.jsonl").write_text('{"id": "x"}\n')
        (Path(out_dir) / "summary.json").write_text('{"complete": true}')

    import fcdistill.data.augment
    import fcdistill.data.bfcl
    import fcdistill.data.export
    import fcdistill.eval
    import fcdistill.serve.process
    import fcdistill.train.sft

    monkeypatch.setattr(fcdistill.data.bfcl, "prepare_bfcl", prepare_bfcl)
    monkeypatch.setattr(fcdistill.data.augment, "run_augment", run_augment)
    monkeypatch.setattr(fcdistill.data.export, "export_split", export_split)
    monkeypatch.setattr(fcdistill.train.sft, "run", train_run)
    monkeypatch.setattr(fcdistill.serve.process, "start_server", start_server)
    monkeypatch.setattr(fcdistill.eval, "run_eval", run_eval)
    monkeypatch.setattr(fcdistill.eval, "compare_runs", lambda runs, out: "table")
    return calls


def _run(out: Path, said: list[str] | None = None, **kw) -> str:
    return run_quickstart(QuickstartOptions(out=out, **kw), say=(said if said is not None else []).append)


def test_an_unchanged_rerun_reuses_every_stage(tmp_path, fakes):
    _run(tmp_path / "q")
    said: list[str] = []
    _run(tmp_path / "q", said, eval_per_category=10)  # more eval items: the same answers, extended
    assert fakes.prepare == 1 and fakes.augment == 1 and fakes.export == 1 and len(fakes.train) == 1
    assert not [m for m in said if m.startswith(("rerunning", "warning"))], said
    assert fakes.evals[-2:] == [("smollm2-135m", 10), ("tuned", 10)]
    stages = json.loads((tmp_path / "q" / STAGES_FILE).read_text())
    assert stages["train"]["options"] == {"config": "smollm2-135m-cpu.yaml", "full": False, "steps": 32}


def test_full_after_the_default_run_is_refused_naming_the_stages(tmp_path, fakes):
    """The old adapter (and the answers it gave) are not taken for a --full run's: the rerun stops
    before touching anything and says which stages differ and what to do."""
    _run(tmp_path / "q")
    manifest = (tmp_path / "q" / "data" / "manifest.json").read_text()
    with pytest.raises(QuickstartError) as err:
        _run(tmp_path / "q", full=True)
    message = str(err.value)
    assert "train (" in message and "full False -> True" in message and "eval/tuned" in message, message
    assert "another --out" in message and str(tmp_path / "q" / "train") in message
    assert len(fakes.train) == 1 and fakes.prepare == 1
    assert (tmp_path / "q" / "data" / "manifest.json").read_text() == manifest  # nothing rerun or deleted

    from typer.testing import CliRunner

    from fcdistill.cli import app

    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--full"])
    assert r.exit_code == 2 and "not mixing the two" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_cheap_stage_whose_options_changed_runs_again_and_says_so(tmp_path, fakes):
    import shutil

    _run(tmp_path / "q")
    shutil.rmtree(tmp_path / "q" / "train")  # no adapter and no answers: nothing expensive is lost
    shutil.rmtree(tmp_path / "q" / "eval")
    said: list[str] = []
    _run(tmp_path / "q", said, seed=7)
    assert "rerunning data: seed 42 -> 7" in said, said
    assert any(m.startswith("rerunning data-aug: seed 42 -> 7") for m in said), said
    assert fakes.prepare == 2 and fakes.augment == 2 and fakes.export == 2 and len(fakes.train) == 2


def test_a_run_directory_from_before_the_records_resumes_its_training(tmp_path, fakes):
    """An in-progress run started before stages were recorded (no stages.json, a checkpoint, no
    adapter yet) keeps its outputs and resumes training from the checkpoint, with a warning."""
    out = tmp_path / "q"
    for d in ("data", "data-aug"):
        (out / d).mkdir(parents=True)
        (out / d / "manifest.json").write_text("{}")
    (out / "data-aug" / "export").mkdir()
    (out / "data-aug" / "export" / "train.trl.jsonl").write_text('{"id": "simple_python_1"}\n')
    (out / "train" / "checkpoint-264").mkdir(parents=True)
    said: list[str] = []
    _run(out, said, full=True)
    assert fakes.prepare == 0 and fakes.augment == 0 and fakes.export == 0
    assert fakes.train == [{"resume": True, "overrides": fakes.train[0]["overrides"]}]
    assert any(m.startswith("warning:") and "no record of the options" in m for m in said), said
    assert json.loads((out / STAGES_FILE).read_text())["train"]["options"]["full"] is True
