"""The embedded engine's scheduler, in process with the real SmolLM2-135M: a request that arrives while
a batch decodes joins it (continuous batching) instead of waiting for it, decodes as it would alone,
keeps its grammar; leaving rows (finished, cancelled) do not disturb the others; and a waiting request for
another adapter is not starved by joiners."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from fcdistill.chat_format import ChatFormat
from fcdistill.grammars import SequenceConstraint, compile_grammar, token_vocabulary
from fcdistill.serve.engines.base import GenerationRequest, SamplingParams
from fcdistill.tools import normalize_tools

pytestmark = pytest.mark.slow  # the hf engine over the real model (one prefix-cache test only builds caches)

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and his dog."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
TOOLS = normalize_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}])


@pytest.fixture(scope="module", params=["continuous", "static"])
def engine(request):
    from fcdistill.serve.engines.hf import HFEngine

    eng = HFEngine("smollm2-135m", continuous=request.param == "continuous")
    yield eng
    asyncio.run(eng.shutdown())


def _request(eng, messages, max_tokens, tools=None, choice="required") -> GenerationRequest:
    chat = ChatFormat(eng.tokenizer, fc_token=eng.fc_token)
    ids = eng.tokenizer.encode(chat.render_prompt(messages, tools), add_special_tokens=False)
    constraint = None
    if tools:
        vocab = token_vocabulary(eng.tokenizer, eng.fc_token, eng.logits_size)
        constraint = SequenceConstraint(compile_grammar(vocab, tools, choice, True)[0])
    return GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens, temperature=0), constraint=constraint)


async def _collect(eng, req, log: list, name: str, started: asyncio.Event | None = None, after: int = 0):
    ids: list[int] = []
    reason = None
    async for ev in eng.generate(req):
        ids += ev.token_ids
        if ev.finish_reason:
            reason = ev.finish_reason
        if started is not None and (len(ids) >= after or reason):
            started.set()
    log.append(name)
    return ids, reason


async def _long_then_short(eng, long: GenerationRequest, short: GenerationRequest):
    """The long request runs; once it has decoded 4 tokens, the short one arrives."""
    order: list[str] = []
    started = asyncio.Event()
    long_task = asyncio.create_task(_collect(eng, long, order, "long", started, 4))
    await started.wait()
    short_ids, short_reason = await _collect(eng, short, order, "short")
    long_ids, long_reason = await long_task
    return order, (long_ids, long_reason), (short_ids, short_reason)


def test_a_request_arriving_mid_batch_joins_it(engine):
    order, (long_ids, long_reason), (short_ids, _) = asyncio.run(
        _long_then_short(engine, _request(engine, STORY, 64), _request(engine, WEATHER, 6)))
    assert long_reason == "length" and len(long_ids) == 64 and len(short_ids) == 6
    # continuous: the short request decodes alongside and ends first; static: it waits for the batch
    assert order == (["short", "long"] if engine.continuous else ["long", "short"])


@pytest.mark.parametrize("joiner", ["wider", "narrower"])
def test_joined_rows_decode_as_alone_and_keep_their_grammar(engine, joiner):
    """Either cache gets left-padded: the joiner's prompt is wider, or the running batch is."""
    if not engine.continuous:
        pytest.skip("joining is the continuous scheduler's")

    def requests():
        story = _request(engine, STORY, 40)
        call = _request(engine, WEATHER, 40, TOOLS)
        return (story, call) if joiner == "wider" else (call, story)

    long_alone = asyncio.run(_collect(engine, requests()[0], [], "long"))[0]
    short_alone = asyncio.run(_collect(engine, requests()[1], [], "short"))[0]
    _, (long_ids, _), (short_ids, _) = asyncio.run(_long_then_short(engine, *requests()))
    assert long_ids == long_alone and short_ids == short_alone  # padding changed nothing for either row
    call_ids = short_ids if joiner == "wider" else long_ids
    parsed = ChatFormat(engine.tokenizer, fc_token=engine.fc_token).parse(engine.tokenizer.decode(call_ids))
    assert parsed.error is None and [c.name for c in parsed.tool_calls] == ["get_weather"]
    jsonschema.validate(parsed.tool_calls[0].arguments, TOOLS[0].parameters)


