"""`fcd run RECIPE`: the shipped recipes' plans, bad recipes refused at load, and a tiny recipe end to
end — a replay teacher behind a real HTTP server labels BFCL items and writes synthetic examples,
augment, two real training steps, a real server with base and adapter, the real evaluation, the
report — then a rerun that skips everything, a changed learning rate that reruns train and what
follows it, and a teacher failure that stops the run and resumes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fcdistill.data.bfcl import SplitOptions, prepare_bfcl, read_records
from fcdistill.devtools.replay_teacher import ReplayServer
from fcdistill.tools import safe_tool_names

ROOT = Path(__file__).resolve().parents[1]
FCD = [sys.executable, "-m", "fcdistill"]
TOOLS = [
    {"type": "function", "function": {"name": "set_timer", "description": "Start a kitchen timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                                         "label": {"type": "string"}}, "required": ["minutes"]}}},
    {"type": "function", "function": {"name": "send_note", "description": "Send a short note.", "parameters": {
        "type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
        "required": ["to", "body"]}}},
]
SEEDS = [
    {"query": "Start a 3 minute timer for the eggs.", "calls": [{"name": "set_timer", "arguments": {"minutes": 3, "label": "eggs"}}]},
    {"query": "Send Ana a note saying I'm late.", "calls": [{"name": "send_note", "arguments": {"to": "Ana", "body": "I'm late"}}]},
]
GENERATED = {  # the generator's recorded replies, by the function a request targets
    "set_timer": [{"query": f"Set a timer for {n} minutes called {w}.", "calls": [
        {"name": "set_timer", "arguments": {"minutes": n, "label": w}}]} for n, w in ((10, "tea"), (25, "bread"))],
    "send_note": [{"query": f"Tell {who} that {what}.", "calls": [
        {"name": "send_note", "arguments": {"to": who, "body": what}}]}
                  for who, what in (("Bo", "dinner is at eight"), ("Kim", "the keys are under the mat"))],
}
SPLIT = {"categories": ["simple_python", "irrelevance"], "max_per_category": {"simple_python": 12, "irrelevance": 6},
         "mix_in": 0.25}


def _teacher_rules(records) -> list[dict]:
    """A perfect teacher for the BFCL train items: their canonical calls (API-safe names), or text."""
    rules = []
    for r in records:
        names = safe_tool_names(r.tools)
        reply = ({"tool_calls": [{"name": names[c.name], "arguments": c.arguments} for c in r.ground_truth]}
                 if r.ground_truth else {"content": "None of these functions can do that."})
        rules.append({"match": ['"content": ' + json.dumps(r.messages[-1]["content"], ensure_ascii=False)],
                      "tool": names[r.tools[0].name], "replies": [reply]})
    return rules


def _synth_rules() -> list[dict]:
    rules = [{"match": [f"exactly one call to {name}."], "replies": [{"content": json.dumps(rows)}]}
             for name, rows in GENERATED.items()]
    verdict = {"content": json.dumps({"thought": "fine", "pass": True})}
    return rules + [{"match": ["calls no function"], "replies": [verdict]},
                    {"match": ["strict reviewer"], "replies": [verdict]}]


def _recipe(d: Path, teacher_url: str, **changes) -> Path:
    (d / "tools.json").write_text(json.dumps(TOOLS))
    (d / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    recipe = {
        "name": "tiny", "seed": 3,
        "teacher": {"base_url": teacher_url, "model": "replay", "api_key_env": None, "backoff_initial_s": 0.01,
                    "max_attempts": 2},
        "data": {"bfcl": SPLIT, "tools": str(d / "tools.json"),
                 "seeds": str(d / "seeds.jsonl")},
        "label": {"source": "teacher"},
        "synth": {"options": {"count": 4, "per_request": 2, "styles": {"simple": 1.0}, "irrelevance_ratio": 0.2,
                              "shots": 1, "judge": True, "val_fraction": 0.25}},
        "augment": {"multiplier": 1, "transforms": ["mask", "shuffle"]},
        "train": {"config": str(ROOT / "configs/train/smollm2-135m-cpu.yaml"),
                  "set": {"max_steps": 2, "grad_accum": 1, "data.eval_fraction": 0.0, "eval_steps": None,
                          "save_steps": 1, "tensorboard": False}},
        "eval": {"categories": ["simple_python", "irrelevance"], "limit_per_category": 1, "concurrency": 2,
                 "max_tokens": 48},
        "report": {},
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _fcd(*args: str, env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([*FCD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _cli(*args: str, env: dict | None = None) -> Any:
    """`fcd ARGS` in this process (the recipe checks need no subprocess); run from the repository root."""
    from typer.testing import CliRunner

    from fcdistill.cli import app

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return CliRunner().invoke(app, list(args), env=env)
    finally:
        os.chdir(cwd)


def _stage(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "stage.json").read_text())


@pytest.mark.slow
def test_tiny_recipe_end_to_end_skip_rerun_and_resume(tmp_path):
    split = tmp_path / "split"
    prepare_bfcl(SplitOptions(categories=SPLIT["categories"], seed=3, max_per_category=SPLIT["max_per_category"],
                              mix_in_fraction=SPLIT["mix_in"]), split)
    records = read_records(split, "train")
    teacher_items = [r for r in records if r.label_source == "teacher"]
    assert len(teacher_items) >= 4
    failing = teacher_items[0]
    rules = _teacher_rules(records)
    # the first item's first two requests fail (500): past max_attempts 2, the label stage stops
    next(r for r in rules if json.dumps(failing.messages[-1]["content"]) in r["match"][0])["faults"] = \
        [{"status": 500}, {"status": 500}]
    out = tmp_path / "run"
    with ReplayServer({"rules": rules + _synth_rules()}) as srv:
        recipe = _recipe(tmp_path, srv.url)
        first = _fcd("run", str(recipe), "--out", str(out))
        assert first.returncode == 1, first.stderr[-3000:]
        assert "label: 1 items failed at the teacher" in first.stderr
        assert _stage(out, "label")["status"] == "failed" and _stage(out, "data")["status"] == "done"
        asked = srv.stats()["total"]

        second = _fcd("run", str(recipe), "--out", str(out))
        assert second.returncode == 0, second.stderr[-3000:]
        assert "data: skipped" in second.stderr and "label: resume" in second.stderr
        # the resumed label stage asked only the failed item again (its third request answers): no
        # other request, label or synth, was ever sent twice
        stats = srv.stats()
        assert stats["total"] > asked
        assert sorted(stats["by_key"].values())[-2:] == [1, 3], stats["by_key"]
        assert _stage(out, "label")["attempts"] == 2

    stages = ["data", "label", "synth", "augment", "train", "eval", "report"]
    for s in stages:
        rec = _stage(out, s)
        assert rec["status"] == "done" and rec["key"] and rec["outputs"] and rec["versions"]["fcdistill"], s
    assert _stage(out, "label")["counts"]["teacher_labeled"] == len(teacher_items)
    assert _stage(out, "synth")["counts"]["train"] >= 1
    assert _stage(out, "train")["counts"]["steps"] == 2
    train_rows = (out / "train" / "data" / "train.trl.jsonl").read_text().splitlines()
    assert any(json.loads(r)["id"].startswith("simple_python") for r in train_rows)
    assert any("set_timer" in json.loads(r)["prompt"] for r in train_rows)  # the synthetic examples are in
    for model in ("base", "tuned"):
        summary = json.loads((out / "eval" / model / "summary.json").read_text())
        assert summary["complete"] and set(summary["categories"]) == {"simple_python", "irrelevance"}
    report = (out / "report" / "report.md").read_text()
    assert "| base |" in report or "base" in report.split("## Held-out accuracy")[1]
    for link in ("../train/", "../eval/tuned/report.md", "compare.png", "loss.png"):
        assert link in report, link
    assert (out / "report" / "loss.png").stat().st_size > 1000

    # a finished recipe: every stage skipped, with no teacher running, and no stage output written again
    def written() -> dict[Path, int]:  # the run's own lock and recipe record aside
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}

    before = written()
    again = _fcd("run", str(recipe), "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(f"{s}: skipped" in again.stderr for s in stages), again.stderr
    assert written() == before
    shown = _fcd("runs", "show", str(out))
    assert shown.returncode == 0 and all(s in shown.stdout for s in stages) and "tuned" in shown.stdout

    # a new learning rate: train and everything after it runs again, nothing before it
    plan = _fcd("run", str(recipe), "--out", str(out), "--dry-run", "--set", "train.set.optim.learning_rate=5e-4")
    assert plan.returncode == 0, plan.stderr
    actions = {line.split(". ", 1)[1].split(":")[0]: line.split(": ", 1)[1].split(" ")[0]
               for line in plan.stdout.splitlines()[1:]}
    assert actions == {"data": "skip", "label": "skip", "synth": "skip", "augment": "skip", "train": "rerun",
                       "eval": "rerun", "report": "rerun"}, plan.stdout
    assert "optim.learning_rate" in plan.stdout
    step_before = _stage(out, "train")["finished"]
    rerun = _fcd("run", str(recipe), "--out", str(out), "--until", "train", "--set", "train.set.optim.learning_rate=5e-4")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "train: rerun (set.optim.learning_rate" in rerun.stderr.replace("train.set", "set"), rerun.stderr
    # trained by a child process (its memory is back before eval), told the new rate and to start afresh
    launched = next(line for line in rerun.stderr.splitlines() if line.startswith("train: python -m fcdistill.train"))
    assert "optim.learning_rate=0.0005" in launched and "--resume" not in launched, launched
    assert _stage(out, "train")["config"]["train"]["set"]["optim.learning_rate"] == 5e-4
    assert _stage(out, "train")["finished"] != step_before


def test_shipped_recipes_plan(tmp_path):
    expected = {
        "quickstart-cpu.yaml": ["data", "augment", "train", "eval", "report"],
        "quality-cpu.yaml": ["data", "augment", "train", "eval", "report"],
        "bfcl-teacher-gpu.yaml": ["data", "label", "augment", "train", "export", "eval", "report"],
        "my-tools.yaml": ["data", "synth", "train", "eval", "report"],
    }
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")) == sorted(expected)
    for name, stages in expected.items():
        res = _cli("run", f"recipes/{name}", "--out", str(tmp_path / name), "--dry-run", env={"TEACHER_API_KEY": "k"})
        assert res.exit_code == 0, (name, res.stderr)
        lines = res.stdout.splitlines()[1:]
        assert [line.split(". ", 1)[1].split(":")[0] for line in lines] == stages, (name, res.stdout)
        assert all(": run (new) - " in line for line in lines), res.stdout
        assert not (tmp_path / name).exists()  # a dry run writes nothing
    qs = _cli("run", "recipes/quickstart-cpu.yaml", "--dry-run", "--out", str(tmp_path / "q")).stdout
    assert "a sample of 96" in qs and "max_steps=32" in qs and "5 a category" in qs and "hf engine" in qs
    gpu = _cli("run", "recipes/bfcl-teacher-gpu.yaml", "--dry-run", "--out", str(tmp_path / "g"),
               env={"TEACHER_API_KEY": "k"}).stdout
    assert "accelerate (configs/accelerate/single_gpu.yaml) on GPUs" in gpu and "vllm engine" in gpu


BAD = [  # (change to the quickstart recipe, what the one-line error must name)
    ({"distill": {"x": 1}}, "unknown stage or field 'distill'"),
    ({"augment": {"multipler": 3}}, "augment.multipler: unknown field"),
    ({"train": {"config": "configs/train/nope.yaml"}}, "train.config not found: configs/train/nope.yaml"),
    ({"train": {"config": "configs/train/smollm2-135m-cpu.yaml", "set": {"lora.rank": 4}}}, "lora.rank: unknown field"),
    ({"train": {"config": "configs/train/smollm2-135m-cpu.yaml", "set": {"output_dir": "x"}}},
     "output_dir set by the recipe runner"),
    ({"serve": {"engine": "vllm"}}, "add export: {merge: true}"),
    ({"label": {"source": "teacher"}}, "teacher: label (source: teacher) need(s) a teacher section"),
    ({"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "t", "api_key_env": "FCD_TEST_UNSET_KEY"}},
     "teacher.api_key_env: the variable FCD_TEST_UNSET_KEY is not set"),
    ({"teacher": {"base_url": "ftp://x", "model": "t", "api_key_env": None}}, "base-url must start with http"),
    ({"eval": {"categories": ["live_relevance"]}}, "eval.categories: live_relevance not in data.bfcl"),
    ({"eval": {"models": ["base", "teacher"]}}, "'teacher' is not a shorthand"),
    ({"synth": {"options": {"count": 4}}}, "synth: needs data.tools and data.seeds"),
    ({"label": {"source": "teacher", "options": {"samples": 0}}}, "samples"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_recipe_fails_at_load_naming_the_field(tmp_path, change, message):
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart-cpu.yaml").read_text())
    for key, value in change.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = _cli("run", str(path), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
