"""`fcd serve` as a real process with SmolLM2, driven by the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from fcdistill.tools import closed_schema

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A real PEFT LoRA adapter with non-zero weights, so selecting it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(adapter_dir):
    port = _free_port()
    log = open(adapter_dir.parent / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fcdistill.cli", "serve", "--model", "smollm2-135m",
                             "--adapter", f"noisy={adapter_dir}", "--port", str(port), "--api-key", API_KEY],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(adapter_dir.parent / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not become healthy")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


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


def test_metrics_expose_requests_tokens_and_grammar_cache(server, client):
    _chat(client, tool_choice="required", max_tokens=5)
    _chat(client, tool_choice="required", max_tokens=5)
    text = httpx.get(f"{server}/metrics").text
    assert 'fcd_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert "fcd_completion_tokens_total" in text and "fcd_grammar_compile_seconds_count" in text
    hits = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("fcd_grammar_cache_hits_total")))
    assert hits >= 1
