"""The teacher client: any OpenAI-compatible endpoint, async, bounded, retried, cached, counted.

Why each part exists:
- a semaphore bounds requests in flight (the synthesizer we replace fired them all at once);
- tenacity retries 408/409/429/5xx, timeouts and dropped connections with jittered exponential
  backoff, honouring `Retry-After`, while other 4xx fail at once (retrying a bad request only costs);
- every answered request is committed to the SQLite cache, keyed by the request body (model,
  messages, tools, sampling settings, sample index; not the URL or key), so a killed run replays
  what it already paid for;
- token counts are kept apart for paid and cached answers, with an optional cost estimate.

`chat` is the transport; `ask_calls` (function calls, in tools or prompt mode) and `ask_json`
(structured replies as text or a forced schema-tool call) interpret replies and never raise on
malformed output: they return it with a reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from fcdistill.chat_format import parse_python_calls
from fcdistill.teacher.cache import ResponseCache, request_key
from fcdistill.teacher.config import TeacherConfig
from fcdistill.tools import ToolCall, ToolSpec, safe_tool_names

T = TypeVar("T")
R = TypeVar("R")
_RETRY_STATUS = {408, 409, 429}


@dataclass
class ChatReply:
    """One assistant message (or the reason there is none). tool_calls keep raw argument strings."""

    content: str | None = None
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    forced_close: str | None = None  # fcd serve: "budget" | "loop" when its constraint had to close the answer
    cached: bool = False
    error: str | None = None  # transport failure after all retries; never cached
    attempts: int = 0


@dataclass
class CallAnswer:
    """Function calls the teacher made (or its text), with why they could not be read if so."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None
    error: str | None = None  # malformed calls
    truncated: bool = False  # the reply hit max_tokens (finish_reason "length") before its calls were whole
    note: str | None = None  # prompt mode: why the text was not read as calls
    transport_error: str | None = None
    cached: bool = False


@dataclass
class JsonAnswer:
    value: Any = None
    error: str | None = None
    transport_error: str | None = None
    raw: str | None = None


@dataclass
class ClientStats:
    requests: int = 0  # chat() calls
    http_attempts: int = 0
    answered: int = 0  # from the endpoint
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # paid (answered by the endpoint in this run)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # replayed from the cache: not paid again
    cached_completion_tokens: int = 0
    own_time_s: float = 0.0  # time inside chat() that is neither the HTTP call, backoff nor queueing
    own_samples: list[float] = field(default_factory=list)
    max_in_flight: int = 0

    def as_dict(self, cfg: TeacherConfig) -> dict[str, Any]:
        own = sorted(self.own_samples)
        return {
            "requests": self.requests, "http_attempts": self.http_attempts, "answered": self.answered,
            "cache_hits": self.cache_hits, "retries": self.retries, "failures": self.failures,
            "status_counts": dict(sorted(self.status_counts.items())),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            "cost_usd": cfg.cost(self.prompt_tokens, self.completion_tokens),
            "saved_by_cache_usd": cfg.cost(self.cached_prompt_tokens, self.cached_completion_tokens),
            "own_ms_mean": 1000 * self.own_time_s / max(1, self.requests),
            "own_ms_p99": 1000 * own[int(0.99 * (len(own) - 1))] if own else None,
            "max_in_flight": self.max_in_flight,
        }


