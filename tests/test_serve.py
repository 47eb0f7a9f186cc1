"""`fcd serve` as a real process with SmolLM2, driven by the official openai client."""

from __future__ import annotations

import json
import os
import re

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import BOOKING
from shutdown_check import alive, signal_and_time, tree_of

from fcdistill.serve.lifecycle import BOUND_S
from fcdistill.tools import closed_schema

pytestmark = pytest.mark.slow  # every test here loads the model or serves it

API_KEY = "test-key-123"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}, "required": ["city"]}}}
STOCK = {"type": "function", "function": {
    "name": "finance.stock_price", "description": "Latest price of a stock ticker.",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}}}
TOOLS = [WEATHER, STOCK]
ASK = [{"role": "user", "content": "What's the weather in Paris and in London?"}]


ENGINES = ["hf", "vllm"]


RUNNING: dict = {}  # engine -> its ServerProcess, for the last test, which ends it


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(engine, adapter_dir):
    """`fcd serve` on each engine with the same model, adapter and key: both must pass every test."""
    from fcdistill.serve.process import start_server

    # --value-token-limit 64 (default 256): the loop guard trips sooner, so the tests that need it take
    # fewer tokens; no test here sends a value near 64 tokens
    with start_server(["--model", "smollm2-135m", "--adapter", f"noisy={adapter_dir}", "--api-key", API_KEY,
                       "--log-requests", "--value-token-limit", "64"],
                      adapter_dir.parent / f"serve-{engine}.log", engine=engine,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as srv:
        RUNNING[engine] = srv
        yield srv.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _validate_calls(message, only: str | None = None) -> list:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in schemas and (only is None or call.function.name == only)
        jsonschema.validate(json.loads(call.function.arguments), closed_schema(schemas[call.function.name]))
    return message.tool_calls or []


def _chat(client, **kw):
    return client.chat.completions.create(model="smollm2-135m", messages=kw.pop("messages", ASK), tools=TOOLS,
                                          max_tokens=kw.pop("max_tokens", 60), temperature=kw.pop("temperature", 0), **kw)


def test_models_list_base_and_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m", "noisy"]


def test_tool_choice_required_yields_valid_calls(client):
    r = _chat(client, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(_validate_calls(choice.message)) >= 1
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_named_tool_choice_calls_exactly_that_function(client):
    r = _chat(client, tool_choice={"type": "function", "function": {"name": "finance.stock_price"}})
    calls = _validate_calls(r.choices[0].message, only="finance.stock_price")
    assert len(calls) == 1  # dotted names pass through unchanged


def test_none_never_calls(client):
    r = _chat(client, tool_choice="none", max_tokens=30)
    msg = r.choices[0].message
    assert not msg.tool_calls and "<tool_call>" not in (msg.content or "")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_returns_text_or_valid_calls(client):
    r = _chat(client, tool_choice="auto", max_tokens=40)
    msg = r.choices[0].message
    _validate_calls(msg)
    assert msg.tool_calls or msg.content


def test_parallel_tool_calls_false_gives_one_call(client):
    r = _chat(client, tool_choice="required", parallel_tool_calls=False, temperature=0.8, seed=1, n=4, max_tokens=80)
    finished = [c for c in r.choices if c.finish_reason == "tool_calls"]
    assert finished and all(len(_validate_calls(c.message)) == 1 for c in finished)
    assert all(c.finish_reason in ("tool_calls", "length") for c in r.choices)


def test_parallel_calls_all_validate(client):
    r = _chat(client, tool_choice="required", n=3, temperature=1.0, seed=7, max_tokens=120)
    counts = [len(_validate_calls(c.message)) for c in r.choices if c.finish_reason == "tool_calls"]
    assert counts and all(n >= 1 for n in counts)


def test_stream_reassembles_to_the_same_calls(client):
    whole = _chat(client, tool_choice="required")
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _chat(client, tool_choice="required", stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
            slot["name"] += d.function.name or ""
            slot["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    expected = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in whole.choices[0].message.tool_calls]
    assert [{"name": c["name"], "arguments": json.loads(c["arguments"])} for _, c in sorted(calls.items())] == expected


def test_stream_text_matches_non_stream(client):
    whole = _chat(client, tool_choice="none", max_tokens=20)
    text = "".join(c.choices[0].delta.content or "" for c in _chat(client, tool_choice="none", max_tokens=20, stream=True) if c.choices)
    assert text == whole.choices[0].message.content


def test_multi_turn_with_tool_result(client):
    first = _chat(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    r = _chat(client, messages=messages, tool_choice="none", max_tokens=30)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    # the call and its result are in the prompt: the history grew by at least their tokens
    assert r.usage.prompt_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens + 10


def test_adapter_selected_by_name_changes_the_output(client):
    base = client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(model="noisy", messages=ASK, max_tokens=12, temperature=0)
    assert tuned.model == "noisy"
    assert tuned.choices[0].message.content != base.choices[0].message.content


def test_raw_completions_endpoint(client):
    r = client.completions.create(model="smollm2-135m", prompt="<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",
                                  max_tokens=8, temperature=0, stop=["\n"])
    assert r.choices[0].text and "\n" not in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key_enforced(server):
    anon = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anon.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # health stays open


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    good = {"model": "smollm2-135m", "messages": ASK, "max_tokens": 5}
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "complex"}}}}}
    cases = {
        "invalid json": (b'{"model": "smollm2-135m", "messages": [', 400, "not valid JSON"),
        "unknown model": ({**good, "model": "gpt-9"}, 404, "does not exist"),
        "invalid tool schema": ({**good, "tools": [bad_tool]}, 400, "invalid tool"),
        "absent named tool": ({**good, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "nope"),
        "prompt too long": ({**good, "messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "maximum context length"),
        "max_tokens zero": ({**good, "max_tokens": 0}, 400, "max_tokens"),
        "wrong types": ({**good, "temperature": "hot"}, 400, "temperature"),
        "messages not a list": ({**good, "messages": "hi"}, 400, "messages"),
        "unknown role": ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    }
    for name, (body, status, needle) in cases.items():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{server}/v1/chat/completions", content=content, headers=headers, timeout=60)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and needle in err["message"], (name, err)
    ok = client.chat.completions.create(**good)
    assert ok.choices[0].message.content


def test_metrics_expose_requests_tokens_and_grammar_cache(engine, server, client):
    _chat(client, tool_choice="required", max_tokens=40)
    _chat(client, tool_choice="required", max_tokens=40)
    text = httpx.get(f"{server}/metrics").text
    assert 'fcd_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert "fcd_completion_tokens_total" in text and "fcd_grammar_compile_seconds_count" in text
    assert "\nfcd_requests_in_flight 0.0\n" in text  # both answered; /metrics itself is not admitted
    hits = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("fcd_grammar_cache_hits_total")))
    assert hits >= 1
    if engine == "hf":  # the second request reused the first one's prompt from the prefix cache
        value = lambda name, kind: float(next(line.split()[-1] for line in text.splitlines()  # noqa: E731
                                               if line.startswith(f'{name}{{kind="{kind}"}}')))
        assert value("fcd_prefill_tokens", "reused") > 0 and value("fcd_prefill_tokens", "computed") > 0
        # greedy requests draft by prompt lookup (the default)
        drafted, accepted = (value("fcd_prompt_lookup_tokens", kind) for kind in ("drafted", "accepted"))
        assert drafted > 0 and 0 <= accepted <= drafted


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(tools=st.deferred(lambda: _server_tool_sets()), mode=st.sampled_from(["required", "named", "none"]),
       parallel=st.booleans(), seed=st.integers(0, 2**31))
def test_grammar_guarantee_through_the_server(client, tools, mode, parallel, seed):
    """The property test's guarantee, end to end on each engine: random tool sets, sampling at
    temperature 1 (a near-random walk through what the grammar allows); every answer under `required`
    or a named tool is at least one schema-valid call, closed within max_tokens; `none` never calls.
    A budget too small for the shortest call is refused with that call's length, and the answer at
    exactly that budget is still a whole call."""
    payload = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in tools]
    choice: object = {"required": "required", "none": "none"}.get(mode) or {"type": "function", "function": {"name": tools[0].name}}
    ask = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Call a tool."}], tools=payload,
               tool_choice=choice, parallel_tool_calls=parallel, temperature=1.0, seed=seed)
    max_tokens = 96
    try:
        r = client.chat.completions.create(**ask, max_tokens=max_tokens)
    except openai.BadRequestError as e:
        assert mode != "none", e
        minimum = _named_minimum(str(e))
        assert minimum > max_tokens, e
        max_tokens = minimum
        r = client.chat.completions.create(**ask, max_tokens=max_tokens)
    assert r.usage.completion_tokens <= max_tokens
    c = r.choices[0]
    calls = c.message.tool_calls or []
    if mode == "none":
        assert not calls and "<tool_call>" not in (c.message.content or "")
        return
    assert c.finish_reason == "tool_calls" and calls, c.message.content
    assert parallel or len(calls) == 1
    by_name = {t.name: t for t in tools}
    for call in calls:
        assert call.function.name in by_name and (mode != "named" or call.function.name == tools[0].name)
        jsonschema.validate(json.loads(call.function.arguments), closed_schema(by_name[call.function.name].parameters))


