"""Teacher client over real HTTP (a local replay server, the real openai client): retries on 429/5xx and
timeouts, no retry on other 4xx, bounded concurrency, the request cache, token counts and cost, tools
and prompt modes, and structured JSON replies."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fcdistill.client import Client, ClientConfig, ResponseCache, run_bounded
from fcdistill.devtools.replay_teacher import ReplayServer
from fcdistill.teacher.ask import TeacherClient, strip_fences
from fcdistill.teacher.config import TeacherConfig, TeacherError, load_teacher_config
from fcdistill.tools import ToolCall, normalize_tools, safe_tool_names

Q = [{"role": "user", "content": "add two"}]
TOOLS = normalize_tools([{"name": "math.add", "description": "add", "parameters": {
    "type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}}])


def cfg(url: str, **kw) -> TeacherConfig:
    base = dict(base_url=url, model="replay", backoff_initial_s=0.01, backoff_max_s=0.2, timeout_s=5,
                progress=False, api_key_env=None)
    return TeacherConfig(**{**base, **kw})


def run(coro):
    return asyncio.run(coro)


async def _chat(c: TeacherConfig, messages=Q, **kw):
    async with TeacherClient(c) as t:
        r = await t.chat(messages, **kw)
        return r, t.stats


def test_retries_429_with_retry_after_then_500_then_succeeds():
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "done"}],
                         "faults": [{"status": 429, "retry_after": 0.3}, {"status": 503}]}]}
    with ReplayServer(script) as srv:
        t0 = time.perf_counter()
        # backoff_max_s caps every wait, Retry-After included: set it above the 0.3 s asked for here
        reply, stats = run(_chat(cfg(srv.url, backoff_max_s=1.0)))
        took = time.perf_counter() - t0
        assert reply.error is None and reply.content == "done" and reply.attempts == 3
        assert stats.retries == 2 and stats.status_counts == {"429": 1, "503": 1, "200": 1}
        assert took >= 0.29  # Retry-After (0.3 s) was honoured, not our 10 ms backoff; asyncio may wake ~ms early
        assert srv.stats()["statuses"] == {429: 1, 503: 1, 200: 1}


def test_retry_after_is_capped_by_backoff_max():
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "done"}],
                         "faults": [{"status": 429, "retry_after": 30}]}]}
    with ReplayServer(script) as srv:
        t0 = time.perf_counter()
        reply, _ = run(_chat(cfg(srv.url, backoff_max_s=0.05)))
        assert reply.content == "done" and reply.attempts == 2
        assert time.perf_counter() - t0 < 5  # not the 30 s the server asked for


def test_timeout_is_retried_and_exhaustion_reports_the_reason():
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "late"}],
                         "faults": [{"delay_s": 1.5}, {"delay_s": 1.5}]}]}
    with ReplayServer(script) as srv:
        reply, stats = run(_chat(cfg(srv.url, timeout_s=0.5)))
        assert reply.error is None and reply.content == "late" and reply.attempts == 3
        assert stats.status_counts["timeout"] == 2
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "x"}], "faults": [{"status": 500}] * 5}]}
    with ReplayServer(script) as srv:
        reply, stats = run(_chat(cfg(srv.url, max_attempts=3)))
        assert reply.error is not None and "gave up after 3 attempts" in reply.error and "HTTP 500" in reply.error
        assert srv.stats()["total"] == 3 and stats.failures == 1


def test_client_errors_are_not_retried_and_name_the_key_variable(monkeypatch):
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "x"}], "faults": [{"status": 401}, {"status": 400}]}]}
    monkeypatch.setenv("FCD_TEST_KEY", "sk-test")
    with ReplayServer(script) as srv:
        reply, _ = run(_chat(cfg(srv.url, api_key_env="FCD_TEST_KEY")))
        assert reply.error.startswith("HTTP 401") and "$FCD_TEST_KEY" in reply.error
        reply, _ = run(_chat(cfg(srv.url)))
        assert reply.error.startswith("HTTP 400")
        assert srv.stats()["total"] == 2  # one request each: 4xx is final


def test_concurrency_is_bounded_and_sustained():
    with ReplayServer({"default": {"content": "ok"}, "delay_s": 0.15}) as srv:
        async def go():
            async with TeacherClient(cfg(srv.url, concurrency=4)) as t:
                t0 = time.perf_counter()
                await asyncio.gather(*(t.chat([{"role": "user", "content": f"q{i}"}]) for i in range(16)))
                return time.perf_counter() - t0, t.stats.max_in_flight
        took, client_max = run(go())
        assert srv.stats()["max_in_flight"] == 4 and client_max == 4
        assert 4 * 0.15 <= took < 16 * 0.15  # 4 waves: bounded, yet concurrent


def test_cache_replays_answers_and_counts_tokens_and_cost(tmp_path):
    with ReplayServer({"default": {"content": "cached answer"}}) as srv:
        c = cfg(srv.url, cache=tmp_path / "c.sqlite", price_input_per_mtok=1000.0, price_output_per_mtok=2000.0)
        r1, s1 = run(_chat(c))
        r2, s2 = run(_chat(c))  # a new client, as after a restart
        r3, _ = run(_chat(c, sample=1))  # another sample is another request
        assert not r1.cached and r2.cached and r2.content == "cached answer" and not r3.cached
        assert srv.stats()["total"] == 2
        assert s1.prompt_tokens > 0 and s2.prompt_tokens == 0 and s2.cached_prompt_tokens == s1.prompt_tokens
        d = s1.as_dict(c)
        assert d["cost_usd"] == pytest.approx((s1.prompt_tokens * 1000 + s1.completion_tokens * 2000) / 1e6)
        assert s2.as_dict(c)["saved_by_cache_usd"] == pytest.approx(d["cost_usd"])
    assert ResponseCache(tmp_path / "c.sqlite").count() == 2


def test_errors_are_not_cached(tmp_path):
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "fine"}], "faults": [{"status": 400}]}]}
    with ReplayServer(script) as srv:
        c = cfg(srv.url, cache=tmp_path / "c.sqlite")
        assert run(_chat(c))[0].error
        assert run(_chat(c))[0].content == "fine"


def test_tools_mode_restores_dotted_names_and_reports_bad_arguments():
    assert safe_tool_names(TOOLS) == {"math.add": "math_add"}
    script = {"rules": [
        {"match": ["add two"], "tool": "math_add", "replies": [{"tool_calls": [{"name": "math_add", "arguments": {"a": 2}}]}]},
        {"match": ["broken"], "replies": [{"tool_calls": [{"name": "math_add", "arguments": "{\"a\": 2"}]}]},
        {"match": ["list args"], "replies": [{"tool_calls": [{"name": "math_add", "arguments": "[1]"}]}]},
        {"match": ["chat"], "replies": [{"content": "No tool needed."}]},
        {"match": ["long"], "replies": [{"content": "<tool_call>[{\"name\": \"math_add\", \"argu", "finish_reason": "length"}]}]}
    with ReplayServer(script) as srv:
        async def go():
            async with TeacherClient(cfg(srv.url)) as t:
                return [await t.ask_calls([{"role": "user", "content": q}], TOOLS)
                        for q in ("add two", "broken", "list args", "chat", "long")]
        ok, broken, listy, text, cut = run(go())
    assert cut.truncated and cut.calls == [] and "max_tokens" in cut.error
    assert ok.calls == [ToolCall(name="math.add", arguments={"a": 2})] and ok.error is None
    assert broken.calls == [] and "arguments are not JSON" in broken.error
    assert "not a JSON object" in listy.error
    assert text.calls == [] and text.content == "No tool needed." and text.error is None


def test_prompt_mode_decodes_python_calls_with_bfcl():
    script = {"rules": [{"match": ["add two"], "replies": [{"content": "[math.add(a=2, b=3)]"}]},
                        {"match": ["weather"], "replies": [{"content": "I cannot help with that."}]}]}
    with ReplayServer(script) as srv:
        async def go():
            async with TeacherClient(cfg(srv.url, mode="prompt")) as t:
                return (await t.ask_calls(Q, TOOLS, record_id="simple_python_1"),
                        await t.ask_calls([{"role": "user", "content": "weather?"}], TOOLS))
        calls, text = run(go())
        body = srv.state.bodies[0]
    assert calls.calls == [ToolCall(name="math.add", arguments={"a": 2, "b": 3})]
    assert text.calls == [] and text.content == "I cannot help with that." and text.note
    assert "tools" not in body and body["messages"][0]["role"] == "system" and "math.add" in body["messages"][0]["content"]


def test_ask_json_text_and_tool_modes():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    script = {"rules": [
        {"match": ["fenced"], "replies": [{"content": "```json\n{\"x\": 1}\n```"}]},
        {"match": ["prose"], "replies": [{"content": "Sure! x is one."}]},
        {"match": ["forced"], "tool": "submit", "replies": [{"tool_calls": [{"name": "submit", "arguments": {"x": 2}}]}]},
        {"match": ["nocall"], "replies": [{"content": "{\"x\": 3}"}]}]}
    with ReplayServer(script) as srv:
        async def go(mode, q):
            async with TeacherClient(cfg(srv.url, structured=mode)) as t:
                return await t.ask_json([{"role": "user", "content": q}], schema, "submit")
        assert run(go("text", "fenced")).value == {"x": 1}
        prose = run(go("text", "prose"))
        assert prose.value is None and prose.error.startswith("not JSON")
        assert run(go("tool", "forced")).value == {"x": 2}
        assert run(go("tool", "nocall")).error == "no submit call in the reply"
        assert run(go("schema", "nocall")).value == {"x": 3}
        body = srv.state.bodies[-1]
        assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "submit", "schema": schema}}
        assert "tools" not in body


def test_run_bounded_keeps_at_most_limit_alive():
    alive, peak, seen = 0, 0, []

    async def work(i):
        nonlocal alive, peak
        alive += 1
        peak = max(peak, alive)
        await asyncio.sleep(0.01)
        alive -= 1
        return i * 2

    run(run_bounded(range(20), work, 3, lambda i, r: seen.append((i, r))))
    assert peak == 3 and sorted(seen) == [(i, 2 * i) for i in range(20)]


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(TeacherError, match="--base-url must start with http"):
        load_teacher_config(None, {"base_url": "localhost:8000", "model": "m"})
    with pytest.raises(TeacherError, match="needs --model"):
        load_teacher_config(None, {"base_url": "http://x"})
    bad = tmp_path / "t.yaml"
    bad.write_text("teacher:\n  base_url: http://x\n  model: m\n  concurrency: 0\n")
    with pytest.raises(TeacherError, match="concurrency"):
        load_teacher_config(bad, {})
    bad.write_text("base_url: http://x\nmodel: m\ntemprature: 1\n")
    with pytest.raises(TeacherError, match="temprature"):
        load_teacher_config(bad, {})
    good = tmp_path / "g.yaml"
    good.write_text("base_url: http://x/v1/\nmodel: m\nconcurrency: 3\n")
    c = load_teacher_config(good, {"concurrency": 5})
    assert c.concurrency == 5 and c.base_url == "http://x/v1"


def test_config_lists_every_error_not_only_the_first(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("base_url: http://x\nmodel: m\nconcurrency: 0\ntemperature: 9\ntemprature: 1\n")
    with pytest.raises(TeacherError) as err:
        load_teacher_config(bad, {})
    message = str(err.value)
    assert message.startswith("3 problems: ") and "\n" not in message, message
    assert "concurrency" in message and "temperature" in message and "temprature: unknown field" in message


def test_strip_fences():
    assert strip_fences("```json\n[1]\n```") == "[1]"
    assert strip_fences("  {\"a\": 1} ") == "{\"a\": 1}"
    assert json.loads(strip_fences("```\n{}\n```")) == {}


def _client_cfg(url: str, **kw) -> ClientConfig:
    base = dict(base_url=url, model="replay", api_key_env=None, backoff_initial_s=0.01, backoff_max_s=0.05,
                timeout_s=5, progress=False)
    return ClientConfig(**{**base, **kw})


def test_replies_carry_the_http_status_as_an_integer():
    script = {"rules": [
        {"match": ["fine"], "replies": [{"content": "ok"}]},
        {"match": ["refused"], "replies": [{"content": "x"}], "faults": [{"status": 400}]},
        {"match": ["down"], "replies": [{"content": "x"}], "faults": [{"status": 503}] * 2},
        {"match": ["slow"], "replies": [{"content": "x"}], "faults": [{"delay_s": 1.0}] * 2}]}
    with ReplayServer(script) as srv:
        async def go():
            async with Client(_client_cfg(srv.url, max_attempts=2, timeout_s=0.4)) as c:
                return [await c.chat([{"role": "user", "content": q}]) for q in ("fine", "refused", "down", "slow")]
        ok, refused, down, slow = run(go())
    assert ok.status == 200 and ok.error is None
    assert refused.status == 400 and refused.attempts == 1
    assert down.status == 503 and down.error.startswith("gave up after 2 attempts")  # the last attempt's status
    assert slow.status is None and "timed out" in slow.error  # no HTTP answer at all


def test_neutral_config_takes_a_key_directly_and_never_dumps_it(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    direct = ClientConfig(base_url="http://x/v1", model="m", api_key="sk-direct")
    assert direct.key() == "sk-direct" and "sk-direct" not in repr(direct) and "api_key" not in direct.model_dump()
    assert ClientConfig(base_url="http://x/v1", model="m").key() == "from-env"
    assert ClientConfig(base_url="http://x/v1", model="m", api_key_env=None).key() == "EMPTY"
    with pytest.raises(TeacherError, match="api-key-env"):  # a teacher config names the variable, never the key
        load_teacher_config(None, {"base_url": "http://x", "model": "m", "api_key": "sk"})


def test_gather_keeps_order_under_the_clients_one_limit():
    with ReplayServer({"default": {"content": "ok"}, "delay_s": 0.05}) as srv:
        async def go():
            async with Client(_client_cfg(srv.url, concurrency=3)) as c:
                async def ask(i: int) -> int:
                    await c.chat([{"role": "user", "content": f"q{i}"}])
                    return i
                return await c.gather(list(range(10)), ask, "ask"), c.stats.max_in_flight
        out, peak = run(go())
        assert out == list(range(10)) and peak == 3 and srv.stats()["max_in_flight"] == 3
