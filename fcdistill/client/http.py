"""The client: any OpenAI-compatible endpoint, async, bounded, retried, cached, counted.

Why each part exists:
- a semaphore bounds requests in flight: the one concurrency limit of a stage; `run_bounded` and
  `gather` only keep a large run from holding one task per item, and use the same number;
- tenacity retries 408/409/429/5xx, timeouts and dropped connections with jittered exponential
  backoff, honouring `Retry-After`, while other 4xx fail at once (retrying a bad request only costs);
- every reply carries the HTTP status as an integer (from the openai exception, never parsed back
  out of the error text), so callers decide on codes, not on strings;
- every answered request is committed to the SQLite cache, keyed by the request body (model,
  messages, tools, sampling settings, sample index; not the URL or key), so a killed run replays
  what it already paid for;
- token counts are kept apart for paid and cached answers, with an optional cost estimate.

Heavy imports (openai, tenacity, tqdm) happen when a client is made, not when this module loads.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from fcdistill.client.cache import ResponseCache, request_key
from fcdistill.client.config import ClientConfig

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
    status: int | None = None  # HTTP status of the last attempt; None: no HTTP answer (timeout, connection)
    attempts: int = 0


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

    def as_dict(self, cfg: ClientConfig) -> dict[str, Any]:
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
    """Wraps a retryable failure so tenacity can read its Retry-After (and the caller its status)."""

    def __init__(self, reason: str, retry_after: float | None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: fall back to our own backoff


class Client:
    """Async client for one endpoint; use as `async with Client(cfg) as c:`."""

    def __init__(self, cfg: ClientConfig, cache: ResponseCache | None = None, measure: bool = False):
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
            base_url=cfg.base_url, api_key=cfg.key(), max_retries=0, timeout=cfg.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=cfg.timeout_s))
        self._openai = openai

    async def __aenter__(self) -> "Client":
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
                            raise _Retryable(reason, _retry_after(exc.response.headers), code) from None
                        if code in (401, 403) and cfg.api_key_env and not cfg.api_key:
                            reason += f" (is ${cfg.api_key_env} set?)"
                        return ChatReply(error=reason, status=code, attempts=attempts), outside
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
                    reply.status = 200
                    reply.attempts = attempts
                    return reply, outside
        except RetryError as exc:
            last = exc.last_attempt.exception()
            reason = last.reason if isinstance(last, _Retryable) else str(last)
            status = last.status if isinstance(last, _Retryable) else None
            return ChatReply(error=f"gave up after {attempts} attempts: {reason}", status=status,
                             attempts=attempts), outside
        return ChatReply(error="no attempt made", attempts=attempts), outside  # pragma: no cover

    def _count(self, status: str) -> None:
        self.stats.status_counts[status] = self.stats.status_counts.get(status, 0) + 1

    # -- many requests ------------------------------------------------------------------------------
    def progress(self, total: int, desc: str) -> Any:
        """A progress bar (stderr), disabled when cfg.progress is off; `postfix()` is what it shows."""
        return progress_bar(total, desc, self.cfg.progress)

    def postfix(self) -> dict[str, Any]:
        s = self.stats
        return {"tok": s.prompt_tokens + s.completion_tokens, "cached": s.cache_hits, "retries": s.retries,
                "fail": s.failures}

    async def each(self, items: Sequence[T], fn: Callable[[T], Awaitable[R]], on_result: Callable[[T, R], None],
                   desc: str) -> None:
        """fn over items behind a progress bar, on_result(item, result) as each finishes. Tasks alive are
        bounded by the client's concurrency: the one limit, the same its requests are held to."""
        bar = self.progress(len(items), desc)

        def done(item: T, result: R) -> None:
            bar.update(1)
            bar.set_postfix(self.postfix(), refresh=False)
            on_result(item, result)

        try:
            await run_bounded(items, fn, self.cfg.concurrency, done)
        finally:
            bar.close()

    async def gather(self, items: Sequence[T], fn: Callable[[T], Awaitable[R]], desc: str) -> list[R]:
        """`each`, with the results returned in the order of `items`."""
        bar = self.progress(len(items), desc)
        try:
            return await gather_bounded(items, fn, self.cfg.concurrency, bar, self.postfix)
        finally:
            bar.close()


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
                     forced_close=d.get("forced_close"), cached=cached, status=200)


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


async def gather_bounded(items: Sequence[T], fn: Callable[[T], Awaitable[R]], limit: int, bar: Any = None,
                         postfix: Callable[[], dict[str, Any]] | None = None) -> list[R]:
    """`run_bounded` with the results in the order of `items`, ticking `bar` (and its postfix) per item."""
    out: list[Any] = [None] * len(items)

    async def call(i: int) -> R:
        return await fn(items[i])

    def keep(i: int, result: R) -> None:
        out[i] = result
        if bar is not None:
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(postfix(), refresh=False)

    await run_bounded(range(len(items)), call, limit, keep)
    return out


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr that does not linger after it closes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="item", dynamic_ncols=True, leave=False)