def test_cancelled_and_finished_rows_leave_without_disturbing_the_rest(engine):
    async def go():
        alone = (await _collect(engine, _request(engine, STORY, 30), [], "x"))[0]
        keeper = asyncio.create_task(_collect(engine, _request(engine, STORY, 30), [], "keeper"))
        quitter = engine.generate(_request(engine, WEATHER, 30))
        await quitter.__anext__()
        await quitter.aclose()  # the client went away after one token
        short = await _collect(engine, _request(engine, WEATHER, 3), [], "short")
        return alone, (await keeper)[0], short[0]

    alone, kept, short = asyncio.run(go())
    assert kept == alone and len(short) == 3


def test_a_waiting_adapter_request_is_not_starved_by_joiners(adapter_dir):
    """Base request running; an adapter request arrives, then another base one. The second base request
    must not join the running batch ahead of the adapter request, which gets the next batch."""
    from fcdistill.serve.engines.hf import HFEngine

    eng = HFEngine("smollm2-135m", adapters={"noisy": str(adapter_dir)})

    async def go():
        order: list[str] = []
        started = asyncio.Event()
        long = asyncio.create_task(_collect(eng, _request(eng, STORY, 48), order, "long", started, 4))
        await started.wait()
        tuned = _request(eng, WEATHER, 4)
        tuned.adapter = "noisy"
        tuned_task = asyncio.create_task(_collect(eng, tuned, order, "adapter"))
        await asyncio.sleep(0)  # one turn of the loop: the adapter task runs to its first wait, its request queued
        await _collect(eng, _request(eng, WEATHER, 4), order, "base2")
        await asyncio.gather(long, tuned_task)
        return order

    try:
        assert asyncio.run(go()) == ["long", "adapter", "base2"]
    finally:
        asyncio.run(eng.shutdown())


def test_merged_adapters_answer_token_for_token_as_peft_layers(adapter_dir):
    """`merge_adapters` on (the default while memory allows) serves the adapter from a merged copy and the
    base as a plain model; greedy answers, free text and constrained calls, base and adapter, are those
    of PEFT's layers (merge_adapters off)."""
    from peft import PeftModel

    from fcdistill.serve.engines.hf import HFEngine

    def answers(eng) -> list[list[int]]:
        out = []
        for adapter in (None, "noisy"):
            for messages, tools in ((STORY, None), (WEATHER, TOOLS)):
                req = _request(eng, messages, 24, tools)
                req.adapter = adapter
                out.append(asyncio.run(_collect(eng, req, [], "x"))[0])
        return out

    peft = HFEngine("smollm2-135m", adapters={"noisy": str(adapter_dir)}, merge_adapters="off", dtype="fp32")
    try:
        assert isinstance(peft.model, PeftModel) and not peft.merged
        expected = answers(peft)
    finally:
        asyncio.run(peft.shutdown())
    merged = HFEngine("smollm2-135m", adapters={"noisy": str(adapter_dir)}, merge_adapters="on", dtype="fp32")
    try:
        assert not isinstance(merged.model, PeftModel) and set(merged.merged) == {"noisy"}
        got = answers(merged)
    finally:
        asyncio.run(merged.shutdown())
    assert got == expected
    assert expected[0] != expected[2] and expected[1] != expected[3]  # the adapter changes the answers
    with pytest.raises(ValueError, match="merge_adapters must be auto, on or off"):
        HFEngine("smollm2-135m", merge_adapters="sometimes")


