"""The wire-format contract: render and parse are inverses; malformed output never raises."""

import json
import string

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcdistill.chat_format import ChatFormat, Message, as_messages, render_python_calls
from fcdistill.tools import ToolCall, ToolSpec

FC = "<tool_call>"
EOT = "<|im_end|>"
fmt = ChatFormat(fc_token=FC, eot=EOT)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}(\.[A-Za-z_][A-Za-z0-9_]{0,8})?", fullmatch=True)
text = st.text(min_size=1, max_size=40).filter(lambda s: FC not in s and EOT not in s)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
calls = st.builds(ToolCall, name=names, arguments=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
tools = st.lists(
    st.builds(lambda n, d, props: ToolSpec(name=n, description=d, parameters={
        "type": "object", "properties": {p: {"type": t} for p, t in props.items()}}),
        names, st.text(max_size=30),
        st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=6),
                        st.sampled_from(["string", "integer", "number", "boolean", "array", "object"]), max_size=4)),
    max_size=4, unique_by=lambda t: t.name)

user = st.builds(lambda c: Message(role="user", content=c), text)
assistant_text = st.builds(lambda c: Message(role="assistant", content=c), text)
assistant_calls = st.builds(lambda c, cs: Message(role="assistant", content=c, tool_calls=tuple(cs)),
                            st.none() | text, st.lists(calls, min_size=1, max_size=4))
tool_result = st.builds(lambda n, c: Message(role="tool", name=n, content=c), st.none() | names, st.text(max_size=40))
conversations = st.tuples(
    st.none() | st.text(max_size=40).filter(lambda s: "# Functions" not in s),
    st.lists(st.one_of(user, assistant_text, assistant_calls, tool_result), min_size=1, max_size=8),
).map(lambda t: ([Message(role="system", content=t[0])] if t[0] is not None else []) + t[1])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(conversations, tools)
def test_conversations_round_trip(conv, tool_list):
    encoded = fmt.encode_messages(conv, tool_list)
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in encoded)
    messages, decoded_tools = fmt.decode_messages(encoded)
    assert messages == conv
    assert decoded_tools == tool_list


@settings(max_examples=300)
@given(st.none() | text, st.lists(calls, max_size=5))
def test_targets_round_trip(content, call_list):
    if not call_list and content is None:
        content = "ok"
    completion = fmt.render_target(content, call_list)
    assert completion.endswith(EOT)
    parsed = fmt.parse(completion)
    assert parsed.error is None
    assert parsed.tool_calls == call_list
    assert parsed.content == content
    if call_list:
        assert completion.count(FC) == 1 + sum(json.dumps(c.arguments, ensure_ascii=False).count(FC) for c in call_list)
        assert ", " not in completion.split(FC, 1)[1] or any(", " in json.dumps(c.arguments, ensure_ascii=False, separators=(",", ":")) for c in call_list)


def _openai(turns: list) -> list[list[dict]]:
    """Generated turns (user text, steps of (calls, results), closing text) as a record's conversation."""
    out = []
    for t, (question, steps, closing) in enumerate(turns):
        messages = [{"role": "user", "content": question}]
        for k, (step_calls, results) in enumerate(steps):
            ids = [f"call_{t}_{k}_{i}" for i in range(len(step_calls))]
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": i, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for i, c in zip(ids, step_calls)]})
            messages += [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, results)]
        messages.append({"role": "assistant", "content": closing})
        out.append(messages)
    return out


steps = st.lists(st.lists(calls, min_size=1, max_size=2).flatmap(
    lambda cs: st.tuples(st.just(cs), st.lists(st.text(max_size=30), min_size=len(cs), max_size=len(cs)))), max_size=3)
multi_turn = st.lists(st.tuples(text, steps, text), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multi_turn, tools)
def test_multi_turn_records_train_every_assistant_message_on_what_serving_renders(smollm2_tokenizer, turns, tool_list):
    """A multi-turn conversation becomes one pair per assistant message: the prompt is the conversation
    so far as serving renders it, the completion parses back to that message, and the text learned is
    exactly what the next prompt shows as history."""
    from fcdistill.data.bfcl import Record
    from fcdistill.data.export import trl_records

    chat = ChatFormat(smollm2_tokenizer, fc_token=FC)
    conversation = _openai(turns)
    rec = Record(id="multi_turn_base_0", category="multi_turn_base", split="train", messages=conversation[0][:1],
                 tools=tool_list, turns=[turn[:1] for turn in conversation], conversation=conversation)
    rows = trl_records(chat, rec)
    flat = [m for turn in conversation for m in turn]
    at = [i for i, m in enumerate(flat) if m["role"] == "assistant"]
    assert [r["id"] for r in rows] == [f"multi_turn_base_0#{k}" for k in range(len(at))]
    for row, i in zip(rows, at):
        assert row["prompt"] == chat.render_prompt(flat[:i], tool_list)
        parsed = chat.parse(row["completion"])
        want = as_messages([flat[i]])[0]
        assert parsed.error is None and parsed.content == want.content and tuple(parsed.tool_calls) == want.tool_calls
    for a, b in zip(rows, rows[1:]):
        assert b["prompt"].startswith(a["prompt"] + a["completion"])


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_any_text_after_fc_parses_or_gives_a_reason(tail):
    parsed = fmt.parse(FC + tail)
    if parsed.error is not None:
        assert parsed.tool_calls == [] and parsed.content == (FC + tail).split(EOT)[0]
    else:
        assert parsed.tool_calls


