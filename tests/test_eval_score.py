"""Eval scoring through the real bfcl_eval ast_checker, on hand-written answers; bad input; reports.

No model here: the answers are written by hand (right, wrong value, wrong function, malformed, text),
so every verdict is known in advance. `bfcl evaluate` itself then scores the same answers and must
agree item by item.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fcdistill.chat_format import render_python_calls
from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
from fcdistill.eval import EvalError, compare_runs, official_rescore
from fcdistill.eval.dataset import load_eval_set
from fcdistill.eval.report import mcnemar_p, summarize, wilson, write_reports
from fcdistill.eval.runner import OUTPUTS, RUN_INFO, read_outputs
from fcdistill.eval.score import Scorer
from fcdistill.tools import ToolCall

CATS = ["simple_python", "multiple", "parallel", "irrelevance", "live_irrelevance", "live_relevance", "simple_java"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaldata")
    prepare_bfcl(SplitOptions(categories=CATS, max_per_category={c: 6 for c in CATS}), out)
    return out


@pytest.fixture(scope="module")
def items(data_dir):
    _, _, loaded = load_eval_set(data_dir)
    return {it.id: it for it in loaded}


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


def _first(items, category: str, dotted: bool | None = None):
    for it in items.values():
        if it.category == category and (dotted is None or ("." in it.record.tools[0].name) == dotted):
            return it
    raise AssertionError(f"no {category} item")


def _fc(item, calls, content=None, **extra):
    return {"id": item.id, "category": item.category, "mode": "fc", "content": content,
            "tool_calls": [{"name": c.name if hasattr(c, "name") else c[0],
                            "arguments": json.dumps(c.arguments) if hasattr(c, "arguments") else c[1]} for c in calls],
            "finish_reason": "tool_calls" if calls else "stop", **extra}


def _text(item, text, mode="fc"):
    return {"id": item.id, "category": item.category, "mode": mode, "content": text, "tool_calls": [],
            "finish_reason": "stop"}


def _other_value(value):
    """A value of the same type that no possible answer accepts."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1000
    if isinstance(value, list):
        return [*value, *value[:1]] if value else [1]
    return f"{value} (not this)"


def _nth(items, category: str, n: int):
    return [it for it in items.values() if it.category == category][n]


def _hand_written(items) -> list[tuple[dict, bool, str | None]]:
    """(answer, expected verdict, expected error-type prefix) for a spread of cases, one item each, fc mode."""
    sp = sorted((it for it in items.values() if it.category == "simple_python"),
                key=lambda it: "." not in it.record.tools[0].name)  # a dotted name first
    gt = sp[0].record.ground_truth
    safe = gt[0].name.replace(".", "_")
    gt1 = sp[1].record.ground_truth
    key, value = next(iter(gt1[0].arguments.items()))
    wrong_value = [gt1[0].model_copy(update={"arguments": {**gt1[0].arguments, key: _other_value(value)}})]
    mult0, mult1 = _nth(items, "multiple", 0), _nth(items, "multiple", 1)
    other = next(t.name for t in mult1.record.tools if t.name != mult1.record.ground_truth[0].name)
    par0, par1 = _nth(items, "parallel", 0), _nth(items, "parallel", 1)
    irr0, irr1 = _nth(items, "irrelevance", 0), _nth(items, "irrelevance", 1)
    li0, li1 = _nth(items, "live_irrelevance", 0), _nth(items, "live_irrelevance", 1)
    rel0, rel1 = _nth(items, "live_relevance", 0), _nth(items, "live_relevance", 1)
    # Java: values are source text in strings; BFCL wants `1500L` for a long, which the canonical
    # target does not write, so take an item without long/float parameters.
    java = next(it for it in items.values() if it.category == "simple_java"
                and all(isinstance(v, str) for v in it.record.ground_truth[0].arguments.values())
                and not {p.get("type") for p in it.functions[0]["parameters"]["properties"].values()} & {"long", "float"})
    return [
        (_fc(sp[0], [(safe, json.dumps(gt[0].arguments))], name_map={safe: gt[0].name}), True, None),  # mapped back
        (_fc(sp[1], wrong_value), False, "value_error"),
        (_fc(sp[2], sp[2].record.ground_truth), True, None),
        (_fc(mult0, mult0.record.ground_truth), True, None),
        (_fc(mult1, [(other, json.dumps(mult1.record.ground_truth[0].arguments))]), False,
         "simple_function_checker:wrong_func_name"),
        (_fc(par0, list(reversed(par0.record.ground_truth))), True, None),  # order does not matter in parallel
        (_fc(par1, par1.record.ground_truth[:1]), False, "parallel_function_checker"),
        (_fc(java, java.record.ground_truth), True, None),
        (_text(irr0, "None of the functions fit."), True, None),
        (_fc(irr1, [(irr1.record.tools[0].name, "{}")]), False, "irrelevance:made_call"),
        (_fc(li0, [(li0.record.tools[0].name, "{}")]), False, "irrelevance:made_call"),
        ({"id": li1.id, "category": li1.category, "mode": "fc", "error": "HTTP 400: prompt too long"}, True, None),
        (_fc(rel0, [(rel0.record.tools[0].name, "{}")]), True, None),
        (_text(rel1, "Which city do you mean?"), False, "relevance:no_call"),
    ]


