"""The OpenAI-compatible HTTP layer, one FastAPI app for every engine.

Prompts are rendered and completions parsed by chat_format; tool calls are constrained by grammars;
the engine only turns prompt ids into tokens. Every error leaves as OpenAI's error object with a 4xx
code, and the server keeps serving.

Each constrained answer carries its max_tokens into the constraint, which then always closes the
call (or JSON value) in time; `required`, a named tool and response_format json_schema are refused
up front when max_tokens cannot hold even the shortest valid answer. A choice whose answer the budget
or the loop guard had to close says so in a non-standard `forced_close` field ("budget" | "loop").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fcdistill.chat_format import ChatFormat, as_messages
from fcdistill.grammars import (
    CompiledGrammar,
    GrammarError,
    LoopGuard,
    SequenceConstraint,
    compile_grammar,
    grammar_cache_info,
    token_vocabulary,
)
from fcdistill.serve.engines.base import Engine, EngineRequestError, GenerationEvent, GenerationRequest, SamplingParams
from fcdistill.serve.lifecycle import access_log
from fcdistill.serve.metrics import Metrics
from fcdistill.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now
from fcdistill.tools import ToolSchemaError, ToolSpec, call_errors, normalize_tools


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def create_app(engine: Engine, api_key: str | None = None, guard: LoopGuard | None = LoopGuard()) -> FastAPI:
    """The app around an engine; `api_key` (when set) is required as a Bearer token on /v1/*.

    `guard` None turns off the budget and the loop guard (constrained answers may then be cut at
    max_tokens, as before them): for measuring what they change."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown()  # the vllm engine's core runs in a child process: stop it with the server

    app = FastAPI(title="fcdistill", docs_url=None, redoc_url=None, lifespan=lifespan)
    chat = ChatFormat(engine.tokenizer, fc_token=engine.fc_token)
    vocab = token_vocabulary(engine.tokenizer, engine.fc_token, engine.logits_size)
    metrics = Metrics()
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        else:
            message = f"{'.'.join(loc)}: {err.get('msg')}" if loc else str(err.get("msg"))
        return JSONResponse(error_body(message, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code)

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

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        path = request.url.path
        if api_key and path.startswith("/v1"):
            # constant-time comparison: the time a refusal takes says nothing about the key
            if not secrets.compare_digest(request.headers.get("authorization", "").encode(), expected_auth):
                metrics.request(path, 401, 0.0)
                log_request(request, 401, time.perf_counter() - start)
                return JSONResponse(error_body("Incorrect API key provided.", code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        metrics.request(path, response.status_code, time.perf_counter() - start)
        log_request(request, response.status_code, time.perf_counter() - start)
        return response

    def adapter_for(model: str) -> str | None:
        if model == engine.model_name:
            return None
        if model in engine.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def grammar_for(tools: list[ToolSpec], choice: str, parallel: bool,
                          json_schema: dict[str, Any] | None) -> CompiledGrammar:
        try:
            grammar, hit = await run_in_threadpool(compile_grammar, vocab, tools, choice, parallel, json_schema)
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tool_choice" if "tool_choice" in str(exc) else "tools") from None
        metrics.grammar(grammar.compile_ms / 1000, hit)
        return grammar

    def check_budget(grammar: CompiledGrammar, max_tokens: int, param: str, choice: str) -> None:
        """A forced call or JSON answer that cannot fit max_tokens is refused, never returned cut.

        `param` names what set the budget: max_tokens, max_completion_tokens, or messages (neither was
        given, and the context left that much)."""
        if grammar.mode not in ("forced", "json") or max_tokens >= grammar.min_tokens:
            return
        what = (("response_format json_schema", "JSON value") if grammar.mode == "json"
                else (f"tool_choice {choice!r}" if choice == "required" else f"tool_choice function {choice!r}", "call"))
        need = f"{what[0]} needs at least {grammar.min_tokens} completion tokens for the shortest valid {what[1]}"
        if param == "messages":
            raise APIError(400, f"The context leaves {max_tokens} tokens for the completion, but {need}: shorten the "
                                f"messages.", param=param)
        raise APIError(400, f"{param} is {max_tokens}, but {need}: set {param} to at least {grammar.min_tokens}.",
                       param=param)

    def sampling(req: Any, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if prompt_len >= engine.context_length:
            raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens. However, "
                                f"your messages resulted in {prompt_len} tokens.", param="messages",
                           code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens or engine.context_length - prompt_len, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=req.stop_list())

    async def run(gen: GenerationRequest, request: Request) -> tuple[str, int, str]:
        """One whole generation; cancelled when the client disconnects."""
        async def consume() -> tuple[str, int, str]:
            text, n, reason = [], 0, "stop"
            async for ev in engine.generate(gen):
                text.append(ev.text)
                n += len(ev.token_ids)
                if ev.finish_reason:
                    if ev.finish_reason == "error":
                        raise APIError(500, ev.error or "generation failed", "server_error")
                    reason = ev.finish_reason
            return "".join(text), n, reason

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
            return task.result()
        except EngineRequestError as exc:
            raise APIError(404 if exc.code == "model_not_found" else 400, str(exc), param=exc.param, code=exc.code) from None
        finally:
            if not task.done():
                task.cancel()

    def checked_calls(text: str, tools: list[ToolSpec]) -> tuple[Any, list[Any]]:
        """Parsed completion and the calls safe to return. The grammar covers types, enums, required and
        nesting; what it cannot express (numeric bounds, string patterns) is checked here, and a call
        that fails its schema is returned as text, never as a call."""
        parsed = chat.parse(text)
        if not parsed.tool_calls:
            return parsed, []
        if any(call_errors(c, tools) for c in parsed.tool_calls):
            metrics.rejected_calls.inc()
            return parsed, []
        return parsed, parsed.tool_calls

    def forced_close(gen: GenerationRequest) -> dict[str, str]:
        """The choice's `forced_close` field (and the metric) when the budget or the loop guard closed it."""
        reason = gen.constraint.forced_close if gen.constraint is not None else None
        if reason is None:
            return {}
        metrics.forced_close.labels(reason).inc()
        return {"forced_close": reason}

    def tool_call_objects(calls: list[Any]) -> list[dict[str, Any]]:
        return [{"id": f"call_{new_id('')[1:]}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render(grammar_cache_info())
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = now()
        data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "fcdistill", "root": engine.model_name}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "fcdistill", "root": path,
                  "parent": engine.model_name} for name, path in engine.adapters.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        request.state.log = f"model={req.model}" + (" stream" if req.stream else "")
        adapter = adapter_for(req.model)
        try:
            tools = normalize_tools(req.tools or [])
        except ToolSchemaError as exc:
            raise APIError(400, f"invalid tool: {exc}", param="tools") from None
        choice = req.tool_choice or ("auto" if tools else "none")
        choice_name = choice.function.name if not isinstance(choice, str) else choice
        if choice_name != "none" and choice_name not in ("auto", "required") and not tools:
            raise APIError(400, f"tool_choice names function {choice_name!r} but no tools were given", param="tool_choice")
        if choice_name == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs at least one tool", param="tool_choice")
        json_schema = None
        if req.response_format is not None and req.response_format.type != "text" and choice_name == "none":
            if req.response_format.type == "json_object":
                json_schema = {"type": "object"}
            else:
                spec = req.response_format.json_schema or {}
                json_schema = spec.get("schema", spec) if isinstance(spec, dict) else None
                if not isinstance(json_schema, dict):
                    raise APIError(400, "response_format.json_schema.schema must be an object", param="response_format")
        try:
            messages = as_messages([m.model_dump(exclude_none=True) | {"role": "system" if m.role == "developer" else m.role}
                                    for m in req.messages])
            prompt = chat.render_prompt(messages, tools)
        except (ValueError, ToolSchemaError) as exc:
            raise APIError(400, f"invalid messages: {exc}", param="messages") from None
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        sp = sampling(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens)
        if req.stream and req.n > 1:
            raise APIError(400, "n > 1 is not supported with stream", param="n")
        grammar = await grammar_for(tools, choice_name, req.parallel_tool_calls, json_schema)
        budget_param = ("max_completion_tokens" if req.max_completion_tokens else "max_tokens" if req.max_tokens
                        else "messages")
        check_budget(grammar, sp.max_tokens, budget_param, choice_name)
        gens = [GenerationRequest(prompt_ids=prompt_ids, sampling=sp, adapter=adapter,
                                  constraint=SequenceConstraint(grammar, sp.max_tokens if guard is not None else None, guard))
                for _ in range(req.n)]
        if sp.seed is not None:
            for i, g in enumerate(gens):
                g.sampling = SamplingParams(**{**sp.__dict__, "seed": sp.seed + i})
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_chat(gens[0], rid, created, req.model, len(prompt_ids), include_usage, tools),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(run(g, request) for g in gens))
        choices, completion_tokens = [], 0
        for i, (text, n_tokens, reason) in enumerate(results):
            completion_tokens += n_tokens
            message: dict[str, Any] = {"role": "assistant", "content": text}
            parsed, calls = checked_calls(text, tools) if tools else (None, [])
            if calls:
                message = {"role": "assistant", "content": parsed.content, "tool_calls": tool_call_objects(calls)}
                reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None,
                            **forced_close(gens[i])})
        metrics.tokens(len(prompt_ids), completion_tokens)
        request.state.log += f" tokens={len(prompt_ids)}+{completion_tokens}"
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt_ids) + completion_tokens}}

    async def stream_chat(gen: GenerationRequest, rid: str, created: int, model: str, prompt_len: int,
                          include_usage: bool, tools: list[ToolSpec]) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: str) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text, streamed, n_tokens, reason = "", 0, 0, "stop"
        try:
            async for ev in engine.generate(gen):
                text += ev.text
                n_tokens += len(ev.token_ids)
                fc_at = text.find(chat.fc_token) if tools else -1
                visible = text if fc_at < 0 else text[:fc_at]
                if len(visible) > streamed:
                    yield chunk({"content": visible[streamed:]})
                    streamed = len(visible)
                if ev.finish_reason:
                    reason = ev.finish_reason
                    if reason == "error":
                        yield f"data: {json.dumps(error_body(ev.error or 'generation failed', 'server_error'))}\n\n"
                        return
        except EngineRequestError as exc:
            yield f"data: {json.dumps(error_body(str(exc), code=exc.code))}\n\n"
            return
        _, calls = checked_calls(text, tools) if tools else (None, [])
        if calls:
            for i, call in enumerate(tool_call_objects(calls)):
                yield chunk({"tool_calls": [{"index": i, **call}]})
            reason = "tool_calls" if reason == "stop" else reason
        elif len(text) > streamed:
            yield chunk({"content": text[streamed:]})
        yield chunk({}, reason, **forced_close(gen))
        metrics.tokens(prompt_len, n_tokens)
        if include_usage:
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n_tokens, "total_tokens": prompt_len + n_tokens}
            yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        request.state.log = f"model={req.model}" + (" stream" if req.stream else "")
        adapter = adapter_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) * req.n > 16:
            raise APIError(400, "prompt must hold 1 to 16 strings (times n)", param="prompt")
        gens, lens = [], []
        for p in prompts:
            ids = engine.tokenizer.encode(p, add_special_tokens=False)
            sp = sampling(req, len(ids), req.max_tokens)
            lens.append(len(ids))
            gens += [GenerationRequest(prompt_ids=ids, sampling=sp, adapter=adapter) for _ in range(req.n)]
        rid, created = new_id("cmpl"), now()
        if req.stream:
            if len(gens) > 1:
                raise APIError(400, "stream takes one prompt and n = 1", param="stream")
            return StreamingResponse(stream_completion(gens[0], rid, created, req.model, prompts[0] if req.echo else ""),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(run(g, request) for g in gens))
        choices = [{"index": i, "text": (prompts[i // req.n] if req.echo else "") + text, "finish_reason": reason,
                    "logprobs": None} for i, (text, _, reason) in enumerate(results)]
        completion_tokens = sum(n for _, n, _ in results)
        metrics.tokens(sum(lens), completion_tokens)
        request.state.log += f" tokens={sum(lens)}+{completion_tokens}"
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": sum(lens), "completion_tokens": completion_tokens,
                          "total_tokens": sum(lens) + completion_tokens}}

    async def stream_completion(gen: GenerationRequest, rid: str, created: int, model: str, echo: str) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None = None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if echo:
            yield chunk(echo)
        async for ev in engine.generate(gen):
            if ev.finish_reason == "error":
                yield f"data: {json.dumps(error_body(ev.error or 'generation failed', 'server_error'))}\n\n"
                return
            if ev.text or ev.finish_reason:
                yield chunk(ev.text, ev.finish_reason)
        yield "data: [DONE]\n\n"

    return app