def test_dtype_bf16_where_the_cpu_has_it_and_a_clear_refusal_where_not():
    import torch

    from fcdistill.models import cpu_has_native_bf16
    from fcdistill.serve.engines.hf import HFEngine

    if not cpu_has_native_bf16():
        with pytest.raises(ValueError, match="no native bf16"):
            HFEngine("smollm2-135m", dtype="bf16")
        return
    eng = HFEngine("smollm2-135m", dtype="bf16")
    try:
        assert eng.dtype == torch.bfloat16 and next(eng.model.parameters()).dtype == torch.bfloat16
        ids, reason = asyncio.run(_collect(eng, _request(eng, WEATHER, 40, TOOLS), [], "bf16"))
        text = eng.tokenizer.decode(ids)
        call = ChatFormat(eng.tokenizer, fc_token=eng.fc_token).parse(text).tool_calls[0]  # the grammar holds in bf16
        jsonschema.validate(call.arguments, TOOLS[0].parameters)
        assert reason == "stop"
    finally:
        asyncio.run(eng.shutdown())


def test_prefix_cache_reuses_the_tools_prompt_and_answers_as_without_it():
    from fcdistill.serve.engines.hf import HFEngine
    from fcdistill.serve.engines.prefix_cache import MIN_REUSE

    cached, plain = HFEngine("smollm2-135m"), HFEngine("smollm2-135m", prefix_cache_mb=0)
    try:
        first = _request(cached, WEATHER, 30, TOOLS)
        asyncio.run(_collect(cached, first, [], "first"))
        assert cached.prefix_cache.stats()["reused"] == 0 and cached.prefix_cache.stats()["computed"] == len(first.prompt_ids)
        again = [{"role": "user", "content": "And the weather in Lyon, in fahrenheit?"}]
        second = _request(cached, again, 30, TOOLS)
        common = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b)
        assert common >= MIN_REUSE  # the system turn with the tools
        got = asyncio.run(_collect(cached, second, [], "second"))
        stats = cached.prefix_cache.stats()
        assert stats["reused"] == common and stats["computed"] == len(first.prompt_ids) + len(second.prompt_ids) - common
        assert stats["hits"] == 1 and stats["entries"] == 2 and stats["bytes"] > 0
        # the same answer as computing the whole prompt
        assert got == asyncio.run(_collect(plain, _request(plain, again, 30, TOOLS), [], "plain"))
        assert "prefill_reused" not in plain.stats() and cached.stats()["prefill_reused"] == common
    finally:
        asyncio.run(cached.shutdown())
        asyncio.run(plain.shutdown())


def test_prompts_that_share_a_prefill_pass_answer_as_each_alone():
    """Requests arriving together are prefilled in groups of alike uncached tails, one forward pass a group,
    each reusing its own cached prefix (a conversation's next turn, a new question on the same tools, a
    prompt with nothing cached): each answers token for token as alone without a prefix cache (fp32)."""
    from fcdistill.serve.engines.hf import HFEngine, prefill_groups

    assert prefill_groups([28, 30, 27, 1700, 25], key=int) == [[25, 27, 28, 30], [1700]]
    assert prefill_groups([5, 200], key=int) == [[5], [200]]
    cached = HFEngine("smollm2-135m", dtype="fp32", prompt_lookup=0)
    plain = HFEngine("smollm2-135m", dtype="fp32", prompt_lookup=0, prefix_cache_mb=0)
    groups: list[list[int]] = []
    run_group = cached._prefill_group
    cached._prefill_group = lambda group, adapter: groups.append([n for _, n, _ in group]) or run_group(group, adapter)
    try:
        first = asyncio.run(_collect(cached, _request(cached, WEATHER, 30, TOOLS), [], "first"))
        asks = [(WEATHER + [{"role": "assistant", "content": "It is sunny."},
                            {"role": "user", "content": "And in Lyon, in fahrenheit?"}], TOOLS),
                ([{"role": "user", "content": "Weather in Rome, in celsius?"}], TOOLS),
                ([{"role": "user", "content": "Is it raining in Oslo?"}], TOOLS),
                (STORY, None)]
        before = cached.prefix_cache.stats()

        async def together():
            return await asyncio.gather(*[_collect(cached, _request(cached, m, 24, t, "auto"), [], str(i))
                                          for i, (m, t) in enumerate(asks)])
        got = asyncio.run(together())
        after = cached.prefix_cache.stats()
        want = [asyncio.run(_collect(plain, _request(plain, m, 24, t, "auto"), [], "alone")) for m, t in asks]
        assert first[1] in ("stop", "length")
    finally:
        asyncio.run(cached.shutdown())
        asyncio.run(plain.shutdown())
    assert got == want
    shared = [g for g in groups[1:] if len(g) > 1]
    assert shared and any(n > 0 for n in shared[0])  # rows reusing cached prefixes shared one pass
    assert after["reused"] > before["reused"] and after["hits"] - before["hits"] >= 3