def test_hand_written_fc_answers_get_the_expected_verdicts(items, scorer):
    for output, valid, error_type in _hand_written(items):
        s = scorer.score(items[output["id"]], output)
        assert s.valid is valid, (output, s)
        if error_type:
            assert s.error_type and s.error_type.startswith(error_type), (output, s)
            assert s.error
    sp = _first(items, "simple_python", dotted=True)
    s = scorer.score(sp, _fc(sp, sp.record.ground_truth))
    assert s.valid and s.decoded == [{sp.record.ground_truth[0].name: sp.record.ground_truth[0].arguments}]
    safe = sp.record.ground_truth[0].name.replace(".", "_")  # not mapped back: a wrong name to BFCL
    assert not scorer.score(sp, _fc(sp, [(safe, json.dumps(sp.record.ground_truth[0].arguments))])).valid


def test_malformed_and_text_answers_are_wrong_with_a_reason_never_a_crash(items, scorer):
    sp = _first(items, "simple_python")
    rel = _first(items, "live_relevance")
    irr = _first(items, "irrelevance")
    name = sp.record.tools[0].name
    cases = [
        (sp, _fc(sp, [(name, '{"a": ')]), "decode:malformed", "not JSON"),
        (sp, _fc(sp, [(name, "[1, 2]")]), "decode:malformed", "not a JSON object"),
        (sp, _fc(sp, [("", "{}")]), "decode:malformed", "no function name"),
        (sp, {**_fc(sp, []), "tool_calls": "oops"}, "decode:malformed", "not a list"),
        (sp, _text(sp, "I think you should call it yourself."), "ast:no_call", "answered in text"),
        (sp, {**_text(sp, "Sure, let me"), "finish_reason": "length"}, "ast:no_call", "cut off at max_tokens"),
        (sp, _fc(sp, [("no_such_function", "{}")]), "simple_function_checker", None),
        (sp, {"id": sp.id, "category": sp.category, "mode": "fc", "error": "HTTP 400: too long"}, "endpoint_error", "too long"),
        (rel, _text(rel, "Which city?"), "relevance:no_call", "answered in text"),
        (rel, _fc(rel, [(rel.record.tools[0].name, "{oops")]), "relevance:malformed", "not JSON"),
        (sp, _text(sp, "[" + name + "(x=", mode="prompt"), "decode:malformed", "python-syntax"),
        (sp, _text(sp, "The answer is 42.", mode="prompt"), "ast:no_call", "answered in text"),
    ]
    for item, output, error_type, reason in cases:
        s = scorer.score(item, output)
        assert not s.valid and s.error_type.startswith(error_type), (output, s)
        assert reason is None or reason in s.error, (reason, s.error)
    # No call at all is exactly what irrelevance wants, whatever the shape of the non-call.
    assert scorer.score(irr, _fc(irr, [(irr.record.tools[0].name, "{broken")])).valid
    assert scorer.score(irr, _text(irr, "[not a call", mode="prompt")).valid


def test_prompt_mode_is_decoded_by_bfcl_eval(items, scorer):
    sp = _first(items, "simple_python", dotted=True)
    good = _text(sp, render_python_calls(sp.record.ground_truth), mode="prompt")
    s = scorer.score(sp, good)
    assert s.valid and s.decoded == [c.to_bfcl() for c in sp.record.ground_truth]
    par = _first(items, "parallel")
    assert scorer.score(par, _text(par, render_python_calls(par.record.ground_truth), mode="prompt")).valid
    rel = _first(items, "live_relevance")
    assert scorer.score(rel, _text(rel, f"[{rel.record.tools[0].name}()]", mode="prompt")).valid


def _write_run(run: Path, data_dir: Path, mode: str, outputs: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / RUN_INFO).write_text(json.dumps({"identity": {"mode": mode, "model": "hand-written",
                                                         "data_dir": str(data_dir)}, "label": f"hand-{mode}"}))
    (run / OUTPUTS).write_text("".join(json.dumps(o) + "\n" for o in outputs))


