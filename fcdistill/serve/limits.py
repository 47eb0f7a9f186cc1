"""What one `fcd serve` takes before it says no: each limit an option, each refusal an OpenAI error.

A local endpoint that agents call for hours must answer every request, fast, even when it cannot
serve it. Over a limit the answer comes before any work: a 429 with Retry-After when too many
requests are already in flight (TGI's `--max-concurrent-requests`; the openai client retries it
by itself), a 413 for a body too large, a 400 naming the field for too many tools, a max_tokens over
the cap, or a prompt over its token limit, and a 400 when a new tool set's grammar takes too long to
compile.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ServeLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_requests: Annotated[int, Field(ge=1)] = 64  # admitted at once, waiting or generating
    max_tools: Annotated[int, Field(ge=1)] = 128  # per request, as OpenAI's API allows
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # cap on max_tokens; None: what the context leaves
    max_prompt_tokens: Annotated[int, Field(ge=1)] | None = None  # None: the context length less one
    grammar_timeout_s: Annotated[float, Field(gt=0)] = 60.0  # compiling one new tool set's grammar
    retry_after_s: Annotated[int, Field(ge=1)] = 1  # Retry-After of a 429 (and of a 503 while restarting)
