"""The serving logic without a server: OpenAIServing called directly over the real hf engine
(SmolLM2-135M, loaded once), the detokenizer on the real tokenizer, and the HTTP layer's error and
event formatting. tests/test_serve.py drives the same logic through a live server and the openai client."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from fastapi.exceptions import RequestValidationError
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from fcdistill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from fcdistill.tools import closed_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
MULTIBYTE = "Füße 👋 你好，世界 🎉 🧑‍🤝‍🧑 done"


@pytest.fixture(scope="module")
def engine():
    from fcdistill.serve.engines.hf import HFEngine

    eng = HFEngine("smollm2-135m")
    yield eng
    asyncio.run(eng.shutdown())


@pytest.fixture(scope="module")
def serving(engine):
    from fcdistill.serve.serving import OpenAIServing

    return OpenAIServing(engine)


def _chat_request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "smollm2-135m", "messages": ASK, "temperature": 0, "max_tokens": 40, **kw})


def _chat(serving, req: ChatCompletionRequest) -> ChatCompletion:
    async def go() -> ChatCompletion:
        return await serving.chat_completion(await serving.prepare_chat(req))
    return asyncio.run(go())


def _chat_stream(serving, req: ChatCompletionRequest) -> list:
    async def go() -> list:
        return [c async for c in serving.chat_completion_stream(await serving.prepare_chat(req))]
    return asyncio.run(go())


def _refusal(serving, req: ChatCompletionRequest) -> APIError:
    with pytest.raises(APIError) as err:
        asyncio.run(serving.prepare_chat(req))
    return err.value


def test_required_tool_choice_returns_a_chat_completion_whose_calls_validate(serving):
    from fcdistill.serve.app import openai_json

    r = _chat(serving, _chat_request(tools=[WEATHER], tool_choice="required", max_tokens=60))
    assert isinstance(r, ChatCompletion) and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), closed_schema(WEATHER["function"]["parameters"]))
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 60
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the wire form: what was built (logprobs: null included), none of the type's unset optional fields
    wire = json.loads(openai_json(r).body)
    assert wire["choices"][0]["logprobs"] is None and "refusal" not in wire["choices"][0]["message"]
    assert ChatCompletion.model_validate(wire) == r


def test_a_bad_tool_choice_is_a_400_naming_tool_choice(serving):
    absent = _refusal(serving, _chat_request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert absent.status == 400 and absent.param == "tool_choice" and "nope" in absent.message
    no_tools = _refusal(serving, _chat_request(tool_choice="required"))
    assert no_tools.status == 400 and no_tools.param == "tool_choice"


def test_a_budget_too_small_for_a_forced_call_is_refused_with_the_minimum(serving):
    for param in ("max_tokens", "max_completion_tokens"):
        err = _refusal(serving, _chat_request(tools=[WEATHER], tool_choice="required", **{"max_tokens": None, param: 3}))
        assert err.status == 400 and err.param == param and err.type == "invalid_request_error"
        minimum = int(re.search(r"at least (\d+) completion tokens", err.message).group(1))
        assert 10 < minimum < 40  # FC, [{"name":"get_weather","arguments":{"city":""}}], end-of-turn
    r = _chat(serving, _chat_request(tools=[WEATHER], tool_choice="required", max_tokens=minimum))
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens <= minimum


def test_unknown_model_and_overlong_prompt_are_openai_errors(serving):
    unknown = _refusal(serving, _chat_request(model="gpt-9"))
    assert (unknown.status, unknown.param, unknown.code) == (404, "model", "model_not_found")
    long = _refusal(serving, _chat_request(messages=[{"role": "user", "content": "hello " * 9000}]))
    assert long.status == 400 and long.code == "context_length_exceeded"
    # prompt plus max_tokens over the context: refused while preparing, so a stream never starts with it
    room = _refusal(serving, _chat_request(max_tokens=serving.engine.context_length, stream=True))
    assert (room.status, room.param, room.code) == (400, "max_tokens", "context_length_exceeded")


def test_stream_chunks_concatenate_to_the_non_stream_text(serving):
    req = _chat_request(max_tokens=20)
    whole = _chat(serving, req)
    chunks = _chat_stream(serving, _chat_request(max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert not usage.choices and usage.usage == whole.usage


def _reassembled(chunks: list) -> dict[int, list]:
    calls: dict[int, list] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            calls.setdefault(d.index, []).append(d)
    return calls


def test_stream_tool_call_deltas_are_the_non_stream_calls(serving):
    whole = _chat(serving, _chat_request(tools=[WEATHER], tool_choice="required", max_tokens=60))
    chunks = _chat_stream(serving, _chat_request(tools=[WEATHER], tool_choice="required", max_tokens=60, stream=True))
    calls = _reassembled(chunks)
    assert [(d[0].function.name, json.loads("".join(x.function.arguments for x in d))) for _, d in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    for deltas in calls.values():  # OpenAI's shape: id, type and name first, then argument fragments only
        first, *rest = deltas
        assert first.id.startswith("call_") and first.type == "function" and first.function.arguments == ""
        assert rest and all(d.id is None and d.function.name is None for d in rest)
    assert len(calls[0]) > 3  # the arguments came as they were generated, not whole at the end
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_with_checks_beyond_the_grammar_streams_its_call_whole_after_the_checks(serving):
    bounded = json.loads(json.dumps(WEATHER))
    bounded["function"]["parameters"]["properties"]["city"]["minLength"] = 1  # a check the validator makes, not the grammar
    chunks = _chat_stream(serving, _chat_request(tools=[bounded], tool_choice="required", max_tokens=60, stream=True))
    calls = _reassembled(chunks)
    assert calls and all(len(d) == 1 and d[0].function.name == "get_weather" for d in calls.values())
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    from fcdistill.grammars import grammar_enforces

    assert grammar_enforces(WEATHER["function"]["parameters"])
    assert not grammar_enforces(bounded["function"]["parameters"])
    assert not grammar_enforces({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string",
                                                                                                "pattern": "x"}}}})


def test_multibyte_characters_come_out_whole_through_the_engine(serving):
    """A JSON answer whose only valid value holds emoji and CJK: the grammar walks SmolLM2 through their
    byte tokens, and every streamed piece is whole characters, adding up to the non-stream answer."""
    value = "🎉 你好"
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"w": {"enum": [value]}}, "required": ["w"]}}}
    req = dict(messages=[{"role": "user", "content": "Say hello."}], response_format=fmt, max_tokens=40)
    whole = _chat(serving, _chat_request(**req))
    assert json.loads(whole.choices[0].message.content) == {"w": value}
    pieces = [c.choices[0].delta.content for c in _chat_stream(serving, _chat_request(stream=True, **req))
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert not any("\ufffd" in p for p in pieces)


def test_completions_echo_and_stream(serving):
    prompt = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"

    async def go():
        whole = await serving.completion(await serving.prepare_completion(
            CompletionRequest(model="smollm2-135m", prompt=[prompt, "Once upon"], max_tokens=8, temperature=0, echo=True)))
        streamed = [c async for c in serving.completion_stream(await serving.prepare_completion(
            CompletionRequest(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, stream=True)))]
        return whole, streamed

    whole, streamed = asyncio.run(go())
    assert isinstance(whole, Completion) and [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text.startswith(prompt) and whole.choices[1].text.startswith("Once upon")
    assert all(isinstance(c, Completion) for c in streamed) and streamed[-1].choices[0].finish_reason
    assert prompt + "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    with pytest.raises(APIError) as err:
        asyncio.run(serving.prepare_completion(CompletionRequest(model="smollm2-135m", prompt=["a"] * 17)))
    assert err.value.param == "prompt"


def test_detokenizer_holds_split_characters_back_until_whole(smollm2_tokenizer):
    """DecodeStream on the real SmolLM2 tokenizer: byte-level BPE splits emoji and CJK over tokens."""
    from fcdistill.serve.engines.hf import Detokenizer

    ids = smollm2_tokenizer.encode(MULTIBYTE + "<tool_call>[]", add_special_tokens=False)
    text = Detokenizer(smollm2_tokenizer)
    pieces = [text.step(t) for t in ids]
    assert "".join(pieces) == MULTIBYTE + "<tool_call>[]" and text.rest() == ""
    assert "" in pieces  # some tokens only begin a character
    assert not any("\ufffd" in p for p in pieces)
    cut = Detokenizer(smollm2_tokenizer)  # a sequence that ends inside 🎉 still returns what it holds
    emoji = smollm2_tokenizer.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1 and cut.step(emoji[0]) == "" and "\ufffd" in cut.rest()


def _request_error(body: object) -> RequestValidationError:
    """What FastAPI raises for a body pydantic refuses: the model's errors, each placed under `body`."""
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    raise AssertionError("the body validated")


