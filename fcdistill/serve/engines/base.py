"""What the HTTP layer asks of an engine, whichever one runs underneath (hf, vllm)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


class EngineRequestError(ValueError):
    """A request the engine cannot run (prompt longer than the context, ...): a 400 for the client."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class EngineUnavailable(RuntimeError):
    """The engine has failed (its scheduler or core died): a 503 for the client, and /health unhealthy."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float | None = None  # None: the model's generation_config default
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None  # None: the base model
    constraint: Any = None  # grammars.SequenceConstraint, or None for free text


@dataclass
class GenerationEvent:
    """A piece of output: new text (and token ids) or the end with its reason."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    engine_failed: bool = False  # with "error": the engine itself died, not this request (a 503)


class Engine(Protocol):
    model_name: str
    adapters: dict[str, str]
    tokenizer: Any
    fc_token: str
    context_length: int
    logits_size: int

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (None while it can): requests get a 503, /health says unhealthy."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    def stats(self) -> dict[str, int]:
        """The engine's own counters for /metrics (prefill tokens computed and reused, jumped tokens);
        empty when it keeps none we can read."""
        ...

    async def shutdown(self) -> None: ...


def over_context(prompt_len: int, budget: int, context_length: int) -> str | None:
    """OpenAI's message when prompt plus completion budget exceed the context, else None."""
    if prompt_len + budget <= context_length:
        return None
    return (f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + budget} tokens ({prompt_len} in the messages, {budget} in the completion).")


def check_fits(request: GenerationRequest, context_length: int) -> None:
    """Prompt plus completion budget must fit the context; OpenAI's message and code when not."""
    message = over_context(len(request.prompt_ids), request.sampling.max_tokens, context_length)
    if message is not None:
        raise EngineRequestError(message, code="context_length_exceeded")


def cut_at_stop(sent: str, delta: str, stops: list[str]) -> str | None:
    """The part of `delta` before the first stop string in `sent + delta`, or None when none occurs.

    Only the tail of `sent` that could start a stop string is searched again, so streaming stays linear.
    """
    text = sent + delta
    start = max(0, len(sent) - max(len(x) for x in stops))
    hits = [p for p in (text.find(x, start) for x in stops) if p >= 0]
    return text[len(sent):min(hits)] if hits else None


async def drain(stream: AsyncIterator[GenerationEvent]) -> tuple[str, list[int], str]:
    """Collect a whole generation: text, token ids, finish reason."""
    text, ids, reason = [], [], "stop"
    async for ev in stream:
        text.append(ev.text)
        ids += ev.token_ids
        if ev.finish_reason:
            reason = ev.finish_reason
            if ev.error:
                raise RuntimeError(ev.error)
    return "".join(text), ids, reason


def new_event_queue() -> asyncio.Queue[GenerationEvent]:
    return asyncio.Queue()