class _Retryable(Exception):
    """Wraps a retryable failure so tenacity can read its Retry-After."""

    def __init__(self, reason: str, retry_after: float | None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: fall back to our own backoff


def strip_fences(text: str) -> str:
    """Text without one surrounding markdown code fence (```json ... ```), which chat models add."""
    s = text.strip()
    m = re.fullmatch(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```", s, flags=re.S)
    return m.group(1).strip() if m else s


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint that cannot be used at all: nothing answers, or it refuses the key."""


def check_endpoint(endpoint: str, api_key: str | None, timeout_s: float = 10.0,
                   key_hint: str = "--api-key") -> list[str] | None:
    """Fail fast, naming the URL, when nothing answers at `endpoint` (a base URL ending in /v1) or it
    refuses the key; returns the served model ids when the endpoint lists them. `fcd eval run`,
    `fcd label` and `fcd synth` call it before their first question."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{endpoint}/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EndpointError(f"endpoint {endpoint} is unreachable: {type(exc).__name__}: "
                            f"{str(exc) or 'no answer'}"[:300]) from None
    if resp.status_code in (401, 403):
        raise EndpointError(f"endpoint {endpoint} rejected the API key (HTTP {resp.status_code}); check {key_hint}")
    try:
        return [m["id"] for m in resp.json()["data"]] if resp.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        return None


def check_teacher(cfg: TeacherConfig) -> None:
    """`check_endpoint` for the teacher stages: a TeacherError (exit 2) before any work, and a warning
    when the endpoint lists its models and the teacher is not among them."""
    import sys

    from fcdistill.teacher.config import TeacherError

    try:
        served = check_endpoint(cfg.base_url, cfg.api_key(), key_hint=f"--api-key-env (now {cfg.api_key_env})")
    except EndpointError as exc:
        raise TeacherError(f"teacher {exc}") from None
    if served and cfg.model not in served:
        print(f"warning: {cfg.base_url} lists {', '.join(served[:8])}, not {cfg.model!r}", file=sys.stderr)


class TeacherClient:
    """Async client for one teacher endpoint; use as `async with TeacherClient(cfg) as t:`."""

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache | None = None, measure: bool = False):
        import openai
        import tenacity  # noqa: F401  (imported here so the first request does not pay for it)

        self.cfg = cfg
        self.cache = cache if cache is not None else (ResponseCache(cfg.cache) if cfg.cache else None)
        self.stats = ClientStats()
        self._measure = measure
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._in_flight = 0
        try:
            import httpx2 as httpx_mod  # the transport openai>=3 is built on
        except ImportError:  # older openai releases use httpx
            import httpx as httpx_mod
        limits = httpx_mod.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=cfg.api_key(), max_retries=0, timeout=cfg.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=cfg.timeout_s))
        self._openai = openai

    async def __aenter__(self) -> "TeacherClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.close()

    # -- transport --------------------------------------------------------------------------------
    def _body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any,
              sample: int | None, max_tokens: int | None, temperature: float | None,
              response_format: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "temperature": self.cfg.temperature if temperature is None else temperature,
                                "max_tokens": max_tokens or self.cfg.max_tokens}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if response_format is not None:
            body["response_format"] = response_format
        seed = (self.cfg.seed or 0) + sample if sample is not None else self.cfg.seed
        if seed is not None:
            body["seed"] = seed
        return body

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   tool_choice: Any = None, *, sample: int | None = None, max_tokens: int | None = None,
                   temperature: float | None = None, response_format: dict[str, Any] | None = None) -> ChatReply:
        """One completion: from the cache, else from the endpoint (bounded, retried), then cached."""
        t0 = time.perf_counter()
        st = self.stats
        st.requests += 1
        body = self._body(messages, tools, tool_choice, sample, max_tokens, temperature, response_format)
        key = request_key({**body, "sample": sample, "extra_body": self.cfg.extra_body})
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                st.cache_hits += 1
                reply = _reply_from_dict(hit, cached=True)
                st.cached_prompt_tokens += reply.usage.get("prompt_tokens", 0)
                st.cached_completion_tokens += reply.usage.get("completion_tokens", 0)
                self._own(time.perf_counter() - t0)
                return reply
        waited = 0.0
        t_wait = time.perf_counter()
        async with self._sem:
            waited += time.perf_counter() - t_wait
            self._in_flight += 1
            st.max_in_flight = max(st.max_in_flight, self._in_flight)
            try:
                reply, outside = await self._send(body)
            finally:
                self._in_flight -= 1
        if reply.error is None:
            st.answered += 1
            st.prompt_tokens += reply.usage.get("prompt_tokens", 0)
            st.completion_tokens += reply.usage.get("completion_tokens", 0)
            if self.cache is not None:
                self.cache.put(key, _reply_to_dict(reply))
        else:
            st.failures += 1
        self._own(time.perf_counter() - t0 - waited - outside)
        return reply

    def _own(self, seconds: float) -> None:
        self.stats.own_time_s += seconds
        if self._measure:
            self.stats.own_samples.append(seconds)

    async def _send(self, body: dict[str, Any]) -> tuple[ChatReply, float]:
        """POST with retries; returns the reply and the seconds spent in HTTP calls and backoff."""
        from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt

        cfg = self.cfg  # (tenacity is imported once in __init__; this import is a dict lookup)
        outside = 0.0
        attempts = 0

        def wait(state: Any) -> float:
            exc = state.outcome.exception() if state.outcome else None
            ra = exc.retry_after if isinstance(exc, _Retryable) else None
            if ra is not None:
                return min(max(ra, 0.0), cfg.backoff_max_s)
            base = min(cfg.backoff_max_s, cfg.backoff_initial_s * (2 ** (state.attempt_number - 1)))
            return base * (0.5 + random.random() / 2)  # jitter: concurrent clients do not retry in step

        async def before_sleep(state: Any) -> None:
            nonlocal outside
            self.stats.retries += 1
            outside += state.upcoming_sleep

        retrying = AsyncRetrying(stop=stop_after_attempt(cfg.max_attempts), wait=wait, reraise=False,
                                 retry=retry_if_exception_type(_Retryable), before_sleep=before_sleep)
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    self.stats.http_attempts += 1
                    t = time.perf_counter()
                    try:
                        # The SDK's generic POST: its auth, headers and typed errors, without the
                        # per-call TypedDict transform and response models of `chat.completions.create`
                        # (measured: ~2-4 ms a request on this machine; this path adds ~1 ms over bare HTTP).
                        data = await self._client.post("/chat/completions", cast_to=dict,
                                                       body={**cfg.extra_body, **body})
                    except self._openai.APIStatusError as exc:
                        outside += time.perf_counter() - t
                        code = exc.status_code
                        self._count(str(code))
                        reason = f"HTTP {code}: {_error_text(exc)}"
                        if code in _RETRY_STATUS or code >= 500:
                            raise _Retryable(reason, _retry_after(exc.response.headers)) from None
                        if code in (401, 403) and cfg.api_key_env:
                            reason += f" (is ${cfg.api_key_env} set?)"
                        return ChatReply(error=reason, attempts=attempts), outside
                    except self._openai.APITimeoutError:
                        outside += time.perf_counter() - t
                        self._count("timeout")
                        raise _Retryable(f"timed out after {cfg.timeout_s:g}s", None) from None
                    except self._openai.APIConnectionError as exc:
                        outside += time.perf_counter() - t
                        self._count("connection")
                        raise _Retryable(f"connection failed: {exc}", None) from None
                    outside += time.perf_counter() - t
                    self._count("200")
                    reply = _reply_from_json(data)
                    reply.attempts = attempts
                    return reply, outside
        except RetryError as exc:
            last = exc.last_attempt.exception()
            reason = last.reason if isinstance(last, _Retryable) else str(last)
            return ChatReply(error=f"gave up after {attempts} attempts: {reason}", attempts=attempts), outside
        return ChatReply(error="no attempt made", attempts=attempts), outside  # pragma: no cover

    def _count(self, status: str) -> None:
        self.stats.status_counts[status] = self.stats.status_counts.get(status, 0) + 1

    # -- interpretation ---------------------------------------------------------------------------
    async def ask_calls(self, messages: list[dict[str, Any]], tools: list[ToolSpec], *, sample: int | None = None,
                        tool_choice: Any = "auto", record_id: str = "item", language: str = "python",
                        system: str | None = None) -> CallAnswer:
        """The teacher's answer to a question with tools: calls (names restored) or text."""
        msgs = [dict(m) for m in messages]
        if system:
            msgs = _with_system(msgs, system)
        if self.cfg.mode == "prompt":
            from fcdistill.bfcl_env import bfcl_import

            add_system = bfcl_import("bfcl_eval.model_handler.utils", "system_prompt_pre_processing_chat_model")
            msgs = add_system(msgs, [t.model_dump() for t in tools], record_id.replace(":", "_"))
            reply = await self.chat(msgs, sample=sample)
            if reply.error:
                return CallAnswer(transport_error=reply.error)
            text = reply.content or ""
            parsed = parse_python_calls(text, language) if text.strip() else None
            if parsed is None or parsed.error or not parsed.tool_calls:
                note = parsed.error if parsed is not None else "empty reply"
                if reply.finish_reason == "length" and text.lstrip().startswith("["):
                    return CallAnswer(content=text, cached=reply.cached, truncated=True,
                                      error="calls cut off at max_tokens (finish_reason length)")
                return CallAnswer(content=text, note=note, cached=reply.cached)
            return CallAnswer(calls=parsed.tool_calls, cached=reply.cached)
        names = safe_tool_names(tools)
        back = {v: k for k, v in names.items()}
        api_tools = [{"type": "function", "function": {"name": names[t.name], "description": t.description,
                                                       "parameters": t.parameters}} for t in tools]
        choice = tool_choice
        if isinstance(tool_choice, dict) and tool_choice.get("function", {}).get("name") in names:
            choice = {"type": "function", "function": {"name": names[tool_choice["function"]["name"]]}}
        reply = await self.chat(msgs, api_tools, choice, sample=sample)
        if reply.error:
            return CallAnswer(transport_error=reply.error)
        if reply.finish_reason == "length" and not reply.tool_calls:  # a cut-off answer is no target
            return CallAnswer(content=reply.content, cached=reply.cached, truncated=True,
                              error="reply cut off at max_tokens (finish_reason length)")
        calls: list[ToolCall] = []
        for i, tc in enumerate(reply.tool_calls):
            name = back.get(tc["name"], tc["name"])
            raw = tc.get("arguments") or "{}"
            try:
                args = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError as exc:
                return CallAnswer(content=reply.content, cached=reply.cached,
                                  error=f"call {i} ({name}): arguments are not JSON ({exc.msg})")
            if not isinstance(args, dict):
                return CallAnswer(content=reply.content, cached=reply.cached,
                                  error=f"call {i} ({name}): arguments are not a JSON object")
            try:
                calls.append(ToolCall(name=name, arguments=args))
            except ValueError:
                return CallAnswer(content=reply.content, cached=reply.cached, error=f"call {i} has no function name")
        return CallAnswer(calls=calls, content=reply.content, cached=reply.cached)

    async def ask_json(self, messages: list[dict[str, Any]], schema: dict[str, Any], tool_name: str, *,
                       sample: int | None = None, max_tokens: int | None = None,
                       temperature: float | None = None) -> JsonAnswer:
        """A JSON value: parsed from the message text (free, or constrained by response_format's
        json_schema), or from the arguments of a forced call to a schema tool."""
        if self.cfg.structured == "tool":
            tool = {"type": "function", "function": {"name": tool_name, "description": "Submit the answer.",
                                                     "parameters": schema}}
            reply = await self.chat(messages, [tool], {"type": "function", "function": {"name": tool_name}},
                                    sample=sample, max_tokens=max_tokens, temperature=temperature)
            if reply.error:
                return JsonAnswer(transport_error=reply.error)
            call = next((c for c in reply.tool_calls if c["name"] == tool_name), None)
            if call is None:
                cut = " (cut off at max_tokens)" if reply.finish_reason == "length" else ""
                return JsonAnswer(error=f"no {tool_name} call in the reply{cut}", raw=reply.content)
            return _json_value(call.get("arguments") or "", reply.finish_reason)
        fmt = {"type": "json_schema", "json_schema": {"name": tool_name, "schema": schema}} \
            if self.cfg.structured == "schema" else None
        reply = await self.chat(messages, sample=sample, max_tokens=max_tokens, temperature=temperature,
                                response_format=fmt)
        if reply.error:
            return JsonAnswer(transport_error=reply.error)
        return _json_value(reply.content or "", reply.finish_reason)

    # -- progress -----------------------------------------------------------------------------------
    def progress(self, total: int, desc: str) -> Any:
        """A tqdm bar (stderr) that shows tokens and cache hits; disabled when cfg.progress is off."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.cfg.progress, unit="item", dynamic_ncols=True,
                    leave=False)

    def postfix(self) -> dict[str, Any]:
        s = self.stats
        return {"tok": s.prompt_tokens + s.completion_tokens, "cached": s.cache_hits, "retries": s.retries,
                "fail": s.failures}


def _with_system(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0].get('content') or ''}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _json_value(text: str, finish_reason: str | None = None) -> JsonAnswer:
    """Strict JSON (one surrounding code fence allowed): anything else is an error with its reason."""
    try:
        return JsonAnswer(value=json.loads(strip_fences(text)), raw=text)
    except json.JSONDecodeError as exc:
        snippet = text.strip().replace("\n", " ")[:60]
        cut = "cut off at max_tokens, " if finish_reason == "length" else ""
        return JsonAnswer(error=f"not JSON ({cut}{exc.msg} at char {exc.pos}): {snippet!r}", raw=text)


def _error_text(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:200]
    return str(getattr(exc, "message", exc))[:200]


def _reply_from_json(data: Any) -> ChatReply:
    """The first choice of a chat.completion JSON body; an odd body is an error reply, never a crash."""
    try:
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        calls = []
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                args = fn.get("arguments")
                calls.append({"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)})
        usage = data.get("usage") or {}
        content = msg.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ChatReply(content=content if isinstance(content, str) else None, tool_calls=calls,
                         finish_reason=choice.get("finish_reason"), forced_close=choice.get("forced_close"),
                         usage={"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                                "completion_tokens": int(usage.get("completion_tokens") or 0)})
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return ChatReply(error=f"the endpoint returned no usable choice: {str(data)[:200]}")


def _reply_to_dict(r: ChatReply) -> dict[str, Any]:
    return {"content": r.content, "tool_calls": r.tool_calls, "finish_reason": r.finish_reason, "usage": r.usage,
            "forced_close": r.forced_close}


def _reply_from_dict(d: dict[str, Any], cached: bool) -> ChatReply:
    return ChatReply(content=d.get("content"), tool_calls=list(d.get("tool_calls") or []),
                     finish_reason=d.get("finish_reason"), usage=dict(d.get("usage") or {}),
                     forced_close=d.get("forced_close"), cached=cached)


async def run_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int,
                      on_result: Callable[[T, R], None]) -> None:
    """Run fn over items with at most `limit` alive at once; on_result(item, result) as each finishes.

    Items are pulled lazily, so a million-item run holds `limit` tasks, not a million.
    """
    it = iter(items)
    pending: dict[asyncio.Task[R], T] = {}

    def fill() -> None:
        while len(pending) < limit:
            try:
                item = next(it)
            except StopIteration:
                return
            pending[asyncio.ensure_future(fn(item))] = item

    fill()
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            item = pending.pop(task)
            on_result(item, task.result())
        fill()