def test_request_validation_errors_name_the_field():
    from fcdistill.serve.app import request_problem

    good = {"model": "m", "messages": ASK}
    message, param = request_problem(_request_error({**good, "temperature": "hot"}))
    assert param == "temperature" and message.startswith("temperature: ")
    message, param = request_problem(_request_error({**good, "max_tokens": 0}))
    assert (message, param) == ("max_tokens must be at least 1", "max_tokens")
    message, param = request_problem(_request_error({"model": "m", "messages": "hi", "n": 99}))
    assert message == "2 problems: n: Input should be less than or equal to 8, not 99; messages: Input should be a valid list, not 'hi'"
    assert param == "n"  # the first problem's place
    message, param = request_problem(_request_error({"model": "m", "messages": "x" * 100_000}))
    assert message.startswith("messages: Input should be a valid list, not 'xxx") and len(message) < 120, message
    bad_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 22), "msg": "JSON decode error",
                                        "input": {}, "ctx": {"error": "Expecting value"}}])
    assert request_problem(bad_json) == ("request body is not valid JSON: Expecting value", None)


def test_sse_ends_with_done_unless_an_error_ended_it():
    from fcdistill.serve.app import sse
    from fcdistill.serve.protocol import error_body

    chunk = ChatCompletionChunk(id="c", object="chat.completion.chunk", created=0, model="m", choices=[])

    async def events(*evs):
        for ev in evs:
            yield ev

    async def lines(*evs) -> list[str]:
        return [line async for line in sse(events(*evs))]

    ok = asyncio.run(lines(chunk))
    assert ok == [f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n", "data: [DONE]\n\n"]
    failed = asyncio.run(lines(chunk, error_body("boom", "server_error")))
    assert len(failed) == 2 and json.loads(failed[-1][len("data: "):])["error"]["message"] == "boom"

    async def broken():  # a bug after the first chunk: an error event ends the stream
        yield chunk
        raise KeyError("oops")

    async def collect() -> list[str]:
        return [line async for line in sse(broken())]

    crashed = asyncio.run(collect())
    assert len(crashed) == 2 and "KeyError" in json.loads(crashed[-1][len("data: "):])["error"]["message"]


def test_a_stream_gives_its_place_back_however_it_ends():
    """EventStream releases the request's place in flight after a whole stream, after a bug mid-way, and
    when the client left before the first event (Starlette then never starts the body iterator)."""
    from fcdistill.serve.app import EventStream, sse

    chunk = ChatCompletionChunk(id="c", object="chat.completion.chunk", created=0, model="m", choices=[])
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "path": "/"}

    async def events():
        await asyncio.sleep(0.05)  # the first event takes a moment, as a model's first token does
        yield chunk

    async def serve(receive_first: dict) -> tuple[list[bool], list[dict]]:
        released, sent, started = [], [], []

        async def gen():
            started.append(True)
            async for line in sse(events()):
                yield line

        async def receive() -> dict:
            if receive_first["type"] == "http.disconnect":
                return receive_first
            await asyncio.sleep(10)  # a client that stays
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.sleep(0)  # a real socket write is a checkpoint: cancellation can land here
            sent.append(message)

        await EventStream(gen(), lambda: released.append(True))(scope, receive, send)
        return released, sent, started

    released, sent, _ = asyncio.run(serve({"type": "http.request"}))
    assert released == [True] and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    released, sent, started = asyncio.run(serve({"type": "http.disconnect"}))
    assert released == [True] and not started  # gone before the body began: released all the same


