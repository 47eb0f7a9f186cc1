"""The whole label -> synth -> verify path against a real `fcd serve` endpoint running SmolLM2-135M:
real HTTP, the real client, auth, caching. SmolLM2 is a stand-in teacher (it is far too small to be a
good one), so this checks the plumbing and the bookkeeping, not the quality of its labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SERVE_KEY
from fcdistill.data.bfcl import SplitOptions, prepare_bfcl, read_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
FCD = str(Path(sys.executable).with_name("fcd"))
KEY = SERVE_KEY


@pytest.fixture(scope="module")
def serve(hf_server) -> str:
    return f"{hf_server}/v1"  # the session's shared server (conftest), which wants KEY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e_data")
    prepare_bfcl(SplitOptions(categories=["simple_python", "irrelevance"], mix_in_fraction=0.25, seed=5,
                              max_per_category={"simple_python": 8, "irrelevance": 4}), d)
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FCD_E2E_KEY": KEY}


def _teacher(url: str, *extra: str) -> list[str]:
    # a CPU student answering 4 requests at once on a busy 2-core machine can take minutes for one long
    # answer: the default 120 s an attempt timed out on an AVX2-only machine under the test suite
    return ["--base-url", url, "--model", "smollm2-135m", "--api-key-env", "FCD_E2E_KEY", "--concurrency", "4",
            "--timeout", "600", "--no-progress", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def test_label_against_fcd_serve(serve, data):
    cmd = [FCD, "label", "--data", str(data), "--limit", "3", "--samples", "2",
           *_teacher(serve, "--temperature", "0.7", "--max-tokens", "48")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    labels = data / "labels"
    teach = [x for x in read_records(data, "train") if x.label_source == "teacher"][:3]
    mixin = [x for x in read_records(data, "train") if x.label_source == "ground_truth"]
    rows = _rows(labels / "teacher.jsonl") + _rows(labels / "rejected.jsonl")
    assert sorted(x["id"] for x in rows) == sorted(x.id for x in teach)
    for row in rows:
        assert row["n_samples"] == 2
        if row["status"] == "rejected":
            assert row["reasons"] and all(x["detail"] for x in row["reasons"])
        else:
            assert row["calls"] or row["content"] is not None
    checks = _rows(labels / "mixin_check.jsonl")
    assert {c["id"] for c in checks} == {x.id for x in mixin} and all(isinstance(c["correct"], bool) for c in checks)
    summary = json.loads((labels / "summary.json").read_text())
    client = summary["client"]
    assert client["answered"] == 2 * (3 + len(mixin)) == client["status_counts"]["200"]
    assert client["prompt_tokens"] > 0 and client["completion_tokens"] > 0
    # a rerun is free: everything is done, nothing is asked again
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"already done {3 + len(mixin)}" in again.stdout
    # the wrong key is refused by the server, reported with the variable to check, and not retried
    bad = subprocess.run([FCD, "label", "--data", str(data), "--out", str(data / "bad"), "--limit", "1", "--no-mix-in",
                          *_teacher(serve)], env={**_env(), "FCD_E2E_KEY": "wrong"}, capture_output=True, text=True,
                         timeout=300)
    # (refused up front, before any question is asked: exit 2 like every bad-input error)
    said = bad.stdout + bad.stderr
    assert bad.returncode == 2 and "HTTP 401" in said and "FCD_E2E_KEY" in said, said


def test_synth_then_verify_against_fcd_serve(serve, data, tmp_path):
    out = tmp_path / "synth"
    cmd = [FCD, "synth", "--out", str(out), "--count", "4", "--per-request", "2", "--styles", "simple=1",
           "--answer", "teacher", "--exec-module", "example", "--eval-data", str(data), "--irrelevance-ratio", "0.34",
           "--gen-max-tokens", "160", *_teacher(serve, "--structured", "tool", "--max-tokens", "64")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    table = report["stage_table"]
    assert table["consistent"] and table["generated"] >= 1
    assert report["client"]["answered"] >= 2 and report["client"]["failures"] == 0
    audited = _rows(out / "generated.jsonl")
    assert len(audited) == table["generated"]
    for row in audited:
        assert (row["status"] == "kept") == (not row["reasons"])
    (out.parent / "synth_report.md").write_text((out / "report.md").read_text())  # for a human to read
    print((out / "report.md").read_text())

    # verify: the shipped seeds, judged by the same endpoint (verdicts via a forced schema-tool call)
    from fcdistill.teacher.inputs import example_domain

    dom = example_domain()
    seeds = dom.implementations.with_name("travel_seeds.jsonl").read_text().splitlines()[:2]
    (tmp_path / "in.jsonl").write_text("\n".join(seeds) + "\n")
    v = subprocess.run([FCD, "verify", "--input", str(tmp_path / "in.jsonl"), "--tools",
                        str(dom.implementations.with_name("travel_tools.json")), "--exec-module", "example", "--judge",
                        "--out", str(tmp_path / "v"), *_teacher(serve, "--structured", "tool", "--max-tokens", "96")],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert v.returncode == 0, v.stdout + v.stderr
    vr = json.loads((tmp_path / "v" / "report.json").read_text())
    assert vr["stage_table"]["generated"] == 2 and vr["stage_table"]["consistent"]
    assert "semantic" not in vr["stage_table"]["skipped_stages"] and vr["client"]["answered"] == 2
