"""`fcd label` against a real local HTTP endpoint replaying recorded teacher replies: verification and
rejection reasons, self-consistency voting, teacher accuracy on mix-in with bfcl_eval's checker, the
merge into training records, and resume after a kill (nothing lost, duplicated, or asked twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcdistill.data.bfcl import SplitOptions, prepare_bfcl, read_records
from fcdistill.data.labels import TEACHER_LABELED, apply_teacher_labels
from fcdistill.devtools.replay_teacher import ReplayServer
from fcdistill.jsonl import JsonlLog, repair_jsonl
from fcdistill.teacher.ask import CallAnswer
from fcdistill.teacher.config import TeacherConfig, TeacherError
from fcdistill.teacher.label import LabelOptions, Sample, canonical_key, majority_vote, run_label
from fcdistill.teacher.templates import load_templates
from fcdistill.tools import ToolCall, safe_tool_names

FCD = str(Path(sys.executable).with_name("fcd"))


def _prepare(out: Path, caps: dict[str, int], mix_in: float = 0.2) -> list:
    cats = list(caps)
    prepare_bfcl(SplitOptions(categories=cats, max_per_category=caps, mix_in_fraction=mix_in, seed=3), out)
    return read_records(out, "train")


def _match(rec) -> dict:
    q = rec.messages[-1]["content"]
    return {"match": ['"content": ' + json.dumps(q, ensure_ascii=False)],
            "tool": safe_tool_names(rec.tools)[rec.tools[0].name]}


def _oracle(rec) -> dict:
    """What a perfect teacher answers: BFCL's canonical calls (tool names made API-safe), or text."""
    names = safe_tool_names(rec.tools)
    if rec.ground_truth:
        return {"tool_calls": [{"name": names[c.name], "arguments": c.arguments} for c in rec.ground_truth]}
    return {"content": "Sorry, none of these functions can do that."}


def _rules(records, overrides: dict[str, list[dict]] | None = None) -> list[dict]:
    overrides = overrides or {}
    rules = []
    for r in records:
        rules.append({**_match(r), "replies": overrides.get(r.id, [_oracle(r)])})
    return rules


