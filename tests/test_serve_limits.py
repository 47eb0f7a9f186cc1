"""The server's limits, back-pressure and supervision (serve/limits.py, app.py, engines/hf.py).

A real `fcd serve` (SmolLM2-135M, tight limits) is driven by the official openai client: a second
request while the only place is taken gets a 429 with Retry-After (and the client's own retry then
gets through), oversized bodies a 413, too many tools, a max_tokens over the cap or a prompt over
its limit a 400 naming the field, unknown paths one metric label. In process, over the real hf
engine: the scheduler thread is killed mid-request, the request fails fast with a 503, /health
turns unhealthy and the server is told to stop; with restart, a new scheduler serves again. Grammar
compiles of one new tool set run once however many requests bring it at the same time.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fcdistill.serve.limits import ServeLimits
from fcdistill.serve.protocol import APIError, ChatCompletionRequest

pytestmark = pytest.mark.slow
FUZZ_LOG: dict[str, int] = {}

ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def _tool(name: str, **props: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
        "type": "object", "properties": props or {"city": {"type": "string"}}, "required": list(props or ["city"])}}}


# -- a real server with tight limits ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fcdistill.serve.process import start_server

    log = tmp_path_factory.mktemp("limits") / "serve.log"
    with start_server(["--model", "smollm2-135m", "--max-concurrent-requests", "1", "--max-tools", "3",
                       "--max-body-bytes", "65536", "--max-tokens", "64", "--max-prompt-tokens", "600",
                       "--grammar-timeout", "10"], log,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as srv:
        yield srv.url


def _client(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=retries, timeout=120)


def test_a_request_over_the_in_flight_limit_gets_a_429_with_retry_after(server):
    held = threading.Event()
    release = threading.Event()

    def hold_the_only_place() -> None:
        stream = _client(server).chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=64,
                                                         temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 1:
                held.set()
            if release.is_set():  # the holder hangs up: the server gives the place back
                break
        stream.close()

    t = threading.Thread(target=hold_the_only_place)
    t.start()
    assert held.wait(120)
    with pytest.raises(openai.RateLimitError) as refused:
        _client(server).chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=4)
    assert refused.value.response.headers["retry-after"] == "1"
    body = refused.value.response.json()["error"]
    assert body["code"] == "rate_limit_exceeded" and "--max-concurrent-requests" in body["message"]
    # the official client waits Retry-After and tries again: it gets through once the place is free
    # (released 1.5 s in, whatever the machine's speed: the 64-token stream alone may outlast 5 retries)
    threading.Timer(1.5, release.set).start()
    answer = _client(server, retries=5).chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=4)
    assert answer.choices[0].message is not None
    t.join(120)
    # the place is given back when the stream ends: the next request is served
    assert _client(server).chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=4).usage.completion_tokens > 0


def test_per_request_limits_are_400s_naming_the_field(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[_tool(f"t{i}") for i in range(4)])
    assert tools.value.body["param"] == "tools" and "--max-tools" in tools.value.body["message"]
    with pytest.raises(openai.BadRequestError) as cap:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, max_completion_tokens=65)
    assert cap.value.body["param"] == "max_completion_tokens" and "at most 64" in cap.value.body["message"]
    with pytest.raises(openai.BadRequestError) as prompt:
        client.completions.create(model="smollm2-135m", prompt="word " * 700, max_tokens=4)
    assert prompt.value.body["code"] == "context_length_exceeded" and prompt.value.body["param"] == "prompt"
    # without max_tokens, the cap is the default budget
    free = client.completions.create(model="smollm2-135m", prompt="Count: one, two, three,", temperature=0)
    assert 0 < free.usage.completion_tokens <= 64


def test_a_body_over_the_limit_is_a_413_whether_declared_or_chunked(server):
    big = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}


def test_metric_labels_come_from_known_routes_only(server):
    for i in range(3):
        httpx.get(f"{server}/v1/made-up-{uuid.uuid4().hex}", timeout=10)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert "made-up" not in text
    assert 'fcd_requests_total{path="other",status="404"}' in text
    assert 'path="/v1/chat/completions"' in text


# -- fuzzing the live server ---------------------------------------------------------------------------
def _schemas():
    from hypothesis import strategies as st

    leaf = st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
                            {"type": "string", "enum": ["a", "b"]}, {}, {"type": "nonsense"}, {"enum": []}])
    return st.recursive(leaf, lambda inner: st.one_of(
        st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": list(props)[:1]}),
        inner.map(lambda it: {"type": "array", "items": it})), max_leaves=10)


def _deep(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


def _bodies():
    """Request bodies as clients get them wrong (and right): every JSON shape, wrong types, huge
    numbers, unicode, nested and degenerate schemas, too many tools, no messages, unknown roles."""
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=30))
    tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "function", "tool"]), "function": st.fixed_dictionaries(
        {"name": st.text(max_size=12), "description": st.text(max_size=30),
         "parameters": st.one_of(_schemas(), scalar, st.sampled_from([_deep(12), _deep(40)]))})})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard", ""]),
                                     "content": st.one_of(st.text(max_size=80), st.none(), st.integers(),
                                                          st.lists(st.dictionaries(st.text(max_size=5), scalar, max_size=2), max_size=2))})
    chat = st.fixed_dictionaries(
        {"model": st.sampled_from(["smollm2-135m", "smollm2-135m", "nope", ""]), "messages": st.lists(message, max_size=3)},
        optional={"tools": st.one_of(st.lists(tool, max_size=3), st.just([_tool(f"t{i}") for i in range(2000)])),
                  "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "bogus", None]),
                                           st.text(max_size=8).map(lambda n: {"type": "function", "function": {"name": n}})),
                  "max_tokens": st.one_of(st.integers(-5, 80), st.integers(10**6, 10**20), scalar),
                  "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), scalar), "top_p": scalar,
                  "n": st.integers(-1, 10), "stream": st.one_of(st.booleans(), scalar),
                  "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5), scalar),
                  "response_format": st.one_of(st.just({"type": "json_object"}), st.just({"type": "weird"}),
                                               _schemas().map(lambda sch: {"type": "json_schema",
                                                                           "json_schema": {"name": "x", "schema": sch}})),
                  "seed": st.integers(-2**70, 2**70), "parallel_tool_calls": scalar})
    completion = st.fixed_dictionaries({"model": st.sampled_from(["smollm2-135m", "nope"]),
                                        "prompt": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=20), scalar)},
                                       optional={"max_tokens": st.one_of(st.integers(-3, 40), scalar), "echo": scalar,
                                                 "stream": st.booleans(), "n": st.integers(-1, 4)})
    # well-formed requests with odd tools: these reach grammar compiles and generation
    named = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z_]{1,10}", fullmatch=True), "description": st.text(max_size=30),
         "parameters": _schemas().map(lambda sch: sch if sch.get("type") == "object" else
                                      {"type": "object", "properties": {"v": sch}, "required": ["v"]})})})
    good = st.fixed_dictionaries(
        {"model": st.just("smollm2-135m"), "max_tokens": st.integers(1, 12), "temperature": st.just(0),
         "messages": st.text(min_size=1, max_size=80).map(lambda t: [{"role": "user", "content": t}])},
        optional={"tools": st.lists(named, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]),
                  "tool_choice": st.sampled_from(["auto", "none", "required"]), "stream": st.booleans(),
                  "n": st.integers(1, 2)})
    as_json = lambda body: json.dumps(body).encode()  # noqa: E731
    return st.one_of(
        st.tuples(st.just("/v1/chat/completions"), good.map(as_json)),
        st.tuples(st.just("/v1/chat/completions"), chat.map(as_json)),
        st.tuples(st.just("/v1/completions"), completion.map(as_json)),
        st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
                  st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), scalar.map(as_json))))


def test_fuzzed_requests_get_a_2xx_or_an_openai_4xx_never_a_5xx_or_a_hang(server):
    from hypothesis import HealthCheck, given, settings

    seen: dict[str, int] = {}

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_bodies())
    def one(request: tuple[str, bytes]) -> None:
        path, body = request
        r = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
        seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:500], body[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], r.text
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
            for ev in events[:-1]:
                assert "error" not in json.loads(ev), ev
            last = events[-1]
            assert last == "[DONE]" or json.loads(last)["error"]["type"] != "server_error", last
        else:
            assert r.json()["choices"], r.text

    one()
    FUZZ_LOG.update(seen)
    print(f"fuzz: {sum(seen.values())} requests, by status {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 100 and not any(code.startswith("5") for code in seen)
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}


# -- supervision, in process over the real hf engine --------------------------------------------------
def _kill_scheduler_on_next_request(engine) -> None:
    """The scheduler thread takes the next request and dies (SystemExit ends a thread silently)."""
    def boom(*_a, **_k):
        raise SystemExit("killed by the test")
    engine._take = boom


@pytest.mark.timeout(300)  # a dead scheduler that nobody notices would hang the request: fail instead
@pytest.mark.parametrize("restart", [False, True])
def test_a_dead_scheduler_fails_requests_fast_and_turns_health_unhealthy(restart):
    from fcdistill.serve.app import create_app
    from fcdistill.serve.engines.hf import HFEngine

    engine = HFEngine("smollm2-135m", restart_on_failure=restart)
    told: list[str] = []
    with TestClient(create_app(engine, on_engine_failure=told.append)) as client:
        body = {"model": "smollm2-135m", "messages": ASK, "max_tokens": 8, "temperature": 0}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        _kill_scheduler_on_next_request(engine)
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert "killed by the test" in r.json()["error"]["message"] and time.monotonic() - started < 10
        del engine._take  # the class's own again
        if not restart:
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
            assert client.post("/v1/chat/completions", json=body).status_code == 503
            deadline = time.monotonic() + 5
            while not told and time.monotonic() < deadline:
                time.sleep(0.05)
            assert told and "scheduler died" in told[0]
        else:
            assert client.get("/health").json() == {"status": "ok"}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert not told


# -- admission and grammar compiles, without HTTP -----------------------------------------------------
class _Engine:
    model_name, adapters, fc_token, context_length, failure = "m", {}, "<tool_call>", 2048, None

    def __init__(self, tokenizer):
        self.tokenizer, self.logits_size = tokenizer, len(tokenizer)


def test_admission_counts_places_and_gives_them_back_once(smollm2_tokenizer):
    from fcdistill.serve.serving import OpenAIServing

    serving = OpenAIServing(_Engine(smollm2_tokenizer), limits=ServeLimits(max_concurrent_requests=2, retry_after_s=3))
    first, second = serving.admit(), serving.admit()
    with pytest.raises(APIError) as full:
        serving.admit()
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "3"}
    first()
    first()  # twice is once
    assert serving.in_flight == 1
    third = serving.admit()
    second(), third()
    assert serving.in_flight == 0


def test_one_compile_per_new_tool_set_under_concurrent_requests(smollm2_tokenizer):
    from fcdistill.grammars import compile_grammar, grammar_cache_info
    from fcdistill.serve.serving import OpenAIServing
    from fcdistill.tools import normalize_tools

    serving = OpenAIServing(_Engine(smollm2_tokenizer))
    tools = normalize_tools([_tool(f"fresh_{uuid.uuid4().hex[:8]}", city={"type": "string"},
                                   days={"type": "integer"}, unit={"type": "string", "enum": ["c", "f"]})])
    before = grammar_cache_info()
    results = []
    threads = [threading.Thread(target=lambda: results.append(compile_grammar(serving.vocab, tools, "auto")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = grammar_cache_info()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 3
    assert len({id(g) for g, _ in results}) == 1 and sorted(hit for _, hit in results) == [False, True, True, True]


def test_a_grammar_over_the_compile_timeout_is_a_503_to_retry_and_is_cached_for_later(smollm2_tokenizer):
    from fcdistill.serve.serving import OpenAIServing

    serving = OpenAIServing(_Engine(smollm2_tokenizer), limits=ServeLimits(grammar_timeout_s=0.001))
    tool = _tool(f"slow_{uuid.uuid4().hex[:8]}", **{f"field_{i}": {"type": "string"} for i in range(12)})
    req = ChatCompletionRequest(model="m", messages=ASK, tools=[tool], max_tokens=200)
    with pytest.raises(APIError) as slow:
        asyncio.run(serving.prepare_chat(req))
    assert slow.value.status == 503 and slow.value.param == "tools" and slow.value.code == "grammar_compiling"
    assert slow.value.headers == {"Retry-After": "1"} and "still compiling" in slow.value.message
    patient = OpenAIServing(_Engine(smollm2_tokenizer))
    plan = asyncio.run(patient.prepare_chat(req))  # the compile finished in its thread, or finishes now
    assert plan.gens and plan.gens[0].constraint is not None


def test_requests_waiting_for_a_running_compile_hold_no_worker_thread(smollm2_tokenizer, monkeypatch):
    """Retries of a slow compile (the 503's point) wait for it on the event loop: with a 2-thread
    executor, one thread compiling and six requests waiting, prompt rendering still gets a thread."""
    from concurrent.futures import ThreadPoolExecutor

    from fcdistill.grammars import constraint
    from fcdistill.serve.serving import OpenAIServing
    from fcdistill.tools import normalize_tools

    serving = OpenAIServing(_Engine(smollm2_tokenizer), limits=ServeLimits(grammar_timeout_s=120))
    tools = normalize_tools([_tool(f"held_{uuid.uuid4().hex[:8]}", city={"type": "string"})])
    opened = threading.Event()
    real_build = constraint._build
    monkeypatch.setattr(constraint, "_build", lambda *a: opened.wait(60) and real_build(*a))

    async def main() -> list:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        first = asyncio.create_task(serving.grammar_for(tools, "auto", True, None, 200))
        while constraint.compile_pending(serving.vocab, tools, "auto") is None:  # the compile has begun
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(serving.grammar_for(tools, "auto", True, None, 200)) for _ in range(6)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 10) == 42  # a thread is free
        opened.set()
        return await asyncio.gather(first, *waiting)

    grammars = asyncio.run(main())
    assert len({id(g) for g in grammars}) == 1


def test_the_grammar_cache_is_bounded_by_memory(smollm2_tokenizer):
    """--grammar-cache-mb: least recently used grammars leave once the cache holds more than its limit."""
    from fcdistill.grammars import compile_grammar, grammar_cache_info, set_grammar_cache_limit
    from fcdistill.grammars.constraint import DEFAULT_CACHE_MB
    from fcdistill.serve.serving import OpenAIServing
    from fcdistill.tools import normalize_tools

    vocab = OpenAIServing(_Engine(smollm2_tokenizer)).vocab
    fresh = [normalize_tools([_tool(f"bounded_{uuid.uuid4().hex[:8]}", city={"type": "string"}, n={"type": "integer"})])
             for _ in range(6)]
    try:
        set_grammar_cache_limit(1.5)
        for tools in fresh:
            compile_grammar(vocab, tools, "required")
            info = grammar_cache_info()
            assert info["bytes"] <= info["limit_bytes"] or info["size"] == 1, info
        assert 1 <= grammar_cache_info()["size"] < 6
        assert compile_grammar(vocab, fresh[-1], "required")[1] is True  # the newest stayed
        assert compile_grammar(vocab, fresh[0], "required")[1] is False  # the oldest was dropped
    finally:
        set_grammar_cache_limit(DEFAULT_CACHE_MB)


def test_malloc_is_tuned_for_a_flat_rss_unless_the_user_chose(monkeypatch):
    """glibc: the settings apply in process and are exported for child processes (not when an engine tunes
    a process it was made in); a user's own win."""
    import ctypes.util

    from fcdistill.serve.memory import tune_malloc

    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setenv(name, "0")  # recorded, so what tune_malloc exports is taken back after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    in_process = tune_malloc(export=False)  # an engine inside someone else's process: nothing exported
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_ARENA_MAX" not in in_process
    applied = tune_malloc()
    if not ctypes.util.find_library("c") or not applied:
        pytest.skip("not glibc")
    assert applied == {"MALLOC_MMAP_THRESHOLD_": 4 * 2**20, "MALLOC_TRIM_THRESHOLD_": 64 * 2**20}
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(4 * 2**20) and os.environ["MALLOC_ARENA_MAX"] == "4"


MALLINFO_PROBE = """
import ctypes, json, sys
from fcdistill.serve.memory import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = tune_malloc() if sys.argv[1] == "tuned" else {}
before = libc.mallinfo2()
block = libc.malloc(2 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": during.hblkhd - before.hblkhd,
                  "freed_into_heap": after.fordblks - before.fordblks, "free_in_heap": after.fordblks,
                  "heap_trimmed": after.arena < during.arena}))
"""


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc 2.33 and later
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)")
def test_tuned_malloc_serves_decode_sized_blocks_from_the_heap_and_keeps_them_there_when_freed():
    """Decoding frees and reallocates the same blocks every step: with glibc's defaults a 2 MiB block is
    mapped for itself and unmapped on free (its pages faulted in again next time); tuned, it comes from
    the heap and stays there, free, for the next step."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def probe(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], capture_output=True, text=True, check=True,
                             env=env)
        return json.loads(out.stdout)

    default, tuned = probe("default"), probe("tuned")
    assert default["mmapped"] >= 2 << 20 and default["freed_into_heap"] < 1 << 20
    assert tuned["applied"]["MALLOC_MMAP_THRESHOLD_"] > 2 << 20
    assert tuned["mmapped"] == 0 and tuned["free_in_heap"] >= 2 << 20 and not tuned["heap_trimmed"]