def test_a_conversations_next_turn_reuses_the_answer_kept_from_its_last_turn():
    """A finished answer's keys and values join its prompt's in the prefix cache: the next turn, which
    repeats the call the model made, computes only what follows it, and answers as without a cache (fp32)."""
    from fcdistill.serve.engines.hf import HFEngine

    cached = HFEngine("smollm2-135m", dtype="fp32", prompt_lookup=0)
    plain = HFEngine("smollm2-135m", dtype="fp32", prompt_lookup=0, prefix_cache_mb=0)
    try:
        chat = ChatFormat(cached.tokenizer, fc_token=cached.fc_token)
        first = _request(cached, WEATHER, 40, TOOLS)
        answer, reason = asyncio.run(_collect(cached, first, [], "first"))
        assert reason == "stop"
        calls = chat.parse(cached.tokenizer.decode(answer, skip_special_tokens=False)).tool_calls
        assert len(calls) == 1
        turn = WEATHER + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
                "name": calls[0].name, "arguments": json.dumps(calls[0].arguments)}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'},
            {"role": "user", "content": "And in Lyon?"}]
        second = _request(cached, turn, 30, TOOLS)
        known = first.prompt_ids + answer
        shared = next((i for i, (a, b) in enumerate(zip(known, second.prompt_ids)) if a != b), len(known))
        assert shared >= len(first.prompt_ids) + len(answer) // 2  # the re-rendered call is the generated one
        before = cached.prefix_cache.stats()["reused"]
        got = asyncio.run(_collect(cached, second, [], "second"))
        assert cached.prefix_cache.stats()["reused"] - before == min(shared, len(second.prompt_ids) - 1)
        assert got == asyncio.run(_collect(plain, _request(plain, turn, 30, TOOLS), [], "plain"))
    finally:
        asyncio.run(cached.shutdown())
        asyncio.run(plain.shutdown())


def test_cpu_attention_in_bf16_is_as_close_to_fp32_as_sdpa():
    """The engine's CPU attention (eager for one or two rows in bf16, SDPA otherwise): a left-padded prefill of
    two rows, a 5-token step on its cache, and an unmasked causal pass give logits as close to an fp32 SDPA
    model's as bf16 SDPA's are, and the same greedy choices where the fp32 model is sure of them."""
    import torch
    from transformers import AutoModelForCausalLM

    from fcdistill.models import cache_keyword, resolve_model
    from fcdistill.serve.engines.cpu_attention import register
    from fcdistill.serve.engines.kv_buffer import GrowingCache

    name = register()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (2, 60), generator=gen)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[0, :20] = 0
    feed = torch.randint(100, 40000, (2, 5), generator=gen)
    out = {}
    with torch.inference_mode():
        for label, dtype, impl in (("fp32", torch.float32, "sdpa"), ("sdpa", torch.bfloat16, "sdpa"), ("ours", torch.bfloat16, name)):
            model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=dtype, attn_implementation=impl).eval()
            kw, cache = cache_keyword(model), GrowingCache()
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}).logits
            step = model(input_ids=feed, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1),
                         position_ids=pos[:, -1:] + torch.arange(1, 6), use_cache=True, **{kw: cache}).logits
            causal = model(input_ids=ids[1:, :30], use_cache=False).logits
            out[label] = [x.float() for x in (first[1], first[0, 20:], step.flatten(0, 1), causal[0])]
    for ref, sdpa, ours in zip(out["fp32"], out["sdpa"], out["ours"]):
        assert (ours - ref).abs().max() <= 1.25 * (sdpa - ref).abs().max() + 0.05
        top2 = ref.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 1.0  # where fp32's choice is clear, bf16 rounding cannot flip it
        assert sure.any() and torch.equal(ours.argmax(-1)[sure], ref.argmax(-1)[sure])


