"""Every verification rule, on recorded teacher replies served over HTTP by the replay server: format
(JSON Schema incl. strict integers, null, enum, exclusive bounds, nested objects and arrays, unknown
arguments and functions, every call checked), style (call counts), semantic verdicts (strict JSON, never
`"yes" in text`), and execution in a subprocess with a timeout."""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest

from fcdistill.data.checks import Failure, format_failures, style_failures
from fcdistill.devtools.replay_teacher import ReplayServer
from fcdistill.teacher.ask import TeacherClient
from fcdistill.teacher.config import TeacherConfig
from fcdistill.teacher.execute import Executor
from fcdistill.teacher.judge import judge_answer, parse_verdict
from fcdistill.teacher.templates import load_templates
from fcdistill.teacher.verify import StageTable
from fcdistill.tools import ToolCall, call_errors, normalize_tools

TOOLS = normalize_tools([
    {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 5},
        "price": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "note": {"type": ["string", "null"]},
        "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "guest": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
                  "required": ["name"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "flag": {"type": "boolean"}}, "required": ["n", "kind"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
])
OK = {"n": 2, "kind": "a"}

# (name, recorded tool_calls of the teacher's reply, expected failure codes)
FORMAT_CASES = [
    ("valid_full", [{"name": "book", "arguments": {**OK, "price": 99.5, "note": None, "when": "2025-02-03", "code": "SFO",
                                                   "guest": {"name": "x", "age": 0}, "tags": ["t"], "flag": False}}], []),
    ("missing_required", [{"name": "book", "arguments": {"kind": "a"}}], ["missing_required"]),
    ("float_for_integer", [{"name": "book", "arguments": {**OK, "n": 2.0}}], ["type"]),
    ("bool_for_integer", [{"name": "book", "arguments": {**OK, "n": True}}], ["type"]),
    ("string_for_integer", [{"name": "book", "arguments": {**OK, "n": "2"}}], ["type"]),
    ("above_maximum", [{"name": "book", "arguments": {**OK, "n": 6}}], ["bounds"]),
    ("below_minimum", [{"name": "book", "arguments": {**OK, "n": 0}}], ["bounds"]),
    ("exclusive_minimum", [{"name": "book", "arguments": {**OK, "price": 0}}], ["bounds"]),
    ("exclusive_maximum", [{"name": "book", "arguments": {**OK, "price": 100}}], ["bounds"]),
    ("enum", [{"name": "book", "arguments": {**OK, "kind": "c"}}], ["enum"]),
    ("null_not_allowed", [{"name": "book", "arguments": {**OK, "flag": None}}], ["type"]),
    ("bad_date_format", [{"name": "book", "arguments": {**OK, "when": "2025-13-45"}}], ["format"]),
    ("pattern", [{"name": "book", "arguments": {**OK, "code": "sfo"}}], ["pattern"]),
    ("nested_missing_required", [{"name": "book", "arguments": {**OK, "guest": {"age": 3}}}], ["missing_required"]),
    ("nested_unknown_argument", [{"name": "book", "arguments": {**OK, "guest": {"name": "x", "vip": True}}}], ["unknown_argument"]),
    ("nested_bounds", [{"name": "book", "arguments": {**OK, "guest": {"name": "x", "age": -1}}}], ["bounds"]),
    ("array_too_short", [{"name": "book", "arguments": {**OK, "tags": []}}], ["length"]),
    ("array_too_long", [{"name": "book", "arguments": {**OK, "tags": ["a", "b", "c", "d"]}}], ["length"]),
    ("array_item_type", [{"name": "book", "arguments": {**OK, "tags": [1]}}], ["type"]),
    ("unknown_argument", [{"name": "book", "arguments": {**OK, "foo": 1}}], ["unknown_argument"]),
    ("unknown_function", [{"name": "cancel", "arguments": {}}], ["unknown_function"]),
    ("second_call_checked", [{"name": "book", "arguments": OK}, {"name": "book", "arguments": {"n": 9, "kind": "a"}}], ["bounds"]),
    ("duplicate_call", [{"name": "book", "arguments": OK}, {"name": "book", "arguments": OK}], ["duplicate_call"]),
    ("two_errors_one_call", [{"name": "book", "arguments": {"n": 0, "kind": "z"}}], ["bounds", "enum"]),
]


@pytest.fixture(scope="module")
def replay():
    rules = [{"match": [f"case:{name}"], "replies": [{"tool_calls": calls}]} for name, calls, _ in FORMAT_CASES]
    rules.append({"match": ["case:not_json"], "replies": [{"tool_calls": [{"name": "book", "arguments": "{'n': 1}"}]}]})
    with ReplayServer({"rules": rules}) as srv:
        yield srv


def _ask(url: str, queries: list[str]):
    async def go():
        cfg = TeacherConfig(base_url=url, model="replay", progress=False, api_key_env=None)
        async with TeacherClient(cfg) as t:
            return await asyncio.gather(*(t.ask_calls([{"role": "user", "content": q}], TOOLS) for q in queries))
    return asyncio.run(go())


def test_format_rules_on_recorded_replies(replay):
    answers = _ask(replay.url, [f"case:{name}" for name, _, _ in FORMAT_CASES])
    for (name, _, expected), answer in zip(FORMAT_CASES, answers):
        assert answer.error is None, name
        got = [f.code for f in format_failures(answer.calls, TOOLS)]
        assert sorted(got) == sorted(expected), (name, [str(f) for f in format_failures(answer.calls, TOOLS)])


SINGLE_CALL_CASES = [(name, calls[0], expected) for name, calls, expected in FORMAT_CASES if len(calls) == 1]
SINGLE_CALL_CASES += [("int_for_number", {"name": "book", "arguments": {**OK, "price": 5}}, []),
                      ("integer_valued_float_for_integer", {"name": "book", "arguments": {**OK, "n": 3.0}}, ["type"])]


def test_server_check_and_verifier_agree_on_every_call():
    """One validator: the check `fcd serve` runs on every call it returns (tools.call_errors), the format
    stage of labels and data (data.checks.format_failures) and the Verifier of `fcd synth`/`fcd verify`
    accept and reject exactly the same calls."""
    from fcdistill.data.dedup import DuplicateIndex
    from fcdistill.teacher.inputs import Example
    from fcdistill.teacher.verify import Verifier

    examples = [Example(id=name, style=None, query=f"query {name}", tools=TOOLS, calls=[ToolCall(**call)])
                for name, call, _ in SINGLE_CALL_CASES]
    verifier = Verifier(None, load_templates(), None, None, judge=False, progress=False)
    asyncio.run(verifier.run(examples, DuplicateIndex(threshold=1.0)))  # distinct queries: only format decides
    for (name, call, expected), ex in zip(SINGLE_CALL_CASES, examples):
        served = call_errors(ToolCall(**call), TOOLS)
        checked = format_failures([ToolCall(**call)], TOOLS)
        assert bool(served) == bool(checked) == (not ex.ok) == bool(expected), (name, served, checked, ex.failures)
        assert len(served) == len(checked), name


def test_failures_name_the_call_and_path(replay):
    (second,) = _ask(replay.url, ["case:second_call_checked"])
    (nested,) = _ask(replay.url, ["case:nested_unknown_argument"])
    assert format_failures(second.calls, TOOLS)[0].detail.startswith("call 1 book: n:")
    assert "guest" in format_failures(nested.calls, TOOLS)[0].detail and "vip" in format_failures(nested.calls, TOOLS)[0].detail


def test_unparsable_arguments_are_a_reason_not_a_crash(replay):
    (answer,) = _ask(replay.url, ["case:not_json"])
    assert answer.calls == [] and "arguments are not JSON" in answer.error


@pytest.mark.parametrize("style,calls,code", [
    ("simple", [("book", OK)], None),
    ("simple", [("book", OK), ("ping", {})], "call_count"),
    ("multiple", [], "no_call"),
    ("parallel", [("book", OK)], "call_count"),
    ("parallel", [("book", OK), ("ping", {})], "call_count"),
    ("parallel", [("book", OK), ("book", {"n": 3, "kind": "b"})], None),
    ("parallel_multiple", [("book", OK), ("book", {"n": 3, "kind": "b"})], "call_count"),
    ("parallel_multiple", [("book", OK), ("ping", {})], None),
    ("irrelevance", [("ping", {})], "unexpected_call"),
    ("irrelevance", [], None),
])
def test_style_rules(style, calls, code):
    got = style_failures([ToolCall(name=n, arguments=a) for n, a in calls], style)
    assert [f.code for f in got] == ([code] if code else [])


VERDICTS = [
    ("yes", "yes", "unparsable_verdict"),
    ("yes_sentence", "Yes, the calls are correct.", "unparsable_verdict"),
    ("string_pass", '{"thought": "ok", "pass": "true"}', "invalid_verdict"),
    ("int_pass", '{"thought": "ok", "pass": 1}', "invalid_verdict"),
    ("no_thought", '{"pass": true}', "invalid_verdict"),
    ("not_object", "[true]", "invalid_verdict"),
    ("rejects", '{"thought": "wrong city", "pass": false}', "judge_rejected"),
    ("passes", '{"thought": "matches", "pass": true}', None),
    ("fenced", '```json\n{"thought": "matches", "pass": true}\n```', None),
]


def test_semantic_verdicts_are_parsed_strictly():
    rules = [{"match": [f"verdict-{name}"], "replies": [{"content": text}]} for name, text, _ in VERDICTS]
    templates = load_templates()
    with ReplayServer({"rules": rules}) as srv:
        async def go():
            cfg = TeacherConfig(base_url=srv.url, model="replay", progress=False, api_key_env=None)
            async with TeacherClient(cfg) as t:
                return await asyncio.gather(*(judge_answer(t, templates, f"verdict-{name}", TOOLS,
                                                           [ToolCall(name="book", arguments=OK)], None)
                                              for name, _, _ in VERDICTS))
        results = asyncio.run(go())
    for (name, _, code), (passed, failure, verdict) in zip(VERDICTS, results):
        assert passed == (code is None), name
        assert (failure.code if failure else None) == code, name
        if failure:
            assert failure.stage == "semantic" and failure.detail, name
    assert results[6][1].detail == "wrong city" and results[6][2] == {"thought": "wrong city", "pass": False}


def test_semantic_verdict_as_forced_tool_call():
    rules = [{"match": ["User request: q"], "tool": "submit_verdict",
              "replies": [{"tool_calls": [{"name": "submit_verdict", "arguments": {"thought": "t", "pass": True}}]}]}]
    with ReplayServer({"rules": rules}) as srv:
        async def go():
            cfg = TeacherConfig(base_url=srv.url, model="replay", progress=False, api_key_env=None, structured="tool")
            async with TeacherClient(cfg) as t:
                return await judge_answer(t, load_templates(), "q", TOOLS, [ToolCall(name="ping")], None)
        passed, failure, verdict = asyncio.run(go())
        body = srv.state.bodies[0]
    assert passed and failure is None and verdict == {"thought": "t", "pass": True}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "submit_verdict"}}


