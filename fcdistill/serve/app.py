"""The OpenAI-compatible HTTP layer, one FastAPI app for every engine: routes, errors, auth, metrics.

What each endpoint answers is `serving.OpenAIServing`'s; this module only wires it to HTTP. Every
error leaves as OpenAI's error object with a 4xx code (5xx for the server's own failures), and the
server keeps serving. Limits (limits.py) are applied here to the body (its size, as it is read) and
before a request takes a place in flight (429 when none is left); the engine is watched, and once
it has failed /health answers 503 and `on_engine_failure` is called (the CLI then stops the server
with a non-zero exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from fcdistill.errors import validation_message
from fcdistill.grammars import LoopGuard, grammar_cache_info
from fcdistill.serve.engines.base import Engine
from fcdistill.serve.lifecycle import access_log
from fcdistill.serve.limits import ServeLimits
from fcdistill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from fcdistill.serve.serving import OpenAIServing

WATCH_ENGINE_S = 0.5  # how often the app looks at engine.failure


def create_app(engine: Engine, api_key: str | None = None, guard: LoopGuard | None = LoopGuard(),
               limits: ServeLimits | None = None, on_engine_failure: Callable[[str], None] | None = None,
               grammar_backend: str = "outlines") -> FastAPI:
    """The app around an engine; `api_key` (when set) is required as a Bearer token on /v1/*.

    `guard` None turns off the budget and the loop guard (see OpenAIServing). `on_engine_failure` is
    called once, with the reason, when the engine has failed for good. `grammar_backend`: what masks
    constrained tokens (grammars/constraint.py)."""
    limits = limits or ServeLimits()

    async def watch_engine() -> None:
        while (failure := engine.failure) is None:
            await asyncio.sleep(WATCH_ENGINE_S)
        if on_engine_failure is not None:
            on_engine_failure(failure)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            watcher.cancel()
            await engine.shutdown()  # the vllm engine's core runs in a child process: stop it with the server

    app = FastAPI(title="fcdistill", docs_url=None, redoc_url=None, lifespan=lifespan)
    # Starlette's body limit counts a chunked body's bytes as they are read (a 413, through the handler
    # below); a declared Content-Length over the limit is refused earlier, by the middleware further
    # down (added later, so outside this one: Starlette's own refusal is plain text)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=limits.max_body_bytes)
    serving = OpenAIServing(engine, guard, limits=limits, grammar_backend=grammar_backend)
    metrics = serving.metrics
    app.state.engine, app.state.serving = engine, serving

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = request_problem(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    def too_large() -> JSONResponse:
        return JSONResponse(error_body(f"The request body is larger than this server takes: {limits.max_body_bytes} "
                                       "bytes (--max-body-bytes).", code="request_too_large"), status_code=413)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # a chunked body that passed the limit as it was read
            return too_large()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    expected_auth = f"Bearer {api_key}".encode() if api_key else b""

    def log_request(request: Request, status: int, seconds: float) -> None:
        if access_log.isEnabledFor(logging.INFO):  # fcd serve --log-requests
            client = f"{request.client.host}:{request.client.port}" if request.client else "-"
            extra = getattr(request.state, "log", "")
            access_log.info('%s "%s %s" %d %.3fs%s', client, request.method, request.url.path, status, seconds,
                            f" {extra}" if extra else "")

    routes: set[str] = set()  # filled once the routes below exist: metric labels come from these only

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        path = request.url.path
        label = path if path in routes else "other"
        if api_key and path.startswith("/v1"):
            # constant-time comparison: the time a refusal takes says nothing about the key
            if not secrets.compare_digest(request.headers.get("authorization", "").encode(), expected_auth):
                metrics.request(label, 401, 0.0)
                log_request(request, 401, time.perf_counter() - start)
                return JSONResponse(error_body("Incorrect API key provided.", code="invalid_api_key"), status_code=401)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:  # refused before a byte of it is read
            response: Response = too_large()
        else:
            response = await call_next(request)
        metrics.request(label, response.status_code, time.perf_counter() - start)
        log_request(request, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if (failure := engine.failure) is not None:
            return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render(grammar_cache_info(), engine.stats(), serving.in_flight)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [m.model_dump(exclude_unset=True) for m in serving.models()]})

    async def answer(request: Request, req: ChatCompletionRequest | CompletionRequest, prepare: Callable[[Any], Any],
                     whole: Callable[..., Any], stream: Callable[[Any], AsyncIterator[Any]]) -> Response:
        """One request through admission, checks and generation; its place in flight is given back
        when the answer (or, for a stream, its last event) has gone, whatever happened."""
        request.state.log = f"model={req.model}" + (" stream" if req.stream else "")
        release = serving.admit()
        try:
            plan = await prepare(req)
            if req.stream:
                return EventStream(sse(stream(plan)), release)
            response = await whole(plan, request.is_disconnected)
        except BaseException:
            release()
            raise
        release()
        request.state.log += f" tokens={response.usage.prompt_tokens}+{response.usage.completion_tokens}"
        return openai_json(response)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await answer(request, req, serving.prepare_chat, serving.chat_completion, serving.chat_completion_stream)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await answer(request, req, serving.prepare_completion, serving.completion, serving.completion_stream)

    routes.update(r.path for r in app.routes if isinstance(getattr(r, "path", None), str))
    return app


def openai_json(obj: BaseModel) -> Response:
    """An openai response object as JSON: the fields it was built with, nulls included (logprobs: null,
    content: null beside tool calls), none of the type's unset optional ones."""
    return Response(obj.model_dump_json(exclude_unset=True), media_type="application/json")


class EventStream(StreamingResponse):
    """A stream of server-sent events that gives its request's place in flight back when the response
    ends, however it ends. Not from inside the body iterator: a client that leaves before the first
    event makes Starlette cancel the response before it ever starts the iterator, whose `finally`
    would then never run, and the place would stay taken for good."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def sse(events: AsyncIterator[BaseModel | dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then `[DONE]`; an error
    object (always the last event) ends the stream without `[DONE]`."""
    failed = False
    try:
        async for ev in events:
            failed = isinstance(ev, dict)
            yield f"data: {json.dumps(ev) if failed else ev.model_dump_json(exclude_unset=True)}\n\n"
        if not failed:
            yield "data: [DONE]\n\n"
    except Exception as exc:  # a bug after the first byte: the client still gets an error event, then the end
        logging.getLogger("fcdistill.serve").exception("stream failed")
        yield f"data: {json.dumps(error_body(f'internal error: {type(exc).__name__}: {exc}', 'server_error'))}\n\n"


def request_problem(exc: RequestValidationError) -> tuple[str, str | None]:
    """A request body pydantic refused: every problem on one line (errors.validation_message), and
    OpenAI's `param`, where the first one is. FastAPI's leading `body` is dropped from each place."""
    errors = [{**e, "loc": _body_loc(e.get("loc", ()))} for e in exc.errors()]
    if not errors:
        return "invalid request", None
    message = validation_message(errors)
    if any(e.get("type") == "json_invalid" for e in errors):  # its place is a character offset, no param
        return f"request body is not valid JSON: {message}", None
    first = errors[0]["loc"]
    return message, (".".join(str(p) for p in first) or None) if first != ("body",) else None


def _body_loc(loc: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """A field's place in the body; `body` itself when the body as a whole is wrong (missing, not an object)."""
    loc = tuple(loc)
    return loc[1:] if loc[:1] == ("body",) and len(loc) > 1 else loc
