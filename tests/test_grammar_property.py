"""The guarantee: whatever the logits, constrained output parses, names a tool, and validates; and
given its max_tokens, it is complete (FC, calls, end-of-turn) within them, looping or not.

A random "model" drives the constraint: logits are Gaussian noise plus a fixed bias towards short
tokens, so walks through long strings end within a bounded number of steps. The constraint must hold
for any logits, so a biased random draw is as good a witness as an unbiased one. Adversarial
"models" that always want one more character, item or call check the loop guard.
"""

from __future__ import annotations

import functools
import json
import re
import string

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcdistill.chat_format import ChatFormat
from fcdistill.grammars import LoopGuard, SequenceConstraint, compile_grammar, token_vocabulary
from fcdistill.tools import ToolSpec, closed_schema

MAX_STEPS = 600
BACKENDS = pytest.mark.parametrize("backend", ["outlines", "llguidance"])
SUB_VOCAB = 6000  # the property needs real multi-character tokens, not all 49k: compile stays fast


@pytest.fixture(scope="module")
def rig(smollm2_tokenizer):
    """A vocabulary of SmolLM2's first tokens (all bytes and the commonest merges) plus FC and end-of-turn."""
    import torch
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Vocabulary

    from fcdistill.grammars.vocabulary import TokenVocabulary, token_bytes

    tok = smollm2_tokenizer
    adapter = TransformerTokenizer(tok)
    special = set(tok.all_special_ids)
    fc_id = tok.convert_tokens_to_ids("<tool_call>")
    words: dict[bytes, list[int]] = {}
    size = len(tok)
    pieces = [b""] * size
    for t, i in tok.get_vocab().items():
        if i < SUB_VOCAB and i not in special:
            raw = token_bytes(t, adapter.convert_token_to_string)  # byte tokens as their byte, as the server's
            words.setdefault(raw, []).append(i)
            pieces[i] = raw
    vocab = TokenVocabulary(key=("smollm2-sub", SUB_VOCAB, "<tool_call>"), vocabulary=Vocabulary(tok.eos_token_id, words),
                            size=size, eot_id=tok.eos_token_id, fc_id=fc_id, special_ids=frozenset(special),
                            pieces=tuple(pieces), encode=functools.partial(tok.encode, add_special_tokens=False))
    assert vocab.single_bytes >= set(range(0x20, 0x7F)) | set(range(0x80, 0xC0))  # so llguidance gets a close_bound
    lengths = torch.full((size,), 99.0)
    for t, i in tok.get_vocab().items():
        lengths[i] = len(adapter.convert_token_to_string(t))
    bias = torch.where(lengths <= 1, 4.0, 0.0)
    return vocab, bias, ChatFormat(tok), tok


def _walk(rig, grammar, seed: int, fc_boost_at: int | None = None, max_tokens: int | None = None,
          guard: LoopGuard | None = None, bonus=None, constraint: SequenceConstraint | None = None) -> tuple[str, bool]:
    """Sample until end-of-turn, at most `max_tokens` tokens (end-of-turn included) or MAX_STEPS, taking the
    token `forced()` names when it names one, as the hf engine's jump-forward does;
    `fc_boost_at`: from that step on, the FC token's logit is huge; `bonus`: added to every step's
    logits (a model with a habit); `constraint`: use this one (to look at it afterwards)."""
    import torch

    vocab, bias, _, tok = rig
    gen = torch.Generator().manual_seed(seed)
    c = constraint or SequenceConstraint(grammar, max_tokens, guard)
    out: list[int] = []
    for step in range(max_tokens or MAX_STEPS):
        logits = torch.randn(vocab.size, generator=gen) * 2.0 + bias
        if fc_boost_at is not None and step >= fc_boost_at:
            logits[vocab.fc_id] = 1e4
        if bonus is not None:
            logits += bonus
        forced = c.forced()  # what the hf engine's jump-forward appends without sampling
        c.mask_(logits)
        assert torch.isfinite(logits).any(), "the constraint allowed no token at all"
        if forced is not None:
            assert torch.isfinite(logits[forced]) and int(torch.isfinite(logits).sum()) == 1, "forced() != mask_()"
            token = forced
        else:
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if token == vocab.eot_id:
            return tok.decode(out, skip_special_tokens=False) + tok.eos_token, True
        c.advance(token)
        out.append(token)
    return tok.decode(out, skip_special_tokens=False), False


