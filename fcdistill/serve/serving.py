"""The OpenAI-compatible serving logic, without HTTP: what /v1/chat/completions, /v1/completions and
/v1/models answer, for any engine.

Prompts are rendered and completions parsed by chat_format; tool calls are constrained by grammars;
the engine only turns prompt ids into tokens. Responses are the `openai` package's own types, so what
leaves the server is what the official client parses. A refused request raises `APIError` (OpenAI's
error object and a 4xx code) before any token is generated; an error after a stream started is its
last event.

Each constrained answer carries its max_tokens into the constraint, which then always closes the
call (or JSON value) in time; `required`, a named tool and response_format json_schema are refused
up front when max_tokens cannot hold even the shortest valid answer. A choice whose answer the budget
or the loop guard had to close says so in a non-standard `forced_close` field ("budget" | "loop").
With the guard on, an answer holds at most `same_calls` copies of one call (default one): the guard
closes the call list at the copy too many, which is not returned (nor streamed).

Apart from the FastAPI app (as vLLM's serving_chat.py is from its api_server.py) so that it is tested
by calling it, with a real engine and no server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    chat_completion,
    chat_completion_chunk,
)
from openai.types.chat.chat_completion_message_tool_call import Function

from fcdistill.chat_format import CallDelta, CallStreamer, ChatFormat, as_messages, first_copies
from fcdistill.grammars.constraint import BACKENDS, PREFETCH_TOKENS
from fcdistill.grammars import (CompiledGrammar, GrammarError, LoopGuard, SequenceConstraint, compile_grammar,
                                compile_pending, grammar_enforces, token_vocabulary)
from fcdistill.serve.engines.base import (Engine, EngineRequestError, EngineUnavailable, GenerationRequest, SamplingParams,
                                          over_context)
from fcdistill.serve.limits import ServeLimits
from fcdistill.serve.metrics import Metrics
from fcdistill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, new_id, now
from fcdistill.tools import ToolCall, ToolSchemaError, ToolSpec, call_errors, normalize_tools

Disconnected = Callable[[], Awaitable[bool]]  # Request.is_disconnected: polled while a whole answer generates
StreamError = dict[str, Any]  # OpenAI's error object, the last event of a stream that failed
MAX_COMPLETION_CHOICES = 16  # /v1/completions: prompts times n


@dataclass
class ChatPlan:
    """A chat request that passed every check: one generation per choice, ready to run."""

    model: str
    gens: list[GenerationRequest]
    tools: list[ToolSpec]
    prompt_tokens: int
    include_usage: bool = False
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)


@dataclass
class CompletionPlan:
    """A raw-prompt request that passed every check: one generation per prompt and n, and the text each
    choice starts with (its prompt under `echo`, else nothing)."""

    model: str
    gens: list[GenerationRequest]
    echoes: list[str]
    prompt_tokens: int
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)


class OpenAIServing:
    """One server's serving state (engine, chat format, token vocabulary, loop guard, metrics) and the
    logic of each endpoint.

    `guard` None turns off the budget and the loop guard (constrained answers may then be cut at
    max_tokens, as before them): for measuring what they change. `limits`: what a request may ask
    (limits.py). `grammar_backend`: outlines or llguidance (grammars/constraint.py)."""

    def __init__(self, engine: Engine, guard: LoopGuard | None = LoopGuard(), metrics: Metrics | None = None,
                 limits: ServeLimits | None = None, grammar_backend: str = "outlines"):
        if grammar_backend not in getattr(engine, "grammar_backends", BACKENDS):
            raise ValueError(f"grammar backend {grammar_backend!r} does not run on this engine")
        self.engine = engine
        self.grammar_backend = grammar_backend
        self.guard = guard
        self.metrics = metrics or Metrics()
        self.limits = limits or ServeLimits()
        self.chat = ChatFormat(engine.tokenizer, fc_token=engine.fc_token)
        self.vocab = token_vocabulary(engine.tokenizer, engine.fc_token, engine.logits_size)
        if grammar_backend == "llguidance":  # its tokenizer takes a few hundred ms: not on the first request
            from fcdistill.grammars.llguidance_masks import ll_tokenizer

            ll_tokenizer(self.vocab)
        self.in_flight = 0  # requests admitted and not yet answered (streams: until their last event)

    # -- admission -----------------------------------------------------------------------------------
    def admit(self) -> Callable[[], None]:
        """Take a place among the requests in flight, or refuse at once: 429 with Retry-After when
        they are all taken, 503 when the engine has failed. Returns the call that gives the place back
        (idempotent)."""
        if (failure := self.engine.failure) is not None:
            raise unavailable(failure, self.limits.retry_after_s)
        limit = self.limits.max_concurrent_requests
        if self.in_flight >= limit:
            raise APIError(429, f"The server is busy: {limit} requests are in flight (--max-concurrent-requests); "
                                f"retry after {self.limits.retry_after_s} s.", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(self.limits.retry_after_s)})
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        return release

    # -- /v1/models ----------------------------------------------------------------------------------
    def models(self) -> list[Model]:
        """The base model, then each adapter (its `parent` the base)."""
        created, base = now(), self.engine.model_name
        return [Model(id=base, object="model", created=created, owned_by="fcdistill", root=base)] + [
            Model(id=name, object="model", created=created, owned_by="fcdistill", root=path, parent=base)
            for name, path in self.engine.adapters.items()]

    # -- /v1/chat/completions ------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest) -> ChatPlan:
        """Every check that can refuse a chat request, in order, and its generations.

        The grammar is compiled here (in a thread: a new tool set takes a while), so a tool set or
        tool_choice the grammar cannot take, or a budget too small for a forced answer, is a 400."""
        adapter = self.adapter_for(req.model)
        if req.tools and len(req.tools) > self.limits.max_tools:
            raise APIError(400, f"{len(req.tools)} tools given; this server takes at most {self.limits.max_tools} "
                                "a request (--max-tools)", param="tools")
        try:
            tools = normalize_tools(req.tools or [])
        except ToolSchemaError as exc:
            raise APIError(400, f"invalid tool: {exc}", param="tools") from None
        choice = tool_choice_name(req, tools)
        json_schema = response_schema(req, choice)
        try:
            messages = as_messages([m.model_dump(exclude_none=True) | {"role": "system" if m.role == "developer" else m.role}
                                    for m in req.messages])
        except ValueError as exc:
            raise APIError(400, f"invalid messages: {exc}", param="messages") from None
        # rendering a long conversation and tokenizing it take milliseconds each: not on the event loop
        prompt_ids = await asyncio.to_thread(self._render_ids, messages, tools)
        sp = self.sampling(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens,
                           "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        if req.stream and req.n > 1:
            raise APIError(400, "n > 1 is not supported with stream", param="n")
        grammar = await self.grammar_for(tools, choice, req.parallel_tool_calls, json_schema, sp.max_tokens)
        budget_param = ("max_completion_tokens" if req.max_completion_tokens else "max_tokens" if req.max_tokens
                        else "messages")
        self.check_budget(grammar, sp.max_tokens, budget_param, choice)
        budget = sp.max_tokens if self.guard is not None else None
        gens = [GenerationRequest(prompt_ids=prompt_ids, adapter=adapter,
                                  sampling=sp if sp.seed is None else dataclasses.replace(sp, seed=sp.seed + i),
                                  constraint=SequenceConstraint(grammar, budget, self.guard))
                for i in range(req.n)]
        return ChatPlan(model=req.model, gens=gens, tools=tools, prompt_tokens=len(prompt_ids),
                        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage))

    def _render_ids(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> list[int]:
        try:
            prompt = self.chat.render_prompt(messages, tools)
        except (ValueError, ToolSchemaError) as exc:
            raise APIError(400, f"invalid messages: {exc}", param="messages") from None
        return self.engine.tokenizer.encode(prompt, add_special_tokens=False)

    async def chat_completion(self, plan: ChatPlan, disconnected: Disconnected | None = None) -> ChatCompletion:
        """Every choice generated whole; a call that fails its schema comes back as text."""
        results = await asyncio.gather(*(self._generate(g, disconnected) for g in plan.gens))
        choices = []
        for i, (gen, (text, _, reason)) in enumerate(zip(plan.gens, results)):
            content, calls = self.checked_calls(text, plan.tools)
            message = ChatCompletionMessage(role="assistant", content=content)
            if calls:
                message = ChatCompletionMessage(role="assistant", content=content, tool_calls=tool_call_objects(calls))
                reason = "tool_calls" if reason == "stop" else reason
            choices.append(chat_completion.Choice(index=i, message=message, finish_reason=reason, logprobs=None,
                                                  **self.forced_close(gen)))
        usage = _usage(plan.prompt_tokens, sum(n for _, n, _ in results))
        self.metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
        return ChatCompletion(id=plan.id, object="chat.completion", created=plan.created, model=plan.model,
                              choices=choices, usage=usage)

    async def chat_completion_stream(self, plan: ChatPlan) -> AsyncIterator[ChatCompletionChunk | StreamError]:
        """The first choice as chunks: text as it comes (up to the FC token), then each call as OpenAI
        streams one (its id and name, then fragments of its arguments as they are generated), then the
        finish reason (and usage when asked for)."""
        gen, tools = plan.gens[0], plan.tools

        def chunk(delta: chat_completion_chunk.ChoiceDelta, finish: str | None = None, **extra: str) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=plan.id, object="chat.completion.chunk", created=plan.created, model=plan.model,
                                       choices=[chat_completion_chunk.Choice(index=0, delta=delta, finish_reason=finish,
                                                                             logprobs=None, **extra)])

        Delta = chat_completion_chunk.ChoiceDelta
        ids: list[str] = []

        def call_chunk(d: CallDelta) -> ChatCompletionChunk:
            if d.name is not None:
                ids.append(new_id("call", "_"))
            function = chat_completion_chunk.ChoiceDeltaToolCallFunction(name=d.name, arguments=d.arguments)
            return chunk(Delta(tool_calls=[chat_completion_chunk.ChoiceDeltaToolCall(
                index=d.index, id=ids[d.index] if d.name is not None else None,
                type="function" if d.name is not None else None, function=function)]))

        # Arguments stream as they are generated where the grammar alone guarantees them; a call to a
        # tool with checks beyond the grammar (bounds, patterns) comes whole, after the checks.
        streamable = {t.name for t in tools if grammar_enforces(t.parameters)} if gen.constraint is not None else set()
        streamer = CallStreamer(self.chat.fc_token, streamable.__contains__,
                                copies=self.guard.same_calls if self.guard is not None else None) if tools else None
        yield chunk(Delta(role="assistant", content=""))
        text, streamed, n_tokens, reason = "", 0, 0, "stop"
        try:
            async for ev in self.engine.generate(gen):
                text += ev.text
                n_tokens += len(ev.token_ids)
                fc_at = text.find(self.chat.fc_token) if tools else -1
                visible = text if fc_at < 0 else text[:fc_at]
                if len(visible) > streamed:
                    yield chunk(Delta(content=visible[streamed:]))
                    streamed = len(visible)
                for d in streamer.feed(text) if streamer is not None and fc_at >= 0 else ():
                    yield call_chunk(d)
                if ev.finish_reason:
                    reason = ev.finish_reason
                    if reason == "error":
                        yield generation_error(ev.error, ev.engine_failed).body()
                        return
        except (EngineRequestError, EngineUnavailable) as exc:
            yield engine_error(exc).body()
            return
        _, calls = self.checked_calls(text, tools)
        rest = streamer.finish(calls) if streamer is not None else None
        if calls and rest is not None:
            for d in rest:
                yield call_chunk(d)
            reason = "tool_calls" if reason == "stop" else reason
        elif len(text) > streamed and not (streamer is not None and streamer.sent):
            yield chunk(Delta(content=text[streamed:]))
        # else: calls were streamed and generation stopped inside them (max_tokens without the guard):
        # as OpenAI does, the last call stays partial and finish_reason says length
        yield chunk(Delta(), reason, **self.forced_close(gen))
        self.metrics.tokens(plan.prompt_tokens, n_tokens)
        if plan.include_usage:
            yield ChatCompletionChunk(id=plan.id, object="chat.completion.chunk", created=plan.created, model=plan.model,
                                      choices=[], usage=_usage(plan.prompt_tokens, n_tokens))

    # -- /v1/completions -----------------------------------------------------------------------------
    async def prepare_completion(self, req: CompletionRequest) -> CompletionPlan:
        """Every check that can refuse a raw-prompt request, and its generations (no grammar: raw
        prompts are free text)."""
        adapter = self.adapter_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) * req.n > MAX_COMPLETION_CHOICES:
            raise APIError(400, f"prompt must hold 1 to {MAX_COMPLETION_CHOICES} strings (times n)", param="prompt")
        gens: list[GenerationRequest] = []
        echoes: list[str] = []
        prompt_tokens = 0
        encoded = await asyncio.to_thread(lambda: [self.engine.tokenizer.encode(p, add_special_tokens=False)
                                                   for p in prompts])
        for p, ids in zip(prompts, encoded):
            if not ids:
                raise APIError(400, "prompt is empty: give at least one token of text", param="prompt")
            sp = self.sampling(req, len(ids), req.max_tokens, "max_tokens")
            prompt_tokens += len(ids)
            gens += [GenerationRequest(prompt_ids=ids, sampling=sp, adapter=adapter) for _ in range(req.n)]
            echoes += [p if req.echo else ""] * req.n
        if req.stream and len(gens) > 1:
            raise APIError(400, "stream takes one prompt and n = 1", param="stream")
        return CompletionPlan(model=req.model, gens=gens, echoes=echoes, prompt_tokens=prompt_tokens)

    async def completion(self, plan: CompletionPlan, disconnected: Disconnected | None = None) -> Completion:
        results = await asyncio.gather(*(self._generate(g, disconnected) for g in plan.gens))
        choices = [CompletionChoice(index=i, text=echo + text, finish_reason=reason, logprobs=None)
                   for i, (echo, (text, _, reason)) in enumerate(zip(plan.echoes, results))]
        usage = _usage(plan.prompt_tokens, sum(n for _, n, _ in results))
        self.metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
        return Completion(id=plan.id, object="text_completion", created=plan.created, model=plan.model,
                          choices=choices, usage=usage)

    async def completion_stream(self, plan: CompletionPlan) -> AsyncIterator[Completion | StreamError]:
        """The one choice's text as it comes (its prompt first under `echo`).

        Chunks are built unvalidated: OpenAI streams `finish_reason: null` until the last chunk,
        which the openai type (written for whole answers) does not allow; the client parses them alike."""
        def chunk(text: str, finish: str | None = None) -> Completion:
            choice = CompletionChoice.model_construct(index=0, text=text, finish_reason=finish, logprobs=None)
            return Completion.model_construct(id=plan.id, object="text_completion", created=plan.created,
                                              model=plan.model, choices=[choice])

        if plan.echoes[0]:
            yield chunk(plan.echoes[0])
        try:
            async for ev in self.engine.generate(plan.gens[0]):
                if ev.finish_reason == "error":
                    yield generation_error(ev.error, ev.engine_failed).body()
                    return
                if ev.text or ev.finish_reason:
                    yield chunk(ev.text, ev.finish_reason)
        except (EngineRequestError, EngineUnavailable) as exc:
            yield engine_error(exc).body()

    # -- shared steps --------------------------------------------------------------------------------
    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` selects (None: the base model); 404 for an unknown name."""
        if model == self.engine.model_name:
            return None
        if model in self.engine.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def grammar_for(self, tools: list[ToolSpec], choice: str, parallel: bool,
                          json_schema: dict[str, Any] | None, max_tokens: int) -> CompiledGrammar:
        """The compiled constraint (cached across requests); a 400 naming tool_choice or tools when it cannot be
        built, a 503 with Retry-After while a new one is still compiling after --grammar-timeout.
        Under llguidance, a max_tokens the budget could bind from the start waits for the Index here too."""
        timeout = self.limits.grammar_timeout_s

        def build() -> tuple[CompiledGrammar, bool]:
            grammar, hit = compile_grammar(self.vocab, tools, choice, parallel, json_schema, backend=self.grammar_backend)
            if grammar.may_bind(max_tokens - PREFETCH_TOKENS):  # wanted within a few tokens: now, not mid-batch
                grammar.exact()
            return grammar, hit

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            pending = compile_pending(self.vocab, tools, choice, parallel, json_schema, backend=self.grammar_backend)
            if pending is not None:
                # another request (or this client's last try) is compiling it: wait here on the loop,
                # holding no worker thread (prompt rendering shares them); the shield keeps a timeout
                # from cancelling that compile
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), timeout)
            grammar, hit = await asyncio.wait_for(asyncio.to_thread(build), max(deadline - loop.time(), 0.001))
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tool_choice" if "tool_choice" in str(exc) else "tools") from None
        except asyncio.TimeoutError:
            # The compile goes on in its thread and is cached when it ends, and a retry joins it rather
            # than starting another: the condition is transient, so a 503 a client retries, not a 400
            # it keeps as the answer.
            what = "response_format json_schema" if json_schema is not None else "tool set"
            wait = self.limits.retry_after_s
            raise APIError(503, f"the {what}'s grammar is still compiling (or waiting to) after {timeout:g} s "
                                f"(--grammar-timeout); it keeps compiling and is cached, so a retry after {wait} s "
                                "joins it. A schema that never finishes needs simpler schemas or fewer tools",
                           "server_error", param="response_format" if json_schema is not None else "tools",
                           code="grammar_compiling", headers={"Retry-After": str(wait)}) from None
        self.metrics.grammar(grammar.compile_ms / 1000, hit)
        return grammar

    @staticmethod
    def check_budget(grammar: CompiledGrammar, max_tokens: int, param: str, choice: str) -> None:
        """A forced call or JSON answer that cannot fit max_tokens is refused, never returned cut.

        `param` names what set the budget: max_tokens, max_completion_tokens, or messages (neither was
        given, and the context left that much)."""
        if grammar.mode not in ("forced", "json") or grammar.fits(max_tokens):
            return
        what = (("response_format json_schema", "JSON value") if grammar.mode == "json"
                else (f"tool_choice {choice!r}" if choice == "required" else f"tool_choice function {choice!r}", "call"))
        need = f"{what[0]} needs at least {grammar.min_tokens} completion tokens for the shortest valid {what[1]}"
        if param == "messages":
            raise APIError(400, f"The context leaves {max_tokens} tokens for the completion, but {need}: shorten the "
                                f"messages.", param=param)
        raise APIError(400, f"{param} is {max_tokens}, but {need}: set {param} to at least {grammar.min_tokens}.",
                       param=param)

    def sampling(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                 max_tokens: int | None, max_tokens_param: str) -> SamplingParams:
        """The request's sampling; without max_tokens, the rest of the context (within the server's
        cap). A prompt that fills the context, or passes --max-prompt-tokens, is refused with OpenAI's
        message and code; a max_tokens over --max-tokens with the cap."""
        context = self.engine.context_length
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        if prompt_len >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, "
                                f"your messages resulted in {prompt_len} tokens.", param=param,
                           code="context_length_exceeded")
        limit = self.limits.max_prompt_tokens
        if limit is not None and prompt_len > limit:
            raise APIError(400, f"The prompt has {prompt_len} tokens; this server takes at most {limit} "
                                "(--max-prompt-tokens).", param=param, code="context_length_exceeded")
        cap = self.limits.max_tokens
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"{max_tokens_param} is {max_tokens}; this server allows at most {cap} (--max-tokens).",
                           param=max_tokens_param)
        # the engine's own check, made here so that it refuses before a stream's first byte
        if max_tokens is not None and (message := over_context(prompt_len, max_tokens, context)) is not None:
            raise APIError(400, message, param=max_tokens_param, code="context_length_exceeded")
        room = context - prompt_len if cap is None else min(cap, context - prompt_len)
        return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=req.stop_list())

    def checked_calls(self, text: str, tools: list[ToolSpec]) -> tuple[str | None, list[ToolCall]]:
        """The answer's text before its calls, and the calls safe to return (none: the whole text).

        The grammar covers types, enums, required and nesting; what it cannot express (numeric bounds,
        string patterns) is checked here, and a call that fails its schema is returned as text, never
        as a call."""
        if not tools:
            return text, []
        parsed = self.chat.parse(text)
        if not parsed.tool_calls:
            return text, []
        if any(call_errors(c, tools) for c in parsed.tool_calls):
            self.metrics.rejected_calls.inc()
            return text, []
        calls = parsed.tool_calls
        if self.guard is not None:  # the guard ends an answer at a call's copy too many, which is not returned
            calls = first_copies(calls, self.chat.call_texts(text), self.guard.same_calls)
        return parsed.content, calls

    def forced_close(self, gen: GenerationRequest) -> dict[str, str]:
        """The choice's `forced_close` field (and the metric) when the budget or the loop guard closed it."""
        reason = gen.constraint.forced_close if gen.constraint is not None else None
        if reason is None:
            return {}
        self.metrics.forced_close.labels(reason).inc()
        return {"forced_close": reason}

    async def _generate(self, gen: GenerationRequest, disconnected: Disconnected | None) -> tuple[str, int, str]:
        """One whole generation: text, completion tokens, finish reason. Cancelled (499) when
        `disconnected` says the client left, polled every 0.25 s."""
        async def consume() -> tuple[str, int, str]:
            text, n, reason = [], 0, "stop"
            async for ev in self.engine.generate(gen):
                text.append(ev.text)
                n += len(ev.token_ids)
                if ev.finish_reason:
                    if ev.finish_reason == "error":
                        raise generation_error(ev.error, ev.engine_failed)
                    reason = ev.finish_reason
            return "".join(text), n, reason

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25 if disconnected is not None else None)
                if not done and disconnected is not None and await disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
            return task.result()
        except (EngineRequestError, EngineUnavailable) as exc:
            raise engine_error(exc) from None
        finally:
            if not task.done():
                task.cancel()