def test_prefix_cache_stays_within_its_memory_dropping_the_oldest():
    import torch

    from fcdistill.serve.engines.prefix_cache import PrefixCache

    kv = lambda n: [(torch.zeros(1, 3, n, 64), torch.zeros(1, 3, n, 64)) for _ in range(2)]  # noqa: E731
    one = 2 * 2 * 3 * 20 * 64 * 4  # bytes of a 20-token prompt
    cache = PrefixCache(max_bytes=2 * one + 10)
    for start in (100, 200, 300):
        cache.store(None, list(range(start, start + 20)), kv(20))
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= 2 * one + 10
    assert cache.lookup(None, list(range(100, 130)))[0] == 0  # the oldest went first
    n, layers = cache.lookup(None, list(range(300, 330)))
    assert n == 20 and layers[0][0].shape == (1, 3, 20, 64)
    assert cache.lookup("adapter", list(range(300, 330)))[0] == 0
    assert cache.lookup(None, list(range(300, 310)) + [0] * 10)[0] == 0  # 10 < MIN_REUSE shared tokens
    cache.store(None, list(range(300, 315)) + list(range(5)), kv(20))  # shares 15 with an entry: both kept
    assert cache.stats()["entries"] == 2
    cache.store(None, list(range(300, 320)) + [7], kv(21))  # extends an entry: replaces it, and being larger
    assert cache.stats()["entries"] == 1  # than the one it replaced, pushes the other out of the budget
    assert cache.lookup(None, list(range(300, 320)) + [7, 8])[0] == 21


JUMP_TOOLS = normalize_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_stock_price", "description": "A share's price.", "parameters": {
        "type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}}}])


def test_jump_forward_answers_exactly_as_step_by_step_in_fewer_passes():
    from fcdistill.serve.engines.hf import HFEngine

    asks = [(WEATHER, "required"), ([{"role": "user", "content": "Price of AAPL and the weather in Oslo?"}], "auto"),
            ([{"role": "user", "content": "Tell me a joke."}], "auto"), (STORY, "get_stock_price")]
    answers = {}
    for jump in (False, True):
        eng = HFEngine("smollm2-135m", jump_forward=jump, prefix_cache_mb=0, prompt_lookup=0)
        try:
            async def all_at_once():  # batched: rows jump by different amounts in the same passes
                reqs = [_request(eng, m, 48, JUMP_TOOLS, choice) for m, choice in asks]
                return await asyncio.gather(*[_collect(eng, r, [], str(i)) for i, r in enumerate(reqs)])
            alone = [asyncio.run(_collect(eng, _request(eng, m, 48, JUMP_TOOLS, c), [], "x")) for m, c in asks]
            answers[jump] = (alone, asyncio.run(all_at_once()), eng.stats()["jump_forward_tokens"])
        finally:
            asyncio.run(eng.shutdown())
    assert answers[True][0] == answers[False][0]  # token for token, one request at a time
    assert answers[True][1] == answers[False][1]  # and batched
    assert answers[False][2] == 0 and answers[True][2] > 10


