"""`fcd eval` against the real `fcd serve` (SmolLM2) and the real bfcl_eval: runs, resume, names, cross-check.

Kept small for a loaded CPU: two or three questions per category and short completions.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from fcdistill.data.bfcl import SplitOptions, prepare_bfcl
from fcdistill.eval import compare_runs, official_check, run_eval
from fcdistill.eval.runner import ITEMS, OUTPUTS, RUN_INFO
from conftest import SERVE_KEY
from fcdistill.serve.process import free_port, start_server, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
CATS = ["simple_python", "irrelevance", "live_relevance"]


@pytest.fixture(scope="module")
def server(hf_server) -> str:
    return hf_server  # the session's shared server (conftest): it wants SERVE_KEY


@pytest.fixture(scope="module")
def strict_endpoint(server):
    """A real proxy in front of our server that, like OpenAI's API, rejects tool names with dots."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pattern = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
    seen: list[list[str]] = []

    async def forward(request):
        body = await request.body()
        if request.method == "POST":
            names = [t["function"]["name"] for t in json.loads(body).get("tools") or []]
            seen.append(names)
            bad = [n for n in names if not pattern.match(n)]
            if bad:
                return JSONResponse({"error": {"message": f"Invalid 'tools[0].function.name': string does not match "
                                                          f"pattern. Expected ^[a-zA-Z0-9_-]{{1,64}}$, got {bad[0]!r}",
                                               "type": "invalid_request_error"}}, status_code=400)
        async with httpx.AsyncClient(timeout=300) as client:
            r = await client.request(request.method, f"{server}{request.url.path}", content=body,
                                     headers={"content-type": "application/json",
                                              "authorization": request.headers.get("authorization", "")})
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/health", health), Route("/v1/{path:path}", forward, methods=["GET", "POST"])])
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, None, None, timeout=30)
    yield url, seen
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaldata")
    prepare_bfcl(SplitOptions(categories=CATS, max_per_category={c: 4 for c in CATS}), out)
    return out