def _cfg(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(**{"base_url": url, "model": "replay", "progress": False, "api_key_env": None,
                            "backoff_initial_s": 0.01, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("label_data")
    records = _prepare(d, {"simple_python": 24, "parallel": 12, "irrelevance": 10})
    return d, records


def _by(records, category, source):
    return [r for r in records if r.category == category and r.label_source == source]


def test_label_verifies_votes_and_scores_the_teacher(data, tmp_path):
    d, records = data
    simple = _by(records, "simple_python", "teacher")
    parallel = _by(records, "parallel", "teacher")
    irrelevant = _by(records, "irrelevance", "teacher")
    mix = _by(records, "simple_python", "ground_truth")
    assert len(simple) >= 6 and len(parallel) >= 2 and irrelevant and len(mix) >= 2
    a, b, c, e, f, g = simple[:6]
    name = lambda r: safe_tool_names(r.tools)[r.tools[0].name]  # noqa: E731
    first_arg = lambda r: next(iter(r.ground_truth[0].arguments))  # noqa: E731
    wrong_type = {"tool_calls": [{"name": name(a), "arguments": {**a.ground_truth[0].arguments, first_arg(a): [1, 2]}}]}
    alt_c = {"tool_calls": [{"name": name(c), "arguments": {**c.ground_truth[0].arguments, "extra_unknown": 1}}]}
    e_alt1 = {"tool_calls": [{"name": name(e), "arguments": e.ground_truth[0].arguments}]}
    e_alt2 = {"content": "I would rather not."}
    g_valid_but_different = dict(g.ground_truth[0].arguments)
    overrides = {
        a.id: [wrong_type],                                          # rejected: format/type
        b.id: [{"content": "Let me think about it."}],               # rejected: a simple item needs a call
        c.id: [_oracle(c), _oracle(c), alt_c],                       # 2 of 3 valid and agreeing: accepted, 2/3
        e.id: [e_alt1, e_alt2, e_alt2],                              # only 1 valid sample of 3: below 0.5
        f.id: [{"tool_calls": [{"name": name(f), "arguments": "{not json"}]}],  # malformed arguments
        parallel[0].id: [{"tool_calls": _oracle(parallel[0])["tool_calls"][:1]}],  # parallel needs >= 2 calls
        irrelevant[0].id: [{"tool_calls": [{"name": name(irrelevant[0]), "arguments": {}}]}],  # a call where none fits
        mix[0].id: [{"tool_calls": [{"name": name(mix[0]), "arguments": {}}]}],  # wrong on a mix-in item
    }
    with ReplayServer({"rules": _rules(records, overrides)}) as srv:
        opts = LabelOptions(data=d, out=tmp_path / "labels", samples=3, min_agreement=0.5)
        summary = run_label(_cfg(srv.url, temperature=0.7, concurrency=4), opts, load_templates())
        served = srv.stats()["total"]
    out = tmp_path / "labels"
    accepted = {r["id"]: r for r in map(json.loads, (out / "teacher.jsonl").read_text().splitlines())}
    rejected = {r["id"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    checks = {r["id"]: r for r in map(json.loads, (out / "mixin_check.jsonl").read_text().splitlines())}
    teach = [r for r in records if r.label_source == "teacher"]
    assert set(accepted) | set(rejected) == {r.id for r in teach} and not set(accepted) & set(rejected)
    reason = lambda i: (rejected[i]["reasons"][0]["stage"], rejected[i]["reasons"][0]["code"])  # noqa: E731
    assert reason(a.id) == ("format", "type")
    assert reason(b.id) == ("format", "no_call")
    assert reason(e.id) == ("vote", "low_agreement") and rejected[e.id]["agreement"] == pytest.approx(1 / 3)
    assert reason(f.id) == ("format", "malformed_calls")
    assert reason(parallel[0].id) == ("format", "call_count")
    assert reason(irrelevant[0].id) == ("format", "unexpected_call")
    assert accepted[c.id]["agreement"] == pytest.approx(2 / 3) and accepted[c.id]["votes"] == 2
    assert accepted[c.id]["calls"] == [x.model_dump() for x in c.ground_truth]
    assert accepted[g.id]["calls"][0]["arguments"] == g_valid_but_different and accepted[g.id]["agreement"] == 1.0
    assert all(accepted[r.id]["content"] and not accepted[r.id]["calls"] for r in irrelevant[1:])
    # teacher accuracy on mix-in, scored by bfcl_eval's ast_checker (dotted names included)
    mixin = [r for r in records if r.label_source == "ground_truth"]
    assert set(checks) == {r.id for r in mixin}
    assert checks[mix[0].id]["correct"] is False and checks[mix[0].id]["error"]
    assert all(checks[r.id]["correct"] for r in mixin if r.id != mix[0].id)
    s = json.loads((out / "summary.json").read_text())
    assert s["mixin_accuracy"] == pytest.approx((len(mixin) - 1) / len(mixin))
    assert s["accepted"] == len(accepted) and s["rejected"] == len(rejected) == 6
    assert s["client"]["requests"] == 3 * (len(teach) + len(mixin)) == served
    assert summary.teacher_errors == 0


def test_rerun_is_free_and_settings_change_is_refused(data, tmp_path):
    d, records = data
    with ReplayServer({"rules": _rules(records)}) as srv:
        opts = LabelOptions(data=d, out=tmp_path / "l", mix_in=False)
        run_label(_cfg(srv.url), opts, load_templates())
        first = srv.stats()["total"]
        again = run_label(_cfg(srv.url), opts, load_templates())
        assert srv.stats()["total"] == first and again.already_done == again.teacher_items
        with pytest.raises(TeacherError, match="different settings"):
            run_label(_cfg(srv.url, temperature=0.5), LabelOptions(data=d, out=tmp_path / "l", mix_in=False,
                                                                   samples=2), load_templates())


def test_apply_teacher_labels_replaces_targets(data, tmp_path):
    d, records = data
    simple = _by(records, "simple_python", "teacher")
    r0, r1, r2 = simple[:3]
    name = safe_tool_names(r0.tools)[r0.tools[0].name]
    changed = dict(r0.ground_truth[0].arguments)
    overrides = {r0.id: [{"tool_calls": [{"name": name, "arguments": changed}]}],
                 r1.id: [{"content": "no"}]}
    labels_dir = d / "labels"
    with ReplayServer({"rules": _rules(records, overrides)}) as srv:
        run_label(_cfg(srv.url), LabelOptions(data=d, mix_in=False, overwrite=True), load_templates())
    merged, notes = apply_teacher_labels(records, d)
    by_id = {r.id: r for r in merged}
    assert by_id[r0.id].label_source == TEACHER_LABELED and by_id[r0.id].ground_truth[0].arguments == changed
    assert by_id[r1.id].label_source == "teacher" and any(n.startswith(f"{r1.id}: teacher label rejected: format/no_call") for n in notes)
    irr = _by(records, "irrelevance", "teacher")[0]
    assert by_id[irr.id].ground_truth is None and by_id[irr.id].target_content.startswith("Sorry")
    mix = [r for r in records if r.label_source == "ground_truth"]
    assert all(by_id[r.id] == r for r in mix)  # mix-in keeps its ground truth
    # a label whose question changed is stale and not applied
    edited = r2.model_copy(update={"messages": [{"role": "user", "content": "something else"}]})
    merged2, notes2 = apply_teacher_labels([edited], d)
    assert merged2[0].label_source == "teacher" and "stale" in notes2[0]
    # labels never leak into other runs' directories
    assert labels_dir.is_dir()


def test_majority_vote_orders_and_ties():
    c1 = [ToolCall(name="f", arguments={"x": 1}), ToolCall(name="g", arguments={"y": 2.0})]
    c2 = [ToolCall(name="g", arguments={"y": 2}), ToolCall(name="f", arguments={"x": 1})]
    assert canonical_key(c1) == canonical_key(c2)  # order of parallel calls and 2 == 2.0 do not split votes
    s = lambda i, calls: Sample(i, CallAnswer(calls=calls))  # noqa: E731
    v = majority_vote([s(0, [ToolCall(name="a")]), s(1, [ToolCall(name="b")]), s(2, [ToolCall(name="b")])])
    assert v.winner.index == 1 and v.votes == 2 and v.agreement == pytest.approx(2 / 3)
    tie = majority_vote([s(0, [ToolCall(name="a")]), s(1, [ToolCall(name="b")])])
    assert tie.winner.index == 0 and tie.agreement == 0.5
    bad = Sample(0, CallAnswer(transport_error="x"))
    assert majority_vote([bad]).winner is None


def test_torn_line_is_repaired(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "cal')
    assert [r["id"] for r in repair_jsonl(p)] == ["a", "b"]
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    log = JsonlLog(p)
    log.append({"id": "b"})  # already there: not duplicated
    log.append({"id": "c"})
    log.close()
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "b", "c"]


def _label_cmd(d: Path, url: str, *extra: str) -> list[str]:
    return [FCD, "label", "--data", str(d), "--base-url", url, "--model", "replay", "--no-mix-in", "--no-progress",
            "--api-key-env", "FCD_NO_SUCH_KEY", "--timeout", "60", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def test_kill_mid_run_then_resume_loses_and_repeats_nothing(tmp_path):
    d = tmp_path / "data"
    records = _prepare(d, {"simple_python": 30}, mix_in=0.1)
    teach = [r for r in records if r.label_source == "teacher"][:12]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with ReplayServer({"rules": _rules(records), "hang_on": [5]}) as srv:
        args = _label_cmd(d, srv.url, "--samples", "2", "--temperature", "0.5", "--concurrency", "3", "--limit", "12")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        labels = d / "labels" / "teacher.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every request but the hung one answered, their items written
            st = srv.stats()
            if st["total"] == 24 and st["hanging"] == 1 and len(_lines(labels)) == 11:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail(f"run did not reach the kill point: {srv.stats()}")
        with labels.open("a") as f:  # and a torn half line, as if killed mid-write
            f.write('{"id": "simple_python_x", "sta')
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        srv.release()
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        st = srv.stats()
    rows = _lines(labels) + _lines(d / "labels" / "rejected.jsonl")
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r.id for r in teach)  # nothing lost, nothing duplicated
    assert all(r["status"] == "ok" and r["n_samples"] == 2 for r in rows)
    assert len(st["ok_by_key"]) == 24 and set(st["ok_by_key"].values()) == {1}  # no answer was paid twice
    assert st["total"] == 25  # the 24 requests + the one that hung when the run was killed
    assert "already done 11" in rerun.stdout


def test_cli_bad_input_exits_2(tmp_path, data):
    d, _ = data
    r = subprocess.run([FCD, "label", "--data", str(tmp_path / "nope"), "--base-url", "http://127.0.0.1:9/v1",
                        "--model", "m"], capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([FCD, "label", "--data", str(d), "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                        "--samples", "3", "--out", str(tmp_path / "l")], capture_output=True, text=True)
    assert r.returncode == 2 and "--temperature > 0" in r.stderr
    r = subprocess.run([FCD, "label", "--data", str(d), "--model", "m"], capture_output=True, text=True)
    assert r.returncode == 2 and "--base-url" in r.stderr


def test_unreachable_teacher_is_reported_at_once_and_nothing_is_written(tmp_path, data):
    """The endpoint is checked before the first question, as `fcd eval run` does: no retries, no
    report of zeros, one line naming the URL."""
    d, _ = data
    started = time.monotonic()
    r = subprocess.run([FCD, "label", "--data", str(d), "--out", str(tmp_path / "l"), "--base-url",
                        "http://127.0.0.1:9/v1", "--model", "m", "--limit", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: teacher endpoint http://127.0.0.1:9/v1 is unreachable: "
                                             "ConnectError: [Errno 111] Connection refused"], r.stderr
    assert time.monotonic() - started < 10 and not (tmp_path / "l").exists()


def test_label_warns_when_there_is_no_mix_in_to_score_the_teacher(tmp_path):
    d = tmp_path / "d"
    _prepare(d, {"simple_python": 8}, mix_in=0.1)  # 4 train items: 10% rounds to none
    r = subprocess.run([FCD, "label", "--data", str(d), "--out", str(tmp_path / "l"), "--base-url",
                        "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"], capture_output=True, text=True)
    assert "warning:" in r.stderr and "no mix-in items" in r.stderr, r.stderr


def test_label_with_judge_rejects_what_the_judge_fails(data, tmp_path):
    d, records = data
    teach = _by(records, "simple_python", "teacher")[:3]
    q = teach[0].messages[-1]["content"]
    verdict = lambda ok: {"content": json.dumps({"thought": "checked", "pass": ok})}  # noqa: E731
    rules = [{"match": ["strict reviewer", json.dumps(q, ensure_ascii=False)[1:-1]], "replies": [verdict(False)]},
             {"match": ["strict reviewer"], "replies": [verdict(True)]},
             *_rules(records)]
    with ReplayServer({"rules": rules}) as srv:
        run_label(_cfg(srv.url), LabelOptions(data=d, out=tmp_path / "j", mix_in=False, judge=True, limit=3),
                  load_templates())
    accepted = {r["id"]: r for r in _lines(tmp_path / "j" / "teacher.jsonl")}
    rejected = {r["id"]: r for r in _lines(tmp_path / "j" / "rejected.jsonl")}
    assert set(rejected) == {teach[0].id} and rejected[teach[0].id]["reasons"][0]["code"] == "judge_rejected"
    assert all(accepted[r.id]["verdict"] == {"thought": "checked", "pass": True} for r in teach[1:])


def test_prompt_mode_labels_python_syntax_replies(data, tmp_path):
    from fcdistill.chat_format import render_python_calls

    d, records = data
    teach = _by(records, "simple_python", "teacher")[:2]
    rules = [{"match": [_match(r)["match"][0]], "replies": [{"content": render_python_calls(r.ground_truth)}]}
             for r in teach]
    with ReplayServer({"rules": rules}) as srv:
        run_label(_cfg(srv.url, mode="prompt"), LabelOptions(data=d, out=tmp_path / "p", mix_in=False, limit=2),
                  load_templates())
        system = srv.state.bodies[0]["messages"][0]
    accepted = {r["id"]: r for r in _lines(tmp_path / "p" / "teacher.jsonl")}
    assert {r.id: [c.model_dump() for c in r.ground_truth] for r in teach} == {i: a["calls"] for i, a in accepted.items()}
    assert system["role"] == "system" and "tools" not in srv.state.bodies[0]