def test_prompt_lookup_answers_exactly_as_step_by_step_with_drafts_accepted():
    """Greedy answers with prompt-lookup drafts equal plain decoding token for token (fp32), alone and in a
    batch whose rows keep different numbers of drafts, while many drafted tokens are kept; a sampled
    request gets no drafts."""
    from fcdistill.serve.engines.hf import HFEngine

    copy = [{"role": "user", "content": "Repeat exactly, word for word: the quick brown fox jumps over the lazy dog "
                                        "near the old lighthouse on the northern cliffs."}]
    asks = [(copy, None), ([{"role": "user", "content": "Weather in San Francisco, California in fahrenheit?"}],
                           "required"), (WEATHER, "auto"), (STORY, None)]
    answers = {}
    for lookup in (0, 5):
        eng = HFEngine("smollm2-135m", prompt_lookup=lookup, prompt_lookup_max_batch=4, prefix_cache_mb=0)
        try:
            def req(m, choice):
                return _request(eng, m, 40, JUMP_TOOLS if choice else None, choice or "auto")

            async def all_at_once():
                return await asyncio.gather(*[_collect(eng, req(m, c), [], str(i)) for i, (m, c) in enumerate(asks)])
            alone = [asyncio.run(_collect(eng, req(m, c), [], "x")) for m, c in asks]
            batched = asyncio.run(all_at_once())
            drafted = eng.stats()["prompt_lookup_drafted"]
            sampled = _request(eng, STORY, 24)
            sampled.sampling.temperature = 1.0
            asyncio.run(_collect(eng, sampled, [], "sampled"))
            answers[lookup] = (alone, batched, eng.stats())
            assert eng.stats()["prompt_lookup_drafted"] == drafted  # no drafts for a sampled request
        finally:
            asyncio.run(eng.shutdown())
    assert answers[5][0] == answers[0][0]  # token for token, one request at a time
    assert answers[5][1] == answers[0][1]  # and batched
    assert answers[0][2]["prompt_lookup_drafted"] == 0
    stats = answers[5][2]
    assert stats["prompt_lookup_accepted"] >= 20 and stats["prompt_lookup_accepted"] <= stats["prompt_lookup_drafted"]