def test_a_repeated_call_ends_the_answer_and_is_not_returned(engine, serving):
    """Shown an answer that made one call three times, SmolLM2 does the same for the next question.
    Without the loop guard all three copies come back; with it (the default) the list is closed at the
    first repeat and the copy is dropped, streamed or not."""
    from fcdistill.grammars import LoopGuard
    from fcdistill.serve.serving import OpenAIServing

    def call(i: int) -> dict:
        return {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}

    history = [{"role": "user", "content": "What's the weather in Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [call(1), call(2), call(3)]},
               *({"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"} for i in (1, 2, 3)),
               {"role": "assistant", "content": "Rome is sunny."}, *ASK]
    req = dict(messages=history, tools=[WEATHER], tool_choice="required", max_tokens=120)
    loose = _chat(OpenAIServing(engine, guard=None), _chat_request(**req)).choices[0]
    paris = [json.loads(t.function.arguments) for t in loose.message.tool_calls]
    assert len(paris) == 3 and paris[0] == paris[1] == paris[2], paris  # what the model does unguarded

    guarded = _chat(serving, _chat_request(**req)).choices[0]
    assert [json.loads(t.function.arguments) for t in guarded.message.tool_calls] == paris[:1]
    assert guarded.finish_reason == "tool_calls" and (guarded.model_extra or {}).get("forced_close") == "loop"
    chunks = _chat_stream(serving, _chat_request(**req, stream=True))
    calls = _reassembled(chunks)
    assert sorted(calls) == [0] and json.loads("".join(d.function.arguments for d in calls[0])) == paris[0]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    two = _chat(OpenAIServing(engine, guard=LoopGuard(same_calls=2)), _chat_request(**req)).choices[0]  # --same-call-limit 2
    assert [json.loads(t.function.arguments) for t in two.message.tool_calls] == paris[:2]
