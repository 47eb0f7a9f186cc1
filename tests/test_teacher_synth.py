"""`fcd synth` end to end against a local endpoint replaying recorded generator and judge replies: the
exact stage table (format, execution, duplicates, contamination, semantic), irrelevance by function
masking at the target ratio, the stratified split and exports; resume after a kill; and the pieces
(dedup, contamination, split, templates, seeds) on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcdistill.data.dedup import DuplicateIndex, EvalIndex, stratified_split, stratum
from fcdistill.devtools.replay_teacher import ReplayServer
from fcdistill.teacher.config import TeacherConfig, TeacherError
from fcdistill.teacher.inputs import Domain, SynthOptions, example_domain, load_seeds, load_tools
from fcdistill.teacher.plan import plan_jobs
from fcdistill.teacher.synth import run_synth
from fcdistill.teacher.templates import load_templates
from fcdistill.tools import ToolCall

FCD = str(Path(sys.executable).with_name("fcd"))
TOOLS = [
    {"type": "function", "function": {"name": "set_timer", "description": "Start a kitchen timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                                         "label": {"type": "string"}}, "required": ["minutes"]}}},
    {"type": "function", "function": {"name": "lookup_city", "description": "Facts about a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "fields": {"type": "array", "minItems": 1,
                                                    "items": {"type": "string", "enum": ["population", "area"]}}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "send_note", "description": "Send a short note.", "parameters": {
        "type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}, "required": ["to", "body"]}}},
]
SEEDS = [
    {"id": "s1", "query": "Start a 3 minute timer for the eggs.", "calls": [{"name": "set_timer", "arguments": {"minutes": 3, "label": "eggs"}}]},
    {"id": "s2", "query": "How many people live in Porto, Portugal?", "calls": [{"name": "lookup_city", "arguments": {"city": "Porto", "fields": ["population"]}}]},
    {"id": "s3", "query": "Send Ana a note saying I'm late.", "function_calls": [{"function_name": "send_note", "arguments": {"to": "Ana", "body": "I'm late"}}]},
]
IMPL = "def set_timer(minutes, label=None):\n    if label == 'fail':\n        raise RuntimeError('timer service refused the label')\n    return {'ok': True}\n" \
       "def lookup_city(city, fields=('population',)):\n    return {'city': city}\n" \
       "def send_note(to, body):\n    return {'sent': True}\n"
EVAL_Q = "Please tell me the population and the area of the beautiful old city of Lyon in France today"

TIMER = [  # the generator's recorded reply to the set_timer request
    {"query": "Set a timer for 10 minutes called tea.", "calls": [{"name": "set_timer", "arguments": {"minutes": 10, "label": "tea"}}]},
    {"query": "Timer for ten minutes please.", "calls": [{"name": "set_timer", "arguments": {"minutes": "ten"}}]},
    {"query": "Set a 5 minute timer labelled fail.", "calls": [{"name": "set_timer", "arguments": {"minutes": 5, "label": "fail"}}]},
    {"query": "set a timer for 10 minutes   called TEA.", "calls": [{"name": "set_timer", "arguments": {"minutes": 10, "label": "TEA"}}]},
]
CITY = [  # ... and to the lookup_city request
    {"query": "What is the population of Lyon?", "calls": [{"name": "lookup_city", "arguments": {"city": "Lyon", "fields": ["population"]}}]},
    {"query": "What is the area of Nice?", "calls": [{"name": "lookup_city", "arguments": {"city": "Nice", "fields": ["population"]}}]},
    {"query": "Quick one: " + EVAL_Q, "calls": [{"name": "lookup_city", "arguments": {"city": "Lyon", "fields": ["population", "area"]}}]},
    {"query": "How many people live in Porto, Portugal ?", "calls": [{"name": "lookup_city", "arguments": {"city": "Porto", "fields": ["population"]}}]},
]


def _script() -> dict:
    verdict = lambda ok, why: {"content": json.dumps({"thought": why, "pass": ok})}  # noqa: E731
    return {"rules": [
        {"match": ["exactly one call to set_timer."], "replies": [{"content": json.dumps(TIMER)}]},
        {"match": ["exactly one call to lookup_city."], "replies": [{"content": json.dumps(CITY)}]},
        {"match": ["User request: What is the area of Nice?"], "replies": [verdict(False, "asks for area, calls population")]},
        {"match": ["calls no function"], "replies": [verdict(True, "no listed function sets timers or looks up cities")]},
        {"match": ["strict reviewer"], "replies": [verdict(True, "correct")]},
    ]}


@pytest.fixture()
def domain_files(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "seeds.jsonl").write_text("\n".join(json.dumps(s) for s in SEEDS) + "\n")
    (tmp_path / "impl.py").write_text(IMPL)
    ev = tmp_path / "evaldata"
    ev.mkdir()
    (ev / "manifest.json").write_text(json.dumps({"splits": {"train": [], "eval": ["simple_python_7"]}}))
    (ev / "eval.jsonl").write_text(json.dumps({"id": "simple_python_7", "messages": [{"role": "user", "content": EVAL_Q}]}) + "\n")
    return tmp_path


def _opts(d: Path, out: Path, **kw) -> SynthOptions:
    base = dict(out=out, count=8, per_request=4, styles={"simple": 1.0}, irrelevance_ratio=0.34, shots=2,
                exec_module=str(d / "impl.py"), eval_data=d / "evaldata", val_fraction=0.5, seed=0)
    return SynthOptions(**{**base, **kw})


def _cfg(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(**{"base_url": url, "model": "replay", "progress": False, "api_key_env": None, **kw})


def _domain(d: Path) -> Domain:
    tools = load_tools(d / "tools.json")
    return Domain(tools, load_seeds(d / "seeds.jsonl", tools))


def test_plan_targets_each_function(domain_files):
    jobs = plan_jobs(_domain(domain_files), _opts(domain_files, domain_files / "o"))
    assert [j.style for j in jobs] == ["simple", "simple"] and [j.n for j in jobs] == [4, 4]
    assert {j.targets[0] for j in jobs} == {"set_timer", "lookup_city"}  # the test's recorded replies rely on it
    assert all(j.shots[0].calls[0].name == j.targets[0] for j in jobs)  # related seeds come first


def test_stage_table_irrelevance_split_and_exports(domain_files, smollm2_dir):
    d = domain_files
    out = d / "out"
    with ReplayServer(_script()) as srv:
        res = run_synth(_cfg(srv.url, concurrency=4), _opts(d, out, export=["openai", "trl"]), load_templates(),
                        _domain(d))
    assert res.relevant.row() == {"generated": 8, "fail format": 1, "fail execution": 1, "fail semantic": 1,
                                  "duplicates": 2, "contaminated": 1, "kept": 2}
    assert res.relevant.reasons["format"] == {"type": 1}
    assert res.relevant.reasons["duplicates"] == {"exact": 1, "near": 1}
    assert res.irrelevance.row()["generated"] == 1 and res.irrelevance.kept == 1 and res.irrelevance_target == 1
    assert res.total.row() == {"generated": 9, "fail format": 1, "fail execution": 1, "fail semantic": 1,
                               "duplicates": 2, "contaminated": 1, "kept": 3}
    audit = {r["query"] + ("|irr" if r["source_id"] else ""): r for r in map(json.loads, (out / "generated.jsonl").read_text().splitlines())}
    assert audit["set a timer for 10 minutes   called TEA."]["duplicate_of"] == audit["Set a timer for 10 minutes called tea."]["id"]
    assert audit["How many people live in Porto, Portugal ?"]["duplicate_of"] == "seed:s2"
    assert "timer service refused" in audit["Set a 5 minute timer labelled fail."]["reasons"][0]["detail"]
    assert audit["Quick one: " + EVAL_Q]["reasons"][0]["code"] == "eval_overlap"
    assert audit["What is the area of Nice?"]["verdict"] == {"thought": "asks for area, calls population", "pass": False}
    assert audit["What is the population of Lyon?"]["exec_results"] == [{"ok": True, "result": {"city": "Lyon"}, "error": None}]
    # irrelevance: the source's query without the functions it calls, target text, same split as its source
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    rows = {r["id"]: r for r in train + val}
    irr = [r for r in rows.values() if r["category"] == "synth_irrelevance"]
    assert len(irr) == 1 and "ground_truth" not in irr[0] and irr[0]["target_content"]
    src = rows[irr[0]["id"].removesuffix("-irr")]
    masked = {c["name"] for c in src["ground_truth"]}
    assert masked.isdisjoint(t["name"] for t in irr[0]["tools"]) and irr[0]["tools"]
    assert irr[0]["messages"] == src["messages"] and irr[0]["split"] == src["split"]
    assert len(train) + len(val) == 3
    assert sorted(r["split"] for r in rows.values() if r["category"] != "synth_irrelevance") == ["train", "val"]
    # exports: Record rows the data stage reads, and OpenAI chat records
    from fcdistill.data.bfcl import Record
    from fcdistill.data.export import export_split

    assert all(Record.model_validate(r).has_target for r in train)
    oa = [json.loads(x) for x in (out / "export" / "train.openai.jsonl").read_text().splitlines()]
    assert {r["id"] for r in oa} == {r["id"] for r in train} and all(r["messages"][-1]["role"] == "assistant" for r in oa)
    path, n, _ = export_split(out, "train", "openai", d / "x.jsonl", labels="ground-truth")
    assert n == len(train)
    trl = [json.loads(x) for x in (out / "export" / "train.trl.jsonl").read_text().splitlines()]
    for row in trl:  # the wire format: tools in the system prompt, calls after the FC token
        rec = rows[row["id"]]
        assert "set_timer" in row["prompt"] or "lookup_city" in row["prompt"] or "send_note" in row["prompt"]
        assert row["completion"].startswith("<tool_call>[") == ("ground_truth" in rec)
    report = json.loads((out / "report.json").read_text())
    assert report["stage_table"]["consistent"] and report["irrelevance_ratio_kept"] == pytest.approx(1 / 3)


def test_teacher_answer_mode_and_structured_tool_replies(domain_files):
    """--answer teacher: the generator writes queries (here as a forced schema-tool call), the teacher
    answers them with the tools; without exec/eval/judge those stages are reported as not run."""
    d = domain_files
    queries = {"examples": ["Set a 7 minute timer.", "Timer please."]}
    script = {"rules": [
        {"match": ["exactly one call to set_timer."], "tool": "submit_examples",
         "replies": [{"tool_calls": [{"name": "submit_examples", "arguments": queries}]}]},
        {"match": ["exactly one call to lookup_city."], "tool": "submit_examples",
         "replies": [{"tool_calls": [{"name": "submit_examples", "arguments": "{\"examples\": [42]}"}]}]},
        {"match": ["Set a 7 minute timer."], "tool": "set_timer",
         "replies": [{"tool_calls": [{"name": "set_timer", "arguments": {"minutes": 7}}]}]},
        {"match": ["Timer please."], "replies": [{"content": "For how long?"}]},
    ]}
    with ReplayServer(script) as srv:
        res = run_synth(_cfg(srv.url, structured="tool"), _opts(d, d / "o2", answer="teacher", exec_module=None,
                                                                eval_data=None, judge=False, irrelevance_ratio=0.0),
                        load_templates(), _domain(d))
    assert res.relevant.row() == {"generated": 3, "fail format": 2, "fail execution": 0, "fail semantic": 0,
                                  "duplicates": 0, "contaminated": 0, "kept": 1}
    assert res.relevant.reasons["format"] == {"malformed_example": 1, "no_call": 1}
    assert set(res.relevant.skipped) == {"execution", "contamination", "semantic"}


def test_unparsable_generator_reply_is_counted_not_fatal(domain_files):
    d = domain_files
    script = {"rules": [{"match": ["Task:"], "replies": [{"content": "Here are some great examples: 1. set a timer"}]}]}
    with ReplayServer(script) as srv:
        res = run_synth(_cfg(srv.url), _opts(d, d / "o3", judge=False), load_templates(), _domain(d))
    assert res.relevant.row()["generated"] == 2 and res.relevant.reasons["format"] == {"unparsable_reply": 2}
    assert res.total.kept == 0


def test_teacher_errors_are_reported_with_the_teachers_own_message(domain_files):
    """A teacher that refuses every request (HTTP 400, not retried): the run says why, not only how many."""
    d = domain_files
    with ReplayServer({"rules": []}) as srv:  # nothing matches: the replay teacher answers 400 with a reason
        res = run_synth(_cfg(srv.url), _opts(d, d / "o4", judge=False), load_templates(), _domain(d))
    assert res.teacher_errors == 8 and len(res.error_samples) == 1
    assert "400" in res.error_samples[0] and "no recorded reply matches" in res.error_samples[0]
    assert f"teacher error: {res.error_samples[0]}" in res.text()


def _synth_cmd(d: Path, out: Path, url: str) -> list[str]:
    return [FCD, "synth", "--out", str(out), "--tools", str(d / "tools.json"), "--seeds", str(d / "seeds.jsonl"),
            "--count", "8", "--per-request", "4", "--styles", "simple=1", "--irrelevance-ratio", "0.34",
            "--shots", "2", "--exec-module", str(d / "impl.py"), "--eval-data", str(d / "evaldata"),
            "--val-fraction", "0.5", "--seed", "0", "--base-url", url, "--model", "replay", "--concurrency", "1",
            "--no-progress", "--api-key-env", "FCD_NO_SUCH_KEY"]


def test_killed_synth_resumes_without_repeating_requests(domain_files):
    d = domain_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with ReplayServer(_script()) as ref_srv:  # an uninterrupted reference run
        ref = subprocess.run(_synth_cmd(d, d / "ref", ref_srv.url), env=env, capture_output=True, text=True, timeout=120)
        assert ref.returncode == 0, ref.stderr
        n_requests = ref_srv.stats()["total"]
    assert n_requests >= 6
    script = {**_script(), "hang_on": [4]}  # generation, generation, judge, then hang on the 4th
    with ReplayServer(script) as srv:
        proc = subprocess.Popen(_synth_cmd(d, d / "run", srv.url), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while srv.stats()["hanging"] != 1:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        srv.release()
        assert not (d / "run" / "train.jsonl").exists()  # outputs are only written, atomically, at the end
        rerun = subprocess.run(_synth_cmd(d, d / "run", srv.url), env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        st = srv.stats()
    assert set(st["ok_by_key"].values()) == {1} and len(st["ok_by_key"]) == n_requests
    assert st["total"] == n_requests + 1  # the only repeat: the request that never got its answer
    for name in ("train.jsonl", "val.jsonl", "generated.jsonl"):
        assert (d / "run" / name).read_text() == (d / "ref" / name).read_text(), name
    assert json.loads((d / "run" / "report.json").read_text())["stage_table"] == \
        json.loads((d / "ref" / "report.json").read_text())["stage_table"]


def test_cli_bad_input_exits_2(domain_files):
    d = domain_files
    cases = [
        (["--tools", str(d / "tools.json")], "give both --tools and --seeds"),
        (["--styles", "simple=1,fancy=2"], "unknown style"),
        (["--exec-module", str(d / "missing.py")], "not a Python file"),
        (["--eval-data", str(d / "nowhere")], "--eval-data"),
        (["--irrelevance-ratio", "1.5"], "irrelevance_ratio"),
        (["--export", "csv"], "--export"),
    ]
    for extra, message in cases:
        r = subprocess.run([FCD, "synth", "--out", str(d / "bad"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                            "--no-progress", *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)


def test_unreachable_teacher_is_reported_at_once(tmp_path):
    """Before any generation: one line naming the URL, exit 2, no report of zeros written."""
    started = time.monotonic()
    r = subprocess.run([FCD, "synth", "--out", str(tmp_path / "s"), "--base-url", "http://127.0.0.1:9/v1", "--model",
                        "m", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "teacher endpoint http://127.0.0.1:9/v1 is unreachable" in r.stderr, r.stderr
    assert "Connection refused" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 10 and not (tmp_path / "s").exists()


def test_seed_and_tool_files_are_checked(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    tools = load_tools(tmp_path / "t.json")
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps(SEEDS[0]) + "\n" + json.dumps({"query": "x", "calls": [{"name": "set_timer", "arguments": {"minutes": 0}}]}) + "\n")
    with pytest.raises(TeacherError, match="line 2: seed does not fit the tools"):
        load_seeds(bad, tools)
    bad.write_text('{"query": "x"}\n')
    with pytest.raises(TeacherError, match="line 1: needs \"calls\""):
        load_seeds(bad, tools)
    (tmp_path / "t2.json").write_text('{"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "blob"}}}}]}')
    with pytest.raises(TeacherError, match="unknown parameter type 'blob'"):
        load_tools(tmp_path / "t2.json")


def test_shipped_example_domain_and_templates(tmp_path):
    dom = example_domain()
    assert len(dom.tools) == 6 and len(dom.seeds) == 12 and dom.implementations.is_file()
    styles = {"simple": 1.0, "multiple": 1.0, "parallel": 1.0, "parallel_multiple": 1.0}
    jobs = plan_jobs(dom, SynthOptions(out=tmp_path, count=40, per_request=4, styles=styles))
    assert {j.style for j in jobs} == set(styles) and {t for j in jobs for t in j.targets} == {t.name for t in dom.tools}
    assert all(len(j.tools) >= 2 for j in jobs if j.style in ("multiple", "parallel_multiple"))
    t = tmp_path / "t.yaml"
    t.write_text("judge:\n  user: 'Query: $query $tolls'\n")
    with pytest.raises(TeacherError, match=r"judge.user uses unknown placeholder\(s\) \['tolls'\]"):
        load_templates(t)
    t.write_text("styles:\n  simple: 'one call to $targets only'\n")
    assert load_templates(t).render("styles.simple", targets="f") == "one call to f only"


def test_duplicate_index_exact_near_and_threshold():
    idx = DuplicateIndex(threshold=0.8)
    assert idx.check("a", "Book a table for two at 7pm tonight.")[0] == "unique"
    assert idx.check("b", "book a table  for two at 7pm TONIGHT.")[:2] == ("exact", "a")
    kind, other, j = idx.check("c", "Book a table for two at 7pm tonight!")
    assert (kind, other) == ("near", "a") and 0.8 <= j < 1
    assert idx.check("d", "Book a table for six at 9pm tomorrow.")[0] == "unique"
    strict = DuplicateIndex(threshold=0.99)
    strict.check("a", "Book a table for two at 7pm tonight.")
    assert strict.check("c", "Book a table for two at 7pm tonight!")[0] == "unique"


def test_eval_index_ids_ngrams_and_short_queries():
    ix = EvalIndex({"e1"}, {"e1": EVAL_Q, "e2": "what is the weather like in the city of Paris today"}, n=13, min_words=8)
    assert ix.check(["x", "e1"], "anything") == "id e1 is in the eval split"
    assert "13-gram" in ix.check([], "So: " + EVAL_Q.lower() + " thanks")
    assert ix.check([], "Please tell me the population and the area of the old city of Lyon") is None
    assert "whole" in ix.check([], "the weather like in the city of Paris")  # 8 words, inside e2
    assert ix.check([], "the weather in Paris") is None  # too short to call


def test_stratified_split_is_exact_proportional_and_seeded():
    items = [(f"a{i}", "f(x)") for i in range(40)] + [(f"b{i}", "g(y)") for i in range(20)] + [("c0", "h()")]
    s1 = stratified_split(items, 0.25, seed=3)
    assert stratified_split(items, 0.25, seed=3) == s1 and stratified_split(items, 0.25, seed=4) != s1
    val = [i for i, s in s1.items() if s == "val"]
    assert abs(len(val) - 61 * 0.25) <= 1
    assert abs(sum(i.startswith("a") for i in val) - 10) <= 1 and abs(sum(i.startswith("b") for i in val) - 5) <= 1
    assert stratum([ToolCall(name="g", arguments={"b": 1, "a": 2}), ToolCall(name="f")]) == "f()+g(a,b)"
    assert stratum([]) == "<no call>"


def test_verify_command_on_outside_examples(tmp_path):
    from fcdistill.teacher.inputs import example_domain

    tools = example_domain().implementations.with_name("travel_tools.json")
    lines = [
        json.dumps({"id": "ok", "style": "simple", "query": "How much is 40 GBP in EUR?",
                    "calls": [{"name": "convert_currency", "arguments": {"amount": 40, "from_currency": "GBP", "to_currency": "EUR"}}]}),
        json.dumps({"id": "type", "query": "Weather in Oslo for two days",
                    "calls": [{"name": "get_weather_forecast", "arguments": {"city": "Oslo", "days": "2"}}]}),
        "{not json",
        json.dumps({"id": "none", "query": "Order me a pizza.", "calls": [], "content": "I cannot order food."}),
        json.dumps({"id": "exec", "query": "Convert 5 USD to USD.",
                    "calls": [{"name": "convert_currency", "arguments": {"amount": 5, "from_currency": "USD", "to_currency": "USD"}}]}),
        json.dumps({"id": "dup", "query": "how much is 40 GBP in EUR?",
                    "calls": [{"name": "convert_currency", "arguments": {"amount": 40, "from_currency": "GBP", "to_currency": "EUR"}}]}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run([FCD, "verify", "--input", str(tmp_path / "in.jsonl"), "--tools", str(tools), "--exec-module",
                        "example", "--out", str(tmp_path / "v"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "v" / "report.json").read_text())["stage_table"]
    assert report["generated"] == 6 and report["kept"] == 2 and report["consistent"]
    assert report["failed"] == {"format": 2, "execution": 1, "duplicates": 1, "contamination": 0, "semantic": 0}
    assert report["reasons"]["format"] == {"type": 1, "unparsable_line": 1}
    kept = {k["id"]: k for k in map(json.loads, (tmp_path / "v" / "verified.jsonl").read_text().splitlines())}
    assert set(kept) == {"ok", "none"} and kept["none"]["target_content"] == "I cannot order food."
    assert kept["ok"]["ground_truth"][0]["name"] == "convert_currency"
    r = subprocess.run([FCD, "verify", "--input", str(tmp_path / "in.jsonl"), "--tools", str(tools), "--judge",
                        "--out", str(tmp_path / "v2")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--judge needs a teacher" in r.stderr