def test_malformed_completions_give_reasons():
    cases = {
        FC: "no calls",
        FC + '[{"name": "f", "arguments": {"a": 1}': "not valid JSON",
        FC + '[{"arguments": {}}]': "no function name",
        FC + '[{"name": "f", "arguments": [1]}]': "not an object",
        FC + '[{"name": "f", "arguments": {}}] and more': "unexpected text",
        FC + "[]": "empty list",
        FC + '[{"name": "f", "arguments": {}, "id": 3}]': "unexpected keys",
        FC + "[1]": "not an object",
        FC + '[{"name": "f", "arguments": {"x": 1e999}}]': "out of range",
        FC + '[{"name": "f", "arguments": {"x": NaN}}]': "not a JSON number",
    }
    for completion, reason in cases.items():
        parsed = fmt.parse(completion)
        assert parsed.tool_calls == []
        assert reason in parsed.error, (completion, parsed.error)
        assert parsed.content == completion


def test_text_after_end_of_turn_is_ignored_and_openai_arguments_accepted():
    parsed = fmt.parse(FC + '[{"name": "f", "arguments": "{\\"x\\": 2}"}]' + EOT + "garbage")
    assert parsed.tool_calls == [ToolCall(name="f", arguments={"x": 2})]
    assert fmt.parse("hello" + EOT + FC + "[]").content == "hello"


def test_openai_messages_resolve_tool_names_from_call_ids():
    msgs = as_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ])
    assert msgs[1].tool_calls[0].arguments == {"city": "Paris"}
    assert msgs[2].name == "get_weather"