@pytest.fixture(scope="module")
def fc_run(server, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base-fc"
    run_eval(server, MODEL, data_dir, CATS, out, mode="fc", concurrency=2, max_tokens=24, limit_per_category=2, api_key=SERVE_KEY,
             progress=False, label="base-fc")
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fc_run_scores_every_item_with_counts(fc_run):
    summary = json.loads((fc_run / "summary.json").read_text())
    assert summary["complete"] and summary["run"]["this_invocation"]["asked"] == 6
    for c in CATS:
        cat = summary["categories"][c]
        assert cat["answered"] == cat["total"] == 2 and cat["correct"] <= 2 and cat["ci95"]
    accs = [summary["categories"][c]["accuracy"] for c in CATS]
    assert summary["overall"]["accuracy"] == pytest.approx(sum(accs) / 3)
    outputs = _lines(fc_run / OUTPUTS)
    for c in CATS:  # answers cut at max_tokens, and those fcd serve's budget or loop guard closed, per category
        mine = [o for o in outputs if o["category"] == c]
        assert summary["categories"][c]["cut"] == sum(o.get("finish_reason") == "length" for o in mine)
        assert sum(summary["categories"][c]["forced_close"].values()) == sum(bool(o.get("forced_close")) for o in mine)
    assert "cut / force-closed" in (fc_run / "report.md").read_text()
    items = _lines(fc_run / ITEMS)
    assert [i["category"] for i in items] == [c for c in CATS for _ in range(2)]
    for i in items:
        assert i["raw"]["id"] == i["id"] and ("content" in i["raw"] or "error" in i["raw"])
        assert i["valid"] or (i["error_type"] and i["error"])  # every wrong answer says why
    assert (fc_run / "chart.png").stat().st_size > 1000
    assert "| simple_python | " in (fc_run / "report.md").read_text()


def test_rerun_resumes_and_asks_only_missing_ids(fc_run, server, data_dir):
    from fcdistill.eval.cli import register

    before = (fc_run / OUTPUTS).read_text()
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    args = ["eval", "run", "--endpoint", server, "--model", MODEL, "--api-key", SERVE_KEY, "--manifest", str(data_dir / "manifest.json"),
            "--categories", ",".join(CATS), "--limit", "2", "--max-tokens", "24", "--out", str(fc_run),
            "--no-progress", "--concurrency", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "asked 0, kept 6 earlier answers" in r.output
    assert (fc_run / OUTPUTS).read_text() == before
    # A killed run: the last answer is lost and the one before it half-written.
    lines = before.splitlines(keepends=True)
    (fc_run / OUTPUTS).write_text("".join(lines[:-2]) + lines[-2][:25])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "asked 2, kept 4 earlier answers" in r.output
    assert sorted(o["id"] for o in _lines(fc_run / OUTPUTS)) == sorted(o["id"] for o in map(json.loads, lines))
    # Another model into the same dir would mix two runs: refused.
    r = CliRunner().invoke(app, [*args[:5], "other-model", *args[6:]])
    assert r.exit_code == 2 and "model='smollm2-135m'" in r.output


def test_a_run_killed_at_a_random_answer_resumes_with_nothing_lost_or_repeated(server, data_dir, tmp_path):
    """SIGKILL of `fcd eval run` once a seeded-random number of answers is on disk; the rerun asks
    only the rest, and every item is answered exactly once. (How many items there are depends on the
    split: 7 to 9.)"""
    import random
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fcdistill", "eval", "run", "--endpoint", server, "--model", MODEL, "--api-key", SERVE_KEY,
            "--manifest",
            str(data_dir / "manifest.json"), "--categories", ",".join(CATS), "--limit", "3", "--max-tokens", "24",
            "--out", str(out), "--no-progress", "--concurrency", "1"]
    from fcdistill.eval.dataset import load_eval_set

    n = len(load_eval_set(data_dir / "manifest.json", CATS, 3)[2])  # up to 3 a category in the eval split
    assert n >= 5
    kill_after = random.Random(17).randint(1, n - 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        if (out / OUTPUTS).is_file() and len((out / OUTPUTS).read_text().splitlines()) >= kill_after:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr.read()[-2000:]
    done_before = {o["id"] for o in _lines(out / OUTPUTS)}
    assert kill_after <= len(done_before) < n
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = [o["id"] for o in _lines(out / OUTPUTS)]
    assert len(ids) == len(set(ids)) == n and done_before <= set(ids)  # none lost, none twice
    assert f"asked {n - len(done_before)}, kept {len(done_before)} earlier answers" in again.stdout + again.stderr
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_prompt_mode_uses_bfcl_prompt_and_decoder(server, data_dir, tmp_path):
    summary = run_eval(server, MODEL, data_dir, ["simple_python"], tmp_path / "prompt", mode="prompt", api_key=SERVE_KEY,
                       max_tokens=24, limit_per_category=2, progress=False, label="base-prompt")
    assert summary["categories"]["simple_python"]["answered"] == 2
    rows = _lines(tmp_path / "prompt" / OUTPUTS)
    assert all(r["mode"] == "prompt" and isinstance(r["content"], str) and not r["tool_calls"] for r in rows)
    md = compare_runs([tmp_path / "prompt", tmp_path / "prompt"], tmp_path / "cmp")
    assert "base-prompt (prompt)" in md and re.search(r"\| simple_python \| \d+\.\d% \(\d/2\)", md), md


def test_endpoint_that_rejects_dotted_names_gets_safe_names_mapped_back(strict_endpoint, data_dir, tmp_path):
    url, seen = strict_endpoint
    out = tmp_path / "strict"
    summary = run_eval(url, MODEL, data_dir, ["simple_python"], out, max_tokens=80, limit_per_category=1, api_key=SERVE_KEY,
                       tool_choice="required", progress=False)
    assert summary["run"]["tool_names"] == "safe" and "rejected dotted tool names" in summary["run"]["this_invocation"]["notes"][0]
    assert json.loads((out / RUN_INFO).read_text())["tool_names"] == "safe"
    assert any("." in n for n in seen[0]) and all("." not in n for n in seen[-1])  # first as-is, then safe
    row = _lines(out / OUTPUTS)[0]
    dotted = next(iter(row["name_map"].values()))
    assert "." in dotted and "." not in next(iter(row["name_map"]))
    item = _lines(out / ITEMS)[0]
    if row["tool_calls"]:  # a whole call came back (it can be cut at max_tokens): scored under BFCL's name
        assert all("." not in c["name"] for c in row["tool_calls"])
        assert [next(iter(d)) for d in item["decoded"]] == [dotted] * len(row["tool_calls"])


def test_official_bfcl_generate_and_evaluate_equal_ours(server, data_dir, tmp_path):
    report = official_check(server, MODEL, data_dir, "simple_python", tmp_path / "official", limit=2, api_key=SERVE_KEY,
                            max_tokens=64, tool_choice="required")
    assert report["official"]["total"] == 2
    assert report["same_accuracy"] and report["same_items"], json.dumps(report, indent=1)[:2000]
    assert report["official"]["accuracy"] == report["ours"]["accuracy"]
    results = list((tmp_path / "official" / "result").rglob("BFCL_v4_simple_python_result.json"))
    assert results and len(_lines(results[0])) == 2
    # Forced calls give the checker real calls to judge (not just text).
    assert any(i["error_type"] != "ast:no_call" for i in report["items"])


def test_eval_and_official_bfcl_against_the_vllm_engine(data_dir, tmp_path, smollm2_dir):
    """`fcd eval run` and bfcl-eval's own generate + evaluate work against `fcd serve --engine vllm`.
    Eight short answers: the server starts eager (no torch.compile, about a minute sooner on CPU) with a
    small KV cache; test_serve covers the compiled engine."""
    lean = ["--enforce-eager", "--gpu-memory-utilization", "0.1", "--max-model-len", "2048"]
    with start_server(["--model", MODEL, *lean], tmp_path / "serve-vllm.log", engine="vllm",
                      env={**os.environ, "HF_HUB_OFFLINE": "1"}) as srv:
        out = tmp_path / "vllm-fc"
        run_eval(srv.url, MODEL, data_dir, CATS, out, mode="fc", concurrency=2, max_tokens=24, limit_per_category=2,
                 progress=False, label="vllm-fc")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["complete"] and all(summary["categories"][c]["answered"] == 2 for c in CATS)
        report = official_check(srv.url, MODEL, data_dir, "simple_python", tmp_path / "official", limit=2,
                                max_tokens=64, tool_choice="required")
    assert report["official"]["total"] == 2 and report["same_accuracy"] and report["same_items"], \
        json.dumps(report, indent=1)[:2000]
    assert any(i["error_type"] != "ast:no_call" for i in report["items"])


def test_multi_turn_conversation_runs_against_backends_and_matches_bfcl_step_by_step(server, tmp_path):
    """A multi_turn_base conversation: calls forced, so each step runs a call against bfcl's simulated file
    system and sends its result back; the step limit then ends the conversation. bfcl's own generate +
    evaluate, with the same limit against the same server, must see the same steps and the same verdict."""
    from fcdistill.eval.official import bfcl_result_from_output

    data = tmp_path / "data"
    prepare_bfcl(SplitOptions(categories=["multi_turn_base"], max_per_category={"multi_turn_base": 2}), data)
    out = tmp_path / "mt"
    summary = run_eval(server, MODEL, data, ["multi_turn_base"], out, max_tokens=64, tool_choice="required", api_key=SERVE_KEY,
                       max_steps=1, progress=False, label="mt")
    assert summary["complete"] and summary["categories"]["multi_turn_base"]["answered"] == 1
    row = _lines(out / OUTPUTS)[0]
    assert row["force_quit"] and len(row["turns"]) == 1 and len(row["turns"][0]) == 2
    first = row["turns"][0][0]
    assert first["tool_calls"] and len(first["results"]) == len(first["tool_calls"])
    assert all(isinstance(r, str) and r for r in first["results"])
    item = _lines(out / ITEMS)[0]
    assert not item["valid"] and item["error_type"] == "multi_turn:force_terminated"
    assert json.loads((out / RUN_INFO).read_text())["identity"]["max_steps"] == 1
    steps = [step for turn in row["turns"] for step in turn]  # cut: a conversation with a step at max_tokens
    assert summary["categories"]["multi_turn_base"]["cut"] == int(any(s["finish_reason"] == "length" for s in steps))

    report = official_check(server, MODEL, data, "multi_turn_base", tmp_path / "official", max_tokens=64, api_key=SERVE_KEY,
                            tool_choice="required", max_steps=1)
    assert report["same_accuracy"] and report["same_items"], json.dumps(report, indent=1)[:2000]
    bfcl = _lines(next((tmp_path / "official" / "result").rglob("BFCL_v4_multi_turn_base_result.json")))[0]
    assert bfcl["result"] == bfcl_result_from_output(row)