names = st.from_regex(r"[a-z][a-z0-9_]{0,10}(\.[a-z][a-z0-9_]{0,8})?", fullmatch=True)
prop_names = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
leaf = st.one_of(
    st.just({"type": "string"}), st.just({"type": "integer"}), st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.lists(st.text(string.ascii_letters + " ", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
        lambda xs: {"type": "string", "enum": xs}),
    st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True).map(lambda xs: {"type": "integer", "enum": xs}),
)


def _obj(children):
    return st.dictionaries(prop_names, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))


schemas = st.recursive(leaf, lambda children: st.one_of(
    children.map(lambda c: {"type": "array", "items": c}), _obj(children)), max_leaves=3)
def tool_set_strategy(max_size: int) -> st.SearchStrategy[list[ToolSpec]]:
    return st.lists(
        st.builds(lambda n, props_req: ToolSpec(name=n, description="", parameters={
            "type": "object", "properties": props_req[0], "required": props_req[1]}),
            names,
            st.dictionaries(prop_names, schemas, max_size=3).flatmap(
                lambda props: st.lists(st.sampled_from(sorted(props)) if props else st.nothing(), unique=True).map(
                    lambda req: (props, req)))),
        min_size=1, max_size=max_size, unique_by=lambda t: t.name)


tool_sets = tool_set_strategy(40)


def _check_calls(rig, tools, text, at_least_one: bool, at_most_one: bool, only: str | None = None) -> None:
    parsed = rig[2].parse(text)
    assert parsed.error is None, (parsed.error, text[:300])
    if at_least_one:
        assert parsed.tool_calls
    if at_most_one:
        assert len(parsed.tool_calls) <= 1
    by_name = {t.name: t for t in tools}
    for call in parsed.tool_calls:
        assert call.name in by_name and (only is None or call.name == only)
        jsonschema.validate(call.arguments, closed_schema(by_name[call.name].parameters))


@BACKENDS
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tool_sets, st.sampled_from(["required", "named", "auto", "none"]), st.booleans(), st.integers(0, 2**31))
def test_constrained_output_always_validates(rig, backend, tools, mode, parallel, seed):
    vocab = rig[0]
    choice = tools[seed % len(tools)].name if mode == "named" else mode
    grammar, _ = compile_grammar(vocab, tools, choice, parallel, backend=backend)
    if mode == "none":  # even a model that wants nothing but FC never gets it
        text, _ = _walk(rig, grammar, seed, fc_boost_at=0)
        assert "<tool_call>" not in text
        return
    finished = False
    for k in range(3):
        # a walk through nested arrays can go on past MAX_STEPS (each element may open another); the
        # last try gives the grammar that budget, within which it must close the call
        text, finished = _walk(rig, grammar, seed + k, fc_boost_at=seed % 5 if mode == "auto" else None,
                               max_tokens=MAX_STEPS if k == 2 else None)
        if finished:
            break
    assert text.startswith("<tool_call>") or (mode == "auto" and "<tool_call>" in text)
    assert finished, "not even the budgeted walk finished"
    _check_calls(rig, tools, text, at_least_one=True, at_most_one=not parallel or mode == "named",
                 only=choice if mode == "named" else None)


def test_required_forces_fc_even_against_the_logits(rig):
    import torch

    vocab = rig[0]
    tools = [ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})]
    grammar, _ = compile_grammar(vocab, tools, "required", False)
    c = SequenceConstraint(grammar)
    logits = torch.zeros(vocab.size)
    logits[vocab.eot_id] = 100.0  # the model wants to stop at once
    c.mask_(logits)
    assert int(torch.argmax(logits)) == vocab.fc_id


def test_repeated_tool_sets_compile_once(rig):
    import time

    vocab = rig[0]
    tools = [ToolSpec(name="cache_probe", parameters={"type": "object", "properties": {"q": {"type": "string"}}})]
    first, hit1 = compile_grammar(vocab, tools, "auto", True)
    start = time.perf_counter()
    second, hit2 = compile_grammar(vocab, tools, "auto", True)
    assert (hit1, hit2) == (False, True) and second is first
    assert time.perf_counter() - start < 0.05
    _, hit3 = compile_grammar(vocab, tools, "required", True)  # another mode is another grammar
    assert hit3 is False


def test_json_response_format_uses_the_same_machinery(rig):
    vocab = rig[0]
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
              "required": ["answer", "why"]}
    grammar, _ = compile_grammar(vocab, [], "none", True, json_schema=schema)
    for seed in range(3):  # the budget makes every walk end: each one is checked
        text, done = _walk(rig, grammar, seed, max_tokens=MAX_STEPS, guard=LoopGuard())
        assert done, text[-200:]
        jsonschema.validate(json.loads(text.removesuffix(rig[3].eos_token)), schema)