def test_growing_kv_cache_decodes_as_transformers_cache_without_copying_the_batch():
    """The engine's KV cache writes each step into spare room (DynamicCache copies every layer's cache every
    step) and changes its batch in place: rows leaving move only the rows that fill a hole, rows joining go
    into spare rows, left padding comes and goes by moving the view. Its logits match DynamicCache's, with
    the same batch changes made by copying, through prefill, multi-token steps (jump-forward), rejected
    draft tokens cropped, a row leaving, its padding columns cut, a longer and a shorter row joining."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, DynamicCache

    from fcdistill.models import cache_keyword, resolve_model
    from fcdistill.serve.engines.kv_buffer import GrowingCache, compaction

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
    kw = cache_keyword(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (3, 40), generator=gen)
    joiners = [torch.randint(100, 40000, (1, n), generator=gen) for n in (50, 20)]  # longer, then shorter than the batch
    mask = torch.ones((3, 40), dtype=torch.long)
    mask[0, :12] = 0  # left padding on one row
    caches = {"dynamic": DynamicCache, "growing": GrowingCache}
    logits: dict[str, list] = {name: [] for name in caches}
    bufs: list = []

    def step(cache, feed, m, last):
        m = torch.cat([m, torch.ones_like(feed)], 1)
        pos = last + torch.arange(1, feed.shape[1] + 1)
        out = model(input_ids=feed, attention_mask=m, position_ids=pos, use_cache=True, **{kw: cache})
        return out, m, pos[:, -1:]

    with torch.inference_mode():
        for name, make in caches.items():
            cache = make()
            m = mask.clone()
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=prompt, attention_mask=m, position_ids=pos, use_cache=True, **{kw: cache})
            logits[name].append(out.logits[:, -1])
            last = pos[:, -1:]
            if name == "growing":
                bufs.append(cache.layers[0]._keys_buf)
            for width in (1, 1, 3, 1):  # a jump-forward step feeds several tokens at once
                feed = torch.randint(100, 40000, (m.shape[0], width), generator=torch.Generator().manual_seed(width))
                out, m, last = step(cache, feed, m, last)
                logits[name].append(out.logits[:, -1])
            # a step with drafts, the last two rejected: the cache forgets them (what _Rows does after a verify)
            feed = torch.randint(100, 40000, (m.shape[0], 4), generator=torch.Generator().manual_seed(7))
            out, m, last = step(cache, feed, m, last)
            logits[name].append(out.logits[:, 1])
            cache.crop(-2)
            m, last = m[:, :-2], last - 2
            # the first row leaves, then the columns only it used go (what _Rows.select does)
            order = compaction([1, 2])
            assert order == [2, 1]  # row 2 fills row 0's hole; row 1 stays where it is
            if name == "growing":
                for layer in cache.layers:
                    layer.keep_rows(order)
                    layer.drop_leading(12)
            else:
                cache.batch_select_indices(torch.tensor(order))
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[..., 12:, :], layer.values[..., 12:, :]
            m, last = m[order, 12:], last[order]
            # a row longer than the batch joins, then a shorter one (what _Rows.merge does)
            for ids in joiners:
                alone = make()
                out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=True, **{kw: alone})
                logits[name].append(out.logits[:, -1])
                width = max(m.shape[1], ids.shape[1])
                for mine, theirs in zip(cache.layers, alone.layers):
                    if name == "growing":
                        mine.merge_rows(theirs.keys, theirs.values)
                    else:
                        a, b = width - mine.keys.shape[-2], width - theirs.keys.shape[-2]
                        mine.keys = torch.cat([F.pad(mine.keys, (0, 0, a, 0)), F.pad(theirs.keys, (0, 0, b, 0))])
                        mine.values = torch.cat([F.pad(mine.values, (0, 0, a, 0)), F.pad(theirs.values, (0, 0, b, 0))])
                m = torch.cat([F.pad(m, (width - m.shape[1], 0)), F.pad(torch.ones_like(ids), (width - ids.shape[1], 0))])
                last = torch.cat([last, torch.tensor([[ids.shape[1] - 1]])])
            for _ in range(3):
                out, m, last = step(cache, torch.full((4, 1), 1234), m, last)
                logits[name].append(out.logits[:, -1])
                if name == "growing":
                    bufs.append(cache.layers[0]._keys_buf)
            if name == "growing":  # replaced from outside: the buffer is let go, and the next step makes a new one
                layer = cache.layers[0]
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
                assert layer._keys_buf is None
            out, m, last = step(cache, torch.full((4, 1), 99), m, last)
            logits[name].append(out.logits[:, -1])
    # the prefill's buffers took every later step and batch change in place: no new buffer, no copy
    assert len(bufs) == 4 and all(b is bufs[0] for b in bufs)
    assert cache.layers[0]._keys_buf is not None and cache.get_seq_length() == 50 + 4
    assert len(logits["dynamic"]) == len(logits["growing"]) == 12
    for a, b in zip(logits["dynamic"], logits["growing"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.timeout(300)
def test_the_model_is_loaded_and_run_on_the_engine_thread_alone(monkeypatch, tmp_path):
    """Every torch op of the engine runs on its scheduler thread, the load included (a second thread
    with its own OpenMP team slowed bf16 decoding 1.5x on a 2-core CPU: HFEngine._start_scheduler), and
    a load that fails there still fails the constructor, with its own error."""
    import threading

    import transformers

    from fcdistill.serve.engines.hf import HFEngine

    seen: list[tuple[str, int]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(("load", threading.get_ident()))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    eng = HFEngine("smollm2-135m")
    try:
        eng.model.register_forward_pre_hook(lambda module, args: seen.append(("forward", threading.get_ident())))
        ids, reason = asyncio.run(_collect(eng, _request(eng, WEATHER, 6), [], "weather"))
        assert len(ids) == 6 and reason == "length"
        assert {what for what, _ in seen} == {"load", "forward"}
        assert {ident for _, ident in seen} == {eng._thread.ident}
        assert eng._thread.ident != threading.get_ident()
    finally:
        asyncio.run(eng.shutdown())

    missing = tmp_path / "no-adapter-here"
    with pytest.raises((OSError, ValueError), match="no-adapter-here"):
        HFEngine("smollm2-135m", adapters={"broken": str(missing)}, merge_adapters="on")
