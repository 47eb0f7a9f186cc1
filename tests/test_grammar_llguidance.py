"""The llguidance backend on real tool sets and through a real server: same calls, no Index unless needed.

On BFCL tool sets with SmolLM2's whole vocabulary: `close_bound` is never below any Index state's
distance to a complete answer (so the matcher hands over before the budget could bind), and along
each canonical answer the llguidance mask is within outlines' mask and allows the answer's token.
Through `fcd serve --grammar-backend llguidance` (a real process, the openai client): greedy answers
equal those of the shared outlines server, no Index is compiled at eval's max_tokens, and a tight
max_tokens still gets a complete call or the outlines backend's 400.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import BOOKING, SERVE_KEY
from fcdistill.data.bfcl import canonical_calls, load_category
from fcdistill.grammars import LoopGuard, SequenceConstraint, compile_grammar, token_vocabulary
from fcdistill.grammars.closing import UNREACHABLE
from fcdistill.grammars.constraint import _regex, calls_schema
from fcdistill.grammars.regex_bound import close_bound
from fcdistill.serve.process import start_server

SETS_PER_CATEGORY = 4


@pytest.fixture(scope="module")
def vocab(smollm2_tokenizer):
    return token_vocabulary(smollm2_tokenizer, "<tool_call>")


def _bfcl_items():
    items = []
    for category in ("simple_python", "multiple", "live_multiple"):
        records, _ = load_category(category)
        seen: set[str] = set()
        for r in records:
            key = json.dumps([t.model_dump() for t in r.tools], sort_keys=True)
            if key not in seen and len(seen) < SETS_PER_CATEGORY:
                seen.add(key)
                items.append(r)
    return items


@pytest.mark.parametrize("rec", _bfcl_items(), ids=lambda r: r.id)
def test_llguidance_matches_outlines_on_bfcl_tool_sets(vocab, smollm2_tokenizer, rec):
    import torch

    from fcdistill.chat_format import ChatFormat

    outl, _ = compile_grammar(vocab, rec.tools, "auto", True)
    llg, _ = compile_grammar(vocab, rec.tools, "auto", True, backend="llguidance")
    assert llg.matcher is not None and llg.index is None
    largest = max(d for d in outl.table.dist.values() if d < UNREACHABLE)
    assert llg.close_bound is not None and llg.close_bound >= largest, (llg.close_bound, largest)
    assert close_bound(_regex(calls_schema(rec.tools)), vocab.single_bytes) == llg.close_bound

    calls = rec.ground_truth or canonical_calls(rec.possible_answer or [], "python", None)
    ids = smollm2_tokenizer.encode(ChatFormat(smollm2_tokenizer).render_target(None, calls), add_special_tokens=False)
    cs = [SequenceConstraint(g, 512, LoopGuard()) for g in (outl, llg)]
    for token in ids:
        rows = []
        for c in cs:
            row = torch.zeros(vocab.size)
            c.mask_(row)
            rows.append(torch.isfinite(row))
        if not rows[0][token]:
            break  # a few BFCL answers break their own schema (simple_python_17 misses a required key)
        assert rows[1][token], smollm2_tokenizer.decode(ids[: ids.index(token) + 1])
        assert not (rows[1] & ~rows[0]).any(), "llguidance allowed a token outlines does not"
        for c in cs:
            c.advance(token)
    assert cs[0].phase == cs[1].phase
    assert cs[1].matcher is not None and llg.later._future is None  # 512 tokens: the Index was never wanted


def test_a_call_that_reads_as_a_copy_starts_the_index_compile_before_it_trips(vocab, smollm2_tokenizer):
    """Under llguidance a copy of a call hands masking over to the Index when it trips the guard. The
    Index starts compiling once a call reads as a copy past its name (the same function again), so the
    trip does not wait a whole compile on the engine step; a call of another function starts nothing."""
    from fcdistill.chat_format import ChatFormat
    from fcdistill.tools import ToolCall, ToolSpec

    fmt = ChatFormat(smollm2_tokenizer)
    for case in ("copy", "other function"):
        tools = [ToolSpec(name=f"{case.replace(' ', '_')}_{n}", parameters={
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}) for n in ("a", "b")]
        grammar, _ = compile_grammar(vocab, tools, "required", True, backend="llguidance")  # a fresh tool set
        assert grammar.later._future is None
        second = tools[0] if case == "copy" else tools[1]
        calls = [ToolCall(name=tools[0].name, arguments={"city": "Paris"}),
                 ToolCall(name=second.name, arguments={"city": "Paris"})]
        ids = smollm2_tokenizer.encode(fmt.render_target(None, calls), add_special_tokens=False)
        c = SequenceConstraint(grammar, 4096, LoopGuard())
        started_at = None
        for n, token in enumerate(ids[:-3]):  # up to just before the second call closes
            c.advance(token)
            if started_at is None and grammar.later._future is not None:
                started_at = smollm2_tokenizer.decode(ids[:n + 1])
        if case == "copy":
            assert started_at is not None and started_at.endswith('"arguments":'), started_at
            assert c.matcher is not None  # nothing tripped yet: still llguidance's
            grammar.later.result()
        else:
            assert started_at is None, started_at


CITY = {"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}
FLIGHT = {"type": "function", "function": {"name": "book_flight", "description": "Book a flight.", "parameters": {
    "type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                     "passengers": {"type": "integer"}},
    "required": ["origin", "destination"]}}}
ASKS = [("What's the weather in Paris in celsius?", "auto"), ("Book me a flight from Oslo to Rome for 2.", "required"),
        ("Weather in Tokyo and in Lima, please.", "auto")]


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def llg_server(tmp_path_factory, smollm2_dir, engine):
    """`fcd serve --grammar-backend llguidance` on each engine; on vllm the matcher is rebuilt from the
    regex in vLLM's engine process. --value-token-limit 64 as in test_serve: the loop guard trips sooner.
    The vllm server reserves a tenth of memory, not 0.3, so it starts beside the other test worker's server."""
    lean = ["--gpu-memory-utilization", "0.1", "--max-model-len", "2048"] if engine == "vllm" else []
    with start_server(["--model", "smollm2-135m", "--api-key", SERVE_KEY, "--grammar-backend", "llguidance",
                       "--value-token-limit", "64", *lean],
                      tmp_path_factory.mktemp(f"serve-llg-{engine}") / "serve.log", engine=engine,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as srv:
        yield srv.url


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY, timeout=600, max_retries=0)