def test_non_ascii_enums_compile_and_generate(smollm2_tokenizer):
    """Pieces of multi-byte characters are in the vocabulary: a Korean enum (BFCL live) compiles and is produced."""
    import torch

    vocab = token_vocabulary(smollm2_tokenizer, "<tool_call>")
    values = ["거실, 에어컨, 실행", "다용도실, 통돌이, 중지"]
    tools = [ToolSpec(name="ControlAppliance.execute", parameters={
        "type": "object", "properties": {"command": {"type": "string", "enum": values}}, "required": ["command"]})]
    grammar, _ = compile_grammar(vocab, tools, "required", False)
    c = SequenceConstraint(grammar)
    out: list[int] = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        logits = torch.randn(vocab.size, generator=gen)
        c.mask_(logits)
        token = int(torch.argmax(logits))
        if token == vocab.eot_id:
            break
        c.advance(token)
        out.append(token)
    parsed = ChatFormat(smollm2_tokenizer).parse(smollm2_tokenizer.decode(out) + smollm2_tokenizer.eos_token)
    assert parsed.tool_calls and parsed.tool_calls[0].arguments["command"] in values


def test_any_typed_parameters_compile_and_accept_any_value(rig):
    """BFCL `any` parameters arrive as `{"description": ...}` only (seen on simple_python_109,
    multiple_181, live_simple_122): outlines-core refused them, and the server answered 400. They now
    compile to "a scalar or a flat list of scalars" (nested `{}` makes an Index of minutes and GBs)."""
    tools = [ToolSpec(name="train_model", description="", parameters={
        "type": "object", "properties": {"data": {"description": "The training data for the model."},
                                         "epochs": {"type": "integer", "description": "How many passes."}},
        "required": ["data"]})]
    grammar, _ = compile_grammar(rig[0], tools, "required", True)
    for seed in range(3):  # the budget makes every walk end: each one is checked
        text, finished = _walk(rig, grammar, seed, max_tokens=MAX_STEPS, guard=LoopGuard())
        assert finished, text[-200:]
        _check_calls(rig, tools, text, at_least_one=True, at_most_one=False)


def _allowed_after(rig, grammar, text: str) -> list[str]:
    """Walk the grammar's Index along `text` one character token at a time (each must be allowed; no
    spaces, so each character is its own byte-level token); the tokens allowed next."""
    from outlines_core import Guide

    tok = rig[3]
    guide = Guide(grammar.index)
    for tid in tok.convert_tokens_to_ids(list(text)):
        assert tid in guide.get_tokens(), (text, tok.decode([tid]))
        guide.advance(tid)
    return [tok.decode([t]) for t in guide.get_tokens()]


def test_free_form_objects_and_arrays_get_flat_values(rig):
    """BFCL `dict` parameters without properties (simple_python's poker_game_winner `cards`, live_multiple's
    `items: {"type": "object"}`) and arrays without items: outlines-core allows nested JSON to depth 3
    there (13 kB of regex, 6-30 s to compile); their values are bounded to scalars or flat lists, like `any`."""
    tools = [ToolSpec(name="poker_game_winner", description="", parameters={
        "type": "object", "properties": {"cards": {"type": "object", "description": "name -> cards"},
                                         "boxes": {"type": "array", "items": {"type": "object"}},
                                         "tags": {"type": "array"}},
        "required": ["cards", "boxes", "tags"]})]
    grammar, _ = compile_grammar(rig[0], tools, "required", True)
    head = '[{"name":"poker_game_winner","arguments":{"cards":{"alice":'
    assert not any(t.lstrip().startswith("{") for t in _allowed_after(rig, grammar, head))
    assert not any(t.lstrip().startswith(("{", "[")) for t in _allowed_after(rig, grammar, head + "["))
    assert not any(t.lstrip().startswith("{") for t in _allowed_after(rig, grammar, head + '1},"boxes":[{"x":'))
    assert not any(t.lstrip().startswith(("{", "[")) for t in _allowed_after(rig, grammar, head + '1},"boxes":[],"tags":['))
    for seed in range(3):  # the budget makes every walk end: each one is checked
        text, finished = _walk(rig, grammar, seed, max_tokens=MAX_STEPS, guard=LoopGuard())
        assert finished, text[-200:]
        _check_calls(rig, tools, text, at_least_one=True, at_most_one=False)