def test_parse_verdict_direct():
    assert parse_verdict({"thought": "x", "pass": False})[0].passed is False
    assert parse_verdict("yes")[0] is None
    assert "pass" in parse_verdict({"thought": "x", "pass": "yes"})[1]


IMPL = textwrap.dedent('''
    import time
    def ok(x):
        print("noise on stdout must not forge the result")
        return {"double": 2 * x}
    def boom(x):
        raise ValueError(f"bad x {x}")
    def slow(x):
        time.sleep(30)
    def soft_error(x):
        return {"error": "city not found"}
    def _math_factorial(n):
        return n
    TOOLS = {"math.factorial": _math_factorial}
''')


def test_execution_in_a_subprocess_with_timeout(tmp_path):
    mod = tmp_path / "impl.py"
    mod.write_text(IMPL)
    ex = Executor(mod, timeout_s=1.5)
    calls = [ToolCall(name="ok", arguments={"x": 2}), ToolCall(name="boom", arguments={"x": 1}),
             ToolCall(name="slow", arguments={"x": 1}), ToolCall(name="soft_error", arguments={"x": 1}),
             ToolCall(name="missing", arguments={}), ToolCall(name="ok", arguments={"y": 1}),
             ToolCall(name="math.factorial", arguments={"n": 5})]
    results, failures = asyncio.run(ex.check(calls))
    assert results[0].ok and results[0].result == {"double": 4}
    assert results[6].ok and results[6].result == 5
    codes = {int(f.detail.split()[1]): f.code for f in failures}
    assert codes == {1: "error", 2: "timeout", 3: "error", 4: "no_implementation", 5: "error"}
    assert "ValueError: bad x 1" in results[1].error and "unexpected keyword" in results[5].error
    assert results[3].error.startswith("returned an error")


def test_executor_rejects_bad_paths(tmp_path):
    from fcdistill.teacher.config import TeacherError

    with pytest.raises(TeacherError, match="not a Python file"):
        Executor(tmp_path / "nope.py")
    assert Executor("example").path.name == "travel_impl.py"


def test_stage_table_counts_first_failing_stage():
    t = StageTable(generated=4, kept=1)
    t.fail([Failure("format", "type", "x"), Failure("format", "enum", "y")])
    t.fail([Failure("execution", "error", "z")])
    t.fail([Failure("semantic", "unparsable_verdict", "w")])
    d = t.as_dict()
    assert d["consistent"] and d["failed"]["format"] == 1 and d["reasons"]["format"] == {"enum": 1, "type": 1}
    assert t.row() == {"generated": 4, "fail format": 1, "fail execution": 1, "fail semantic": 1, "duplicates": 0,
                       "contaminated": 0, "kept": 1}
    assert "| 4 | 1 | 1 | 1 | 0 | 0 | 1 |" in t.markdown()
    assert json.dumps(d)