BOOK = [{"role": "user", "content": "Book two double rooms and one single room for Ann Lee."}]


def _minimum_from_400(server, body: dict) -> int:
    """A forced answer that cannot fit max_tokens is refused with a 400 that names the minimum."""
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "smollm2-135m", **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error", err
    return _named_minimum(err["message"])


def _named_minimum(message: str) -> int:
    """The shortest forced answer a max_tokens refusal names."""
    return int(re.search(r"at least (\d+) completion tokens", message).group(1))


def test_too_small_max_tokens_for_a_forced_answer_is_refused_with_the_minimum(server, client):
    for extra in ({"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "book_rooms"}}}):
        minimum = _minimum_from_400(server, {"messages": BOOK, "tools": [BOOKING], "max_tokens": 3, **extra})
        assert 20 < minimum < 40  # FC, [{"name":"book_rooms","arguments":{"guest":{"name":""},"rooms":[]}}], end-of-turn
        r = client.chat.completions.create(model="smollm2-135m", messages=BOOK, tools=[BOOKING], temperature=0,
                                           max_tokens=minimum, **extra)
        assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens <= minimum
    schema = {"type": "object", "properties": {"rooms": {"type": "integer"}}, "required": ["rooms"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert _minimum_from_400(server, {"messages": BOOK, "max_tokens": 2, "response_format": fmt}) == 6  # {"rooms":0}, end
    r = client.chat.completions.create(model="smollm2-135m", messages=BOOK, response_format=fmt, temperature=0, max_tokens=6)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_required_with_small_max_tokens_ends_in_a_complete_call(server, client):
    """SmolLM2 loops inside this tool's arguments (rooms of 100, 200, 300... beds); at any max_tokens from the
    shortest call up, the answer is one complete call, closed by the budget, or by the loop guard when
    max_tokens leaves room for the loop."""
    minimum = _minimum_from_400(server, {"messages": BOOK, "tools": [BOOKING], "tool_choice": "required", "max_tokens": 1})
    reasons = []
    for max_tokens in (minimum + 4, minimum + 12, 160):  # 160: room for a value to pass the server's 64-token limit
        r = client.chat.completions.create(model="smollm2-135m", messages=BOOK, tools=[BOOKING], tool_choice="required",
                                           temperature=0, max_tokens=max_tokens)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and r.usage.completion_tokens <= max_tokens, c.message.content
        (call,) = c.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), closed_schema(BOOKING["function"]["parameters"]))
        reasons.append((c.model_extra or {}).get("forced_close"))
    assert reasons == ["budget", "budget", "loop"]
    text = httpx.get(f"{server}/metrics").text
    closed = {reason: float(line.split()[-1]) for line in text.splitlines() for reason in ("budget", "loop")
              if line.startswith(f'fcd_forced_close_total{{reason="{reason}"}}')}
    assert closed["budget"] >= 2 and closed["loop"] >= 1


def test_different_parallel_calls_are_not_cut_by_the_loop_guard(client):
    """Shown two calls for two cities, SmolLM2 answers the next question with two calls: both come back,
    nothing forced."""
    def call(i: int, city: str) -> dict:
        return {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}

    messages = [{"role": "user", "content": "What's the weather in Rome and in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call(1, "Rome"), call(2, "Oslo")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
                {"role": "assistant", "content": "Rome is sunny and Oslo has rain."}, *ASK]
    r = _chat(client, messages=messages, tool_choice="required", max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not (c.model_extra or {}).get("forced_close")
    assert [json.loads(t.function.arguments)["city"] for t in _validate_calls(c.message)] == ["Paris", "London"]


def _server_tool_sets():
    from test_grammar_property import tool_set_strategy

    return tool_set_strategy(6)


# What each engine printed unasked before: transformers' resize notice and forward() deprecation, HF
# loading bars, vLLM-CPU's Triton / tcmalloc / Intel OpenMP / compile-cache warnings, its INFO lines.
NOISE = ("mean_resizing", "multivariate normal", "past_key_values", "FutureWarning", "Loading weights", "Triton",
         "LD_PRELOAD", "Model Runner V2", "Compiling model again", "Passing raw prompts", " INFO ",
         "Loading safetensors", "Exception ignored")


def test_start_line_access_log_and_nothing_else(server, client, engine, adapter_dir):
    """The log says where the server listens and what it serves, one line per request
    (--log-requests), and none of the libraries' start-up noise."""
    client.chat.completions.create(model="noisy", messages=ASK, max_tokens=3, temperature=0)
    log = (adapter_dir.parent / f"serve-{engine}.log").read_text()
    port = server.rsplit(":", 1)[1]
    assert (f"fcd serve: serving on http://127.0.0.1:{port}/v1 (engine {engine}, model smollm2-135m, adapters: noisy; "
            f"API key required") in log, log[-3000:]
    assert re.search(r'127\.0\.0\.1:\d+ "POST /v1/chat/completions" 200 \d+\.\d+s model=noisy tokens=\d+\+\d+', log), log[-3000:]
    assert re.search(r'"GET /v1/models" 401 ', log)  # test_api_key_enforced's wrong key
    for noise in NOISE:
        assert noise not in log, (noise, log[-3000:])


def test_the_readme_client_snippet_runs_as_written(server, capsys):
    """README's openai snippet, copied as it stands: only the address and the key (this server
    requires one) are this test's."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from openai import OpenAI" in b)
    assert 'base_url="http://127.0.0.1:8000/v1", api_key="none"' in snippet
    exec(snippet.replace("http://127.0.0.1:8000/v1", f"{server}/v1").replace('api_key="none"', f'api_key="{API_KEY}"'), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and printed[0].startswith("get_weather {"), printed
    assert isinstance(json.loads(printed[0].split(" ", 1)[1]), dict)


def test_vllm_engine_refuses_an_adapter_that_added_the_fc_token(adapter_dir, tmp_path):
    """vLLM's LoRA cannot grow the vocabulary: start-up fails at once and says how to merge."""
    import shutil
    import subprocess

    from fcdistill.serve.process import free_port, python_for

    added = tmp_path / "added"
    shutil.copytree(adapter_dir, added)
    (added / "fcdistill.json").write_text(json.dumps({"format": "adapter", "student": "smollm2-135m",
                                                      "fc_token": "<tool_call>", "fc_token_added": True}))
    r = subprocess.run([python_for("vllm"), "-m", "fcdistill", "serve", "--engine", "vllm", "--model", "smollm2-135m",
                        "--adapter", f"tuned={added}", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "added the FC token" in r.stderr and f"fcd export --adapter {added}" in r.stderr and "--merge" in r.stderr


def test_last_an_idle_server_ends_on_sigterm_with_every_process_of_its_tree(engine, server):
    """Runs last for each engine (it ends that engine's server): SIGTERM, the way `stop()`, systemd and
    docker end a server, stops it within the bound and leaves none of its processes (for the vllm engine:
    EngineCore and its workers). tests/test_serve_shutdown.py covers busy servers and other signals."""
    srv = RUNNING.pop(engine)
    tree = tree_of(srv)
    try:
        if engine == "vllm":
            assert any("EngineCore" in p.name() for p in tree), [p.name() for p in tree]
        row = signal_and_time(srv, ["SIGTERM"], tree)
        print(json.dumps({"engine": engine, "state": "idle", **row}))
        assert row["server_exit_s"] < BOUND_S and not row["processes_left"], (row, srv.log.read_text()[-3000:])
    finally:
        for p in alive(tree):
            p.kill()