def test_bfcl_evaluate_agrees_with_us_on_hand_written_answers(items, data_dir, tmp_path, scorer):
    """`bfcl evaluate` (a registered ModelConfig, its own handler's decoder) on the same answers as ours."""
    cases = _hand_written(items)
    fc_outputs = [o for o, _, _ in cases]
    assert len({o["id"] for o in fc_outputs}) == len(fc_outputs)  # a result file holds each id once
    _write_run(tmp_path / "fc", data_dir, "fc", fc_outputs)
    report = official_rescore(tmp_path / "fc")
    assert report["all_agree"], json.dumps(report, indent=1)[:3000]
    by_cat = {r["category"]: r for r in report["categories"]}
    assert {"simple_python", "multiple", "parallel", "irrelevance", "live_relevance", "simple_java"} <= set(by_cat)
    verdicts = {i["id"]: i["valid"] for r in report["categories"] for i in r["items"]}
    assert verdicts == {o["id"]: valid for o, valid, _ in cases}  # bfcl's verdicts are the hand-written ones

    sp, par, irr = _first(items, "simple_python"), _first(items, "parallel"), _first(items, "irrelevance")
    prompt_outputs = [
        _text(sp, render_python_calls(sp.record.ground_truth), mode="prompt"),
        _text(par, render_python_calls(par.record.ground_truth[:1]), mode="prompt"),
        _text(irr, render_python_calls([ToolCall(name=irr.record.tools[0].name)]), mode="prompt"),
    ]
    _write_run(tmp_path / "prompt", data_dir, "prompt", prompt_outputs)
    report = official_rescore(tmp_path / "prompt")
    assert report["all_agree"], json.dumps(report, indent=1)[:3000]
    verdicts = {i["id"]: i["valid"] for r in report["categories"] for i in r["items"]}
    assert verdicts == {sp.id: True, par.id: False, irr.id: False}