def test_render_prompt_uses_the_students_template(smollm2_tokenizer):
    chat = ChatFormat(smollm2_tokenizer)
    tool = ToolSpec(name="get_weather", description="Weather for a city.",
                    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    prompt = chat.render_prompt([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ], [tool])
    assert prompt.startswith("<|im_start|>system\n# Functions")
    assert '{"name":"get_weather","description":"Weather for a city."' in prompt
    assert '<|im_start|>assistant\n<tool_call>[{"name":"get_weather","arguments":{"city":"Paris"}}]<|im_end|>' in prompt
    assert '<|im_start|>tool\n{"name": "get_weather", "content": "18C"}<|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # the FC token is one token of the student's vocabulary
    ids = smollm2_tokenizer.encode(chat.render_target(None, [ToolCall(name="f")]), add_special_tokens=False)
    assert ids[0] == smollm2_tokenizer.convert_tokens_to_ids(FC)
    assert ids[-1] == smollm2_tokenizer.eos_token_id


def test_python_syntax_round_trips_through_bfcl_decoder():
    from fcdistill.chat_format import parse_python_calls

    call_list = [ToolCall(name="math.factorial", arguments={"n": 5}), ToolCall(name="g", arguments={"s": "a'b", "xs": [1, 2.5]})]
    parsed = parse_python_calls(render_python_calls(call_list))
    assert parsed.error is None and parsed.tool_calls == call_list
    bad = parse_python_calls("I cannot help with that")
    assert bad.error and bad.tool_calls == []


# -- streaming calls ---------------------------------------------------------------------------------
STREAM_CALLS = [ToolCall(name="get_weather", arguments={"city": 'Pa"ris {x}', "days": [1, 2], "opts": {"u": "C"}}),
                ToolCall(name="math.sqrt", arguments={}),
                ToolCall(name="note", arguments={"text": "a, b] c}", "n": -1.5e3, "ok": True, "none": None})]


def _stream(text: str, sizes: list[int], stream_arguments=None, copies=None):
    from fcdistill.chat_format import CallStreamer

    streamer, pieces, at = CallStreamer("<tool_call>", stream_arguments, copies=copies), [], 0
    for size in sizes:
        at = min(len(text), at + size)
        pieces += streamer.feed(text[:at])
    return streamer, pieces


@pytest.mark.parametrize("seed", range(6))
def test_calls_stream_as_openai_does_whatever_the_chunking(seed):
    import random

    fmt = ChatFormat()
    text = "Let me check." + fmt.render_target(None, STREAM_CALLS)
    if seed % 2:  # a model's own spacing
        spaced = json.dumps([{"name": c.name, "arguments": c.arguments} for c in STREAM_CALLS], indent=1)
        text = f"Let me check.{fmt.fc_token} {spaced}{fmt.eot}"
    rng = random.Random(seed)
    streamer, pieces = _stream(text, [rng.randint(1, 7) for _ in range(len(text))])
    names = [(p.index, p.name) for p in pieces if p.name is not None]
    assert names == [(0, "get_weather"), (1, "math.sqrt"), (2, "note")]
    for i, call in enumerate(STREAM_CALLS):
        mine = [p for p in pieces if p.index == i]
        assert mine[0].name == call.name and mine[0].arguments == ""  # name first, arguments after
        assert json.loads("".join(p.arguments for p in mine)) == call.arguments
    assert len([p for p in pieces if p.index == 0]) > 3  # fragments, not one piece
    assert streamer.finish(fmt.parse(text).tool_calls) == []  # everything went out already


def test_a_call_that_may_not_stream_comes_whole_after_the_checks():
    fmt = ChatFormat()
    text = fmt.render_target(None, STREAM_CALLS)
    streamer, pieces = _stream(text, [3] * len(text), stream_arguments=lambda name: name != "math.sqrt")
    assert {p.index for p in pieces} == {0}  # the second call holds back the third: calls stay in order
    rest = streamer.finish(STREAM_CALLS)
    assert [(d.index, d.name) for d in rest] == [(1, "math.sqrt"), (2, "note")]
    assert json.loads(rest[1].arguments) == STREAM_CALLS[2].arguments
    # checked calls that differ from what was streamed: the caller falls back
    assert streamer.finish(STREAM_CALLS[1:]) is None and streamer.finish([]) is None


def test_text_without_calls_streams_no_call():
    streamer, pieces = _stream("no tools needed <|im_end|>", [2] * 20)
    assert pieces == [] and streamer.finish([]) == []


@pytest.mark.parametrize("seed", range(4))
def test_a_repeated_call_is_never_streamed_and_a_similar_one_is(seed):
    """With the loop guard's repeat rule: a call that starts like an earlier one is held back until it
    differs (then streams whole so far), a copy is never sent, and the streamed calls are `first_copies`."""
    import random

    from fcdistill.chat_format import first_copies

    a, b = STREAM_CALLS[0], ToolCall(name="get_weather", arguments={**STREAM_CALLS[0].arguments, "opts": {"u": "F"}})
    calls = [a, b, a, STREAM_CALLS[1], STREAM_CALLS[1]]
    fmt = ChatFormat()
    text = fmt.render_target(None, calls)
    rng = random.Random(seed)
    streamer, pieces = _stream(text, [rng.randint(1, 5) for _ in range(len(text))], copies=1)
    kept = first_copies(calls, fmt.call_texts(text))
    assert kept == [a, b, STREAM_CALLS[1]]
    assert [(p.index, p.name) for p in pieces if p.name is not None] == [(0, a.name), (1, b.name), (2, "math.sqrt")]
    for i, call in enumerate(kept):
        assert json.loads("".join(p.arguments for p in pieces if p.index == i)) == call.arguments
    second = [p for p in pieces if p.index == 1]  # held while it read as a copy of the first, then sent
    assert second[1].arguments.startswith('{"city":"Pa\\"ris {x}","days":[1,2],"opts":{"u":"F'), second
    assert streamer.finish(kept) == []
    _, unguarded = _stream(text, [3] * len(text))
    assert len({p.index for p in unguarded}) == 5  # without the rule every call streams
    two, pieces = _stream(text, [rng.randint(1, 5) for _ in range(len(text))], copies=2)  # two copies allowed
    assert first_copies(calls, fmt.call_texts(text), 2) == calls and len({p.index for p in pieces}) == 5 and two.finish(calls) == []
    thrice = [a, a, a]
    _, pieces = _stream(fmt.render_target(None, thrice), [4] * 400, copies=2)
    assert first_copies(thrice, fmt.call_texts(fmt.render_target(None, thrice)), 2) == [a, a]
    assert {p.index for p in pieces} == {0, 1}
    # the same arguments spelled differently are different calls, to the guard and here alike
    spelled = fmt.render_target(None, [a]).replace('"days":[1,2]', '"days":[1.0,2]')
    twice = fmt.render_target(None, [a, a])
    mixed = twice[:twice.index(",{")] + "," + spelled[spelled.index("[") + 1:]
    parsed = fmt.parse(mixed).tool_calls
    assert parsed == [a, a] and first_copies(parsed, fmt.call_texts(mixed)) == [a, a]