def _ask(url: str, text: str, choice: str, **extra):
    return _client(url).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": text}], tools=[CITY, FLIGHT],
        tool_choice=choice, temperature=0, max_tokens=extra.pop("max_tokens", 512), **extra)


@pytest.mark.slow
def test_llguidance_server_answers_as_the_outlines_server(llg_server, hf_server, engine):
    """On the hf engine, greedy answers equal the shared outlines server's; vLLM's CPU kernels may round
    differently, so there every answer is checked against its schema instead."""
    import httpx
    import jsonschema

    from fcdistill.tools import closed_schema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (CITY, FLIGHT)}
    for text, choice in ASKS:
        ours = _ask(llg_server, text, choice)
        got = [(c.function.name, c.function.arguments) for c in ours.choices[0].message.tool_calls or []]
        for name, arguments in got:
            jsonschema.validate(json.loads(arguments), closed_schema(schemas[name]))
        if engine == "hf":
            theirs = _ask(hf_server, text, choice)
            want = [(c.function.name, c.function.arguments) for c in theirs.choices[0].message.tool_calls or []]
            assert got == want and ours.choices[0].message.content == theirs.choices[0].message.content, text
        if choice == "required":
            assert got
    metrics = httpx.get(f"{llg_server}/metrics", timeout=30).text
    assert "fcd_grammar_index_compiles 0.0" in metrics  # max_tokens 512: no answer needed outlines' Index


@pytest.mark.slow
def test_llguidance_server_keeps_the_budget_guarantee(llg_server):
    import openai

    # below the shortest call: the same 400 as the outlines backend (the Index is compiled to know)
    with pytest.raises(openai.BadRequestError, match="needs at least") as refused:
        _ask(llg_server, "Book a flight from Oslo to Rome.", "required", max_tokens=3)
    shortest = int(re.search(r"needs at least (\d+)", str(refused.value)).group(1))
    # a tight budget: the answer is a complete call all the same
    budget = shortest + 4
    reply = _ask(llg_server, "Book me a flight from Oslo to Rome for 2 people, window seats.", "required",
                 max_tokens=budget)
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.usage.completion_tokens <= budget
    assert {"origin", "destination"} <= set(json.loads(calls[0].function.arguments))




@pytest.mark.slow
def test_llguidance_server_hands_a_looping_answer_over_to_the_index(llg_server):
    """SmolLM2 loops inside these arguments (rooms of 100, 200, 300... beds). 160 tokens are beyond the
    grammar's close_bound, so no Index is compiled up front: the matcher masks until the loop guard
    trips, then the Index (compiled then, in vLLM's engine process on the vllm engine) takes over and
    closes the call; the API process's mirror of the state reports `forced_close: loop`."""
    import httpx
    import jsonschema

    from fcdistill.tools import closed_schema

    def compiles() -> float:
        text = httpx.get(f"{llg_server}/metrics", timeout=30).text
        return float(re.search(r"^fcd_grammar_index_compiles (\S+)$", text, re.M).group(1))

    before = compiles()
    r = _client(llg_server).chat.completions.create(
        model="smollm2-135m", tools=[BOOKING], tool_choice="required", temperature=0, max_tokens=160,
        messages=[{"role": "user", "content": "Book two double rooms and one single room for Ann Lee."}])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and r.usage.completion_tokens <= 160, c.message.content
    (call,) = c.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), closed_schema(BOOKING["function"]["parameters"]))
    assert (c.model_extra or {}).get("forced_close") == "loop"
    assert compiles() == before + 1, "the booking grammar's Index was not compiled for the loop guard alone"


@pytest.mark.parametrize("args, says", [
    (["--grammar-backend", "bogus"], "unknown --grammar-backend 'bogus'; choose outlines or llguidance"),
])
def test_serve_refuses_a_grammar_backend_it_cannot_run(args, says):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fcdistill", "serve", "--model", "smollm2-135m", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-1000:]