def test_manifest_from_another_bfcl_eval_version_is_refused(data_dir, tmp_path):
    other = tmp_path / "old"
    shutil.copytree(data_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["bfcl_eval_version"] = "2024.1.1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalError, match=r"bfcl-eval 2024\.1\.1.*this environment has bfcl-eval"):
        load_eval_set(other / "manifest.json")


def _cli() -> typer.Typer:
    from fcdistill.eval.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def test_cli_bad_input_is_one_line_and_exit_2(data_dir, tmp_path):
    runner = CliRunner()
    base = ["eval", "run", "--model", "m", "--out", str(tmp_path / "run"), "--no-progress"]
    # Nothing listens on port 9: fails at once, naming the URL, before any question is sent.
    r = runner.invoke(_cli(), [*base, "--endpoint", "http://127.0.0.1:9", "--manifest", str(data_dir)])
    assert r.exit_code == 2 and "http://127.0.0.1:9/v1 is unreachable" in r.output, r.output
    assert not (tmp_path / "run" / OUTPUTS).exists()
    r = runner.invoke(_cli(), [*base, "--endpoint", "http://127.0.0.1:9", "--manifest", str(data_dir),
                               "--categories", "live_simple"])
    assert r.exit_code == 2 and "no eval items" in r.output
    r = runner.invoke(_cli(), [*base, "--endpoint", "http://127.0.0.1:9", "--manifest", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(_cli(), [*base, "--endpoint", "localhost:8000", "--manifest", str(data_dir)])
    assert r.exit_code == 2 and "http(s) URL" in r.output
    r = runner.invoke(_cli(), ["eval", "compare", str(tmp_path)])
    assert r.exit_code == 2 and "summary.json" in r.output


def test_partial_lines_are_dropped_so_a_killed_run_resumes(tmp_path):
    path = tmp_path / OUTPUTS
    path.write_text('{"id": "a", "category": "x"}\n{"id": "b", "categ')
    assert list(read_outputs(path)) == ["a"]
    assert path.read_text() == '{"id": "a", "category": "x"}\n'


def test_summary_compare_and_statistics(items, scorer, tmp_path):
    assert wilson(0, 0) is None
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and round(lo, 3) == 0.237
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(6, 0) == pytest.approx(2 / 64)
    chosen = [it for it in items.values() if it.category in ("simple_python", "irrelevance")]
    base = [scorer.score(it, _text(it, "no idea")) for it in chosen]  # right on irrelevance only
    tuned = [scorer.score(it, _fc(it, it.record.ground_truth) if it.record.ground_truth else _text(it, "no"))
             for it in chosen]
    for name, scores in (("base", base), ("tuned", tuned)):
        run = tmp_path / name
        run.mkdir()
        summary = summarize(scores, chosen, {"label": name, "model": name, "endpoint": "-", "mode": "fc",
                                             "bfcl_eval_version": "x", "max_tokens": 1, "temperature": 0})
        write_reports(run, summary)
        (run / "items.jsonl").write_text("".join(json.dumps(s.to_json()) + "\n" for s in scores))
        assert (run / "chart.png").stat().st_size > 1000 and "| irrelevance |" in (run / "report.md").read_text()
    s = json.loads((tmp_path / "base" / "summary.json").read_text())
    n_sp = s["categories"]["simple_python"]["answered"]
    assert s["categories"]["simple_python"]["correct"] == 0 and s["categories"]["irrelevance"]["accuracy"] == 1.0
    assert s["overall"]["accuracy"] == pytest.approx(0.5)  # unweighted mean of 0 and 1, whatever the counts
    md = compare_runs([tmp_path / "base", tmp_path / "tuned"], tmp_path / "cmp")
    assert f"| simple_python | 0.0% (0/{n_sp}) | 100.0% ({n_sp}/{n_sp}) [+{n_sp}/−0" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["runs"][1]["vs_first"]["simple_python"]["gained"] == n_sp


def test_transport_failures_leave_questions_unanswered_for_the_next_run(data_dir, tmp_path):
    """An endpoint that is up but failing (503 after the retries): nothing is recorded, the CLI exits 1."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls = []

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m"}]})

    async def chat(request):
        calls.append(1)
        return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        out = tmp_path / "failing"
        args = ["eval", "run", "--endpoint", url, "--model", "m", "--manifest", str(data_dir), "--out", str(out),
                "--categories", "simple_python,irrelevance", "--limit", "1", "--max-attempts", "2", "--no-progress"]
        r = CliRunner().invoke(_cli(), args)
        assert r.exit_code == 1 and "2 questions have no answer" in r.output and "503" in r.output, r.output
        assert len(calls) == 4  # two questions, two attempts each
        assert read_outputs(out / OUTPUTS) == {}  # nothing recorded: the next run asks again
        summary = json.loads((out / "summary.json").read_text())
        assert not summary["complete"] and summary["run"]["this_invocation"]["transport_errors"] == 2
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


SYNTH_TOOLS = [
    {"name": "set_timer", "description": "Start a kitchen timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"},
                                         "loud": {"type": "boolean", "default": False}}, "required": ["minutes"]}},
    {"name": "convert", "description": "Convert an amount.", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string", "enum": ["EUR", "USD"]},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["amount", "to"]}},
]


def _synth_dir(tmp_path: Path) -> Path:
    rows = [
        {"id": "s1", "category": "synth_simple", "split": "val", "messages": [{"role": "user", "content": "Timer 5 min, eggs"}],
         "tools": SYNTH_TOOLS, "ground_truth": [{"name": "set_timer", "arguments": {"minutes": 5, "label": "eggs"}}]},
        {"id": "s2", "category": "synth_parallel", "split": "val", "messages": [{"role": "user", "content": "two"}],
         "tools": SYNTH_TOOLS, "ground_truth": [{"name": "convert", "arguments": {"amount": 2.5, "to": "EUR"}},
                                                {"name": "convert", "arguments": {"amount": 3, "to": "USD"}}]},
        {"id": "s3", "category": "synth_irrelevance", "split": "val", "messages": [{"role": "user", "content": "poem"}],
         "tools": SYNTH_TOOLS[:1], "target_content": "I cannot."},
    ]
    d = tmp_path / "synth"
    d.mkdir()
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_fcd_synth_held_out_split_is_scored_by_bfcl_eval(tmp_path, scorer):
    _, manifest, loaded = load_eval_set(_synth_dir(tmp_path))
    assert manifest["kind"] == "synth" and [it.category for it in loaded] == ["synth_simple", "synth_parallel",
                                                                             "synth_irrelevance"]
    simple, parallel, irrelevant = loaded
    assert simple.functions[1]["parameters"]["properties"]["amount"]["type"] == "float"  # BFCL's doc types
    assert simple.functions[0]["parameters"]["type"] == "dict"
    verdicts = {
        "right, in the second tool's list position": (simple, [("set_timer", '{"minutes": 5, "label": "eggs"}')], True),
        "an optional parameter at its default": (simple, [("set_timer", '{"minutes": 5, "label": "eggs", "loud": false}')], True),
        "an optional parameter left out": (simple, [("set_timer", '{"minutes": 5}')], False),  # the target states it
        "wrong value": (simple, [("set_timer", '{"minutes": 6, "label": "eggs"}')], False),
        "the other tool": (simple, [("convert", '{"amount": 5, "to": "EUR"}')], False),
        "parallel in any order, int for float": (parallel, [("convert", '{"amount": 3.0, "to": "USD"}'),
                                                            ("convert", '{"amount": 2.5, "to": "EUR"}')], True),
        "parallel, one call missing": (parallel, [("convert", '{"amount": 2.5, "to": "EUR"}')], False),
        "irrelevance, text": (irrelevant, [], True),
        "irrelevance, a call": (irrelevant, [("set_timer", '{"minutes": 1}')], False),
    }
    got = {name: scorer.score(item, _fc(item, calls, content="no")).valid for name, (item, calls, _) in verdicts.items()}
    assert got == {name: want for name, (_, _, want) in verdicts.items()}
