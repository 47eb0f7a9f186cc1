"""Settings of one OpenAI-compatible endpoint, as the neutral client needs them.

Stages extend this model with their own fields (`TeacherConfig` adds the teacher's reply modes);
eval builds it directly. The key is given directly (`api_key`, never written anywhere: excluded
from dumps and repr) or named by the environment variable that holds it (`api_key_env`), so
configs, run directories and cache keys can be shared without leaking secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ClientConfig(BaseModel):
    """One endpoint: where it is, how to ask it, how hard to retry, how many requests at once."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1)
    api_key: str | None = Field(None, exclude=True, repr=False, description="the key itself; wins over api_key_env")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0)
    seed: int | None = Field(None, description="sent as `seed` (+ sample index when sampling several)")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra request fields, sent as-is")
    concurrency: int = Field(8, ge=1, le=4096, description="requests in flight at most")
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1, description="tries per request, the first included")
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait between tries, a server's Retry-After included")
    price_input_per_mtok: float | None = Field(None, ge=0, description="USD per million prompt tokens")
    price_output_per_mtok: float | None = Field(None, ge=0, description="USD per million completion tokens")
    cache: Path | None = Field(None, description="SQLite file of answered requests; None: no cache")
    progress: bool = True

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    def key(self) -> str:
        """The key: given directly, else from the named variable; local servers accept any, so 'EMPTY'."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or "EMPTY"
        return "EMPTY"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for the tokens at the configured prices; None when no price is set."""
        if self.price_input_per_mtok is None and self.price_output_per_mtok is None:
            return None
        return (prompt_tokens * (self.price_input_per_mtok or 0.0)
                + completion_tokens * (self.price_output_per_mtok or 0.0)) / 1e6