def tool_choice_name(req: ChatCompletionRequest, tools: list[ToolSpec]) -> str:
    """tool_choice as the grammar takes it: none, auto, required, or the named function's name."""
    choice = req.tool_choice or ("auto" if tools else "none")
    name = choice if isinstance(choice, str) else choice.function.name
    if name not in ("none", "auto", "required") and not tools:
        raise APIError(400, f"tool_choice names function {name!r} but no tools were given", param="tool_choice")
    if name == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool", param="tool_choice")
    return name


def response_schema(req: ChatCompletionRequest, choice: str) -> dict[str, Any] | None:
    """The JSON Schema response_format asks for (json_object: any object); None for text, or when
    tool_choice is not `none` (the tools' grammar comes first)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text" or choice != "none":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    spec = fmt.json_schema or {}
    schema = spec.get("schema", spec)
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be an object", param="response_format")
    return schema


def tool_call_objects(calls: list[ToolCall]) -> list[ChatCompletionMessageToolCall]:
    return [ChatCompletionMessageToolCall(id=new_id("call", "_"), type="function", function=Function(
        name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False))) for c in calls]


def engine_error(exc: EngineRequestError | EngineUnavailable) -> APIError:
    """A request the engine refused (unknown adapter, prompt plus max_tokens over the context), or
    could not take because it has failed (503)."""
    if isinstance(exc, EngineUnavailable):
        return unavailable(str(exc))
    return APIError(404 if exc.code == "model_not_found" else 400, str(exc), param=exc.param, code=exc.code)


def unavailable(reason: str, retry_after_s: int = 1) -> APIError:
    """The engine has failed: 503, which the openai client retries (after Retry-After)."""
    return APIError(503, f"The engine is unavailable: {reason}", "server_error", code="engine_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


def generation_error(error: str | None, engine_failed: bool) -> APIError:
    """A generation that ended in an error: the engine's failure (503) or this request's (500)."""
    if engine_failed:
        return unavailable(error or "the engine failed")
    return APIError(500, error or "generation failed", "server_error")


def _usage(prompt: int, completion: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