# -- the budget: every forced answer is complete within max_tokens ---------------------------------------
@BACKENDS
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tool_set_strategy(6), st.sampled_from(["required", "named", "auto"]), st.booleans(), st.integers(0, 2**31),
       st.integers(0, 120))
def test_answers_close_within_max_tokens(rig, backend, tools, mode, parallel, seed, extra):
    """Any max_tokens from the shortest valid call up: a `required` or named answer is complete (calls
    closed, end-of-turn) within it, and under `auto` a call the model opened is closed too. Under
    llguidance, budgets past `close_bound` start on the matcher and hand over to the Index mid-answer."""
    choice = tools[seed % len(tools)].name if mode == "named" else mode
    grammar, _ = compile_grammar(rig[0], tools, choice, parallel, backend=backend)
    max_tokens = grammar.min_tokens + extra
    text, finished = _walk(rig, grammar, seed, fc_boost_at=seed % 7 if mode == "auto" else None,
                           max_tokens=max_tokens, guard=LoopGuard())
    if mode == "auto" and "<tool_call>" not in text:
        return  # a text answer: nothing to close
    assert finished, f"cut at max_tokens={max_tokens}: {text[-200:]}"
    _check_calls(rig, tools, text, at_least_one=True, at_most_one=not parallel or mode == "named",
                 only=choice if mode == "named" else None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tool_set_strategy(6), st.booleans())
def test_close_bound_is_never_below_a_state_distance(rig, tools, parallel):
    """llguidance hands masking to the Index once the tokens left come within close_bound: that is safe
    only if no state of the Index is farther than close_bound from a complete answer."""
    from fcdistill.grammars.closing import UNREACHABLE
    from fcdistill.grammars.constraint import _regex, calls_schema
    from fcdistill.grammars.regex_bound import close_bound

    grammar, _ = compile_grammar(rig[0], tools, "required", parallel)
    bound = close_bound(_regex(calls_schema(tools, parallel=parallel)), rig[0].single_bytes)
    assert bound is not None and bound >= max(d for d in grammar.table.dist.values() if d < UNREACHABLE)


def test_the_index_takes_over_before_the_budget_binds(rig):
    """A model that wants one more character forever, no loop guard, a budget past close_bound: the
    llguidance matcher masks first, hands over to the Index in time, and the budget closes the call."""
    tools = [ROOMS]
    grammar, _ = compile_grammar(rig[0], tools, "required", False, backend="llguidance")
    max_tokens = grammar.close_bound + 60
    c = SequenceConstraint(grammar, max_tokens)
    c.advance(rig[0].fc_id)
    assert c.matcher is not None and c.guide is None
    text, finished = _walk(rig, grammar, 1, max_tokens=max_tokens - 1, constraint=c, bonus=_bonus(rig, ["a"]))
    assert finished and c.matcher is None and c.forced_close == "budget", text[-200:]
    _check_calls(rig, tools, "<tool_call>" + text, at_least_one=True, at_most_one=True)


@BACKENDS
def test_auto_offers_fc_only_while_a_call_fits(rig, backend):
    import torch

    vocab = rig[0]
    grammar, _ = compile_grammar(vocab, [ToolSpec(name="f", parameters={
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})], "auto", True, backend=backend)
    for max_tokens, offered in ((grammar.min_tokens - 1, False), (grammar.min_tokens, True)):
        logits = torch.zeros(vocab.size)
        SequenceConstraint(grammar, max_tokens, LoopGuard()).mask_(logits)
        assert bool(torch.isfinite(logits[vocab.fc_id])) is offered, max_tokens
    text, finished = _walk(rig, grammar, 0, fc_boost_at=0, max_tokens=grammar.min_tokens)
    assert finished and re.fullmatch(r'<tool_call>\[\{"name":"f","arguments":\{"x":\d\}\}\]<\|im_end\|>', text), text


@BACKENDS
def test_json_response_format_closes_within_max_tokens(rig, backend):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                               "why": {"type": "string"}}, "required": ["tags", "why"]}
    grammar, _ = compile_grammar(rig[0], [], "none", True, json_schema=schema, backend=backend)
    for seed in range(6):
        text, finished = _walk(rig, grammar, seed, max_tokens=grammar.min_tokens + seed * 3, guard=LoopGuard())
        assert finished, text
        jsonschema.validate(json.loads(text.removesuffix(rig[3].eos_token)), schema)


