"""Teacher endpoint settings, from a YAML file and/or CLI flags, checked once by pydantic.

The API key is never stored: the config names the environment variable that holds it, so configs,
run directories and cache keys can be shared without leaking secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fcdistill.errors import validation_message


class TeacherError(ValueError):
    """Bad teacher-stage input (config, files, options); the CLI prints it as one line and exits 2."""


class TeacherConfig(BaseModel):
    """One OpenAI-compatible endpoint: local vLLM, our own `fcd serve`, or a hosted API."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0)
    concurrency: int = Field(8, ge=1, le=4096, description="requests in flight at most")
    mode: Literal["tools", "prompt"] = Field(
        "tools", description="tools: the `tools` parameter; prompt: BFCL's python-syntax system prompt")
    structured: Literal["text", "schema", "tool"] = Field(
        "text", description="how JSON replies (generated examples, judge verdicts) come back: as free message "
                            "text; as text constrained by response_format json_schema; or as the arguments "
                            "of a forced call to a schema tool")
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1, description="tries per request, the first included")
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait between tries, a server's Retry-After included")
    seed: int | None = Field(None, description="sent as `seed` (+ sample index when sampling several)")
    price_input_per_mtok: float | None = Field(None, ge=0, description="USD per million prompt tokens")
    price_output_per_mtok: float | None = Field(None, ge=0, description="USD per million completion tokens")
    cache: Path | None = Field(None, description="SQLite file of answered requests; None: no cache")
    progress: bool = True
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra request fields, sent as-is")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise TeacherError(f"--base-url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    def api_key(self) -> str:
        """The key from the named variable; local servers accept any key, so 'EMPTY' when unset."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or "EMPTY"
        return "EMPTY"

    def identity(self) -> dict[str, Any]:
        """What decides the teacher's answers (written next to labels; a change forbids silent resume)."""
        return {"model": self.model, "mode": self.mode, "structured": self.structured,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed,
                "extra_body": self.extra_body}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price_input_per_mtok is None and self.price_output_per_mtok is None:
            return None
        return (prompt_tokens * (self.price_input_per_mtok or 0.0)
                + completion_tokens * (self.price_output_per_mtok or 0.0)) / 1e6


def load_teacher_config(path: Path | None, overrides: dict[str, Any]) -> TeacherConfig:
    """YAML file (optional) + CLI overrides (None values ignored) -> a checked TeacherConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise TeacherError(f"teacher config {path} not found")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise TeacherError(f"teacher config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise TeacherError(f"teacher config {path} must be a mapping")
        data.update(loaded.get("teacher", loaded))
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("base_url", "model"):
        if not data.get(key):
            raise TeacherError(f"the teacher needs --{key.replace('_', '-')} (or `{key}` in --teacher-config)")
    try:
        return TeacherConfig.model_validate(data)
    except ValidationError as exc:
        raise TeacherError(validation_message(exc)) from None