# -- the loop guard: a model that always wants more still closes -----------------------------------------
ROOMS = ToolSpec(name="book", parameters={"type": "object", "properties": {
    "guest": {"type": "string"},
    "rooms": {"type": "array", "items": {"type": "object", "properties": {
        "kind": {"type": "string"}, "beds": {"type": "integer"}}, "required": ["kind", "beds"]}}},
    "required": ["guest", "rooms"]})


def _bonus(rig, texts: list[str], value: float = 1e4):
    """A logit bonus for the tokens spelling `texts`, the first preferred most."""
    import torch

    vocab, _, _, tok = rig
    bonus = torch.zeros(vocab.size)
    for rank, text in enumerate(texts):
        bonus[tok.convert_tokens_to_ids(text)] = value - 100 * rank
    return bonus


@BACKENDS
@pytest.mark.parametrize("habit", ["one more character", "one more item", "one more call", "never-repeating text"])
def test_a_model_that_always_wants_more_still_closes_its_call(rig, habit, backend):
    """Without the loop guard each of these runs to max_tokens (here far away): the same character, a new
    array item, the same call again, varied letters past the value budget. With it, the looping value
    (or the call list) is closed and the answer ends long before max_tokens, as a valid call. (One call
    for the first three: different calls, each closed, may go on until the budget closes the list.)"""
    import torch

    vocab, _, _, tok = rig
    guard = LoopGuard(value_tokens=48)
    tools = [ROOMS, ToolSpec(name="ping", parameters={"type": "object", "properties": {}})]
    only = {"one more call": "ping"}.get(habit, "book")
    grammar, _ = compile_grammar(vocab, [t for t in tools if t.name == only], "required", only == "ping", backend=backend)
    if habit == "never-repeating text":
        letters = [i for i in range(SUB_VOCAB) if tok.decode([i]).isalpha() and len(tok.decode([i])) > 2]
        bonus = torch.zeros(vocab.size)
        bonus[letters] = 12.0  # varied words, no fixed n-gram; the closing quote gets nothing
    else:
        bonus = _bonus(rig, {"one more character": ["a"], "one more item": [",", "{\"", "},"],
                             "one more call": [","]}[habit])
    c = SequenceConstraint(grammar, 1000, guard)
    text, finished = _walk(rig, grammar, 1, max_tokens=1000, constraint=c, bonus=bonus)
    assert finished and c.forced_close == "loop", text[-300:]
    assert 1000 - c.left < 300, text  # tokens spent
    _check_calls(rig, tools, text, at_least_one=True, at_most_one=False)
    if habit == "one more call":
        assert len(rig[2].parse(text).tool_calls) == guard.same_calls + 1  # the copy the server then drops


@BACKENDS
def test_different_parallel_calls_pass_untouched_and_a_repeat_ends_the_list(smollm2_tokenizer, backend):
    """Two cities: every token is allowed, even at the tightest max_tokens that holds the answer; with
    room left, the guard never narrowed anything. The same call twice: still every token up to the
    copy's end (the server then drops the copy), but the guard closes the list there: no third call."""
    import torch

    tok = smollm2_tokenizer
    vocab = token_vocabulary(tok, "<tool_call>")
    weather = ToolSpec(name="get_weather", parameters={"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "array", "items": {"type": "integer"}}}, "required": ["city"]})
    grammar, _ = compile_grammar(vocab, [weather], "required", True, backend=backend)
    call = '{"name":"get_weather","arguments":{"city":"%s","days":[1,1,1,2]}}'
    for body in (f"[{call % 'Paris'},{call % 'London'}]", f"[{call % 'Paris'},{call % 'Paris'}]"):
        ids = [vocab.fc_id, *tok.encode(body, add_special_tokens=False), vocab.eot_id]
        repeat = "London" not in body
        for max_tokens in (len(ids), len(ids) + 100):
            c = SequenceConstraint(grammar, max_tokens, LoopGuard())
            for i, t in enumerate(ids):
                logits = torch.zeros(vocab.size)
                c.mask_(logits)
                assert torch.isfinite(logits[t]), (body, max_tokens, tok.decode([t]))
                if repeat and i == len(ids) - 2:  # the list's `]`: a third call is refused
                    assert not torch.isfinite(logits[tok.convert_tokens_to_ids(",")])
                c.advance(t)
            assert c.phase == "done"
            assert c.forced_close == ("loop" if repeat else None) or (max_tokens == len(ids) and not repeat)

