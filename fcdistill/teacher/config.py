"""Teacher endpoint settings, from a YAML file and/or CLI flags, checked once by pydantic.

`TeacherConfig` is the neutral client's `ClientConfig` plus how the teacher is asked (tools or prompt
mode, how JSON replies come back). The API key is never stored: the config names the environment
variable that holds it, so configs, run directories and cache keys can be shared without leaking secrets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from fcdistill.client.config import ClientConfig
from fcdistill.errors import validation_message


class TeacherError(ValueError):
    """Bad teacher-stage input (config, files, options); the CLI prints it as one line and exits 2."""


class TeacherConfig(ClientConfig):
    """One OpenAI-compatible endpoint: local vLLM, our own `fcd serve`, or a hosted API."""

    mode: Literal["tools", "prompt"] = Field(
        "tools", description="tools: the `tools` parameter; prompt: BFCL's python-syntax system prompt")
    structured: Literal["text", "schema", "tool"] = Field(
        "text", description="how JSON replies (generated examples, judge verdicts) come back: as free message "
                            "text; as text constrained by response_format json_schema; or as the arguments "
                            "of a forced call to a schema tool")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise TeacherError(f"--base-url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _no_key(cls, v: str | None) -> str | None:
        if v is not None:
            raise TeacherError("api_key: a teacher config names the key's variable (--api-key-env), never the key")
        return v

    def identity(self) -> dict[str, Any]:
        """What decides the teacher's answers (written next to labels; a change forbids silent resume)."""
        return {"model": self.model, "mode": self.mode, "structured": self.structured,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed,
                "extra_body": self.extra_body}


def load_teacher_config(path: Path | None, overrides: dict[str, Any]) -> TeacherConfig:
    """YAML file (optional) + CLI overrides (None values ignored) -> a checked TeacherConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        from fcdistill.configfile import read_yaml_mapping

        loaded = read_yaml_mapping(Path(path), "teacher config", TeacherError)
        data.update(loaded.get("teacher", loaded))
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("base_url", "model"):
        if not data.get(key):
            raise TeacherError(f"the teacher needs --{key.replace('_', '-')} (or `{key}` in --teacher-config)")
    try:
        return TeacherConfig.model_validate(data)
    except ValidationError as exc:
        raise TeacherError(validation_message(exc)) from None


def check_teacher(cfg: TeacherConfig) -> None:
    """The client's `check_endpoint` for the teacher stages: a TeacherError (exit 2) before any work, and
    a warning when the endpoint lists its models and the teacher is not among them."""
    import sys

    from fcdistill.client.endpoint import EndpointError, check_endpoint

    try:
        served = check_endpoint(cfg.base_url, cfg.key(), key_hint=f"--api-key-env (now {cfg.api_key_env})")
    except EndpointError as exc:
        raise TeacherError(f"teacher {exc}") from None
    if served and cfg.model not in served:
        print(f"warning: {cfg.base_url} lists {', '.join(served[:8])}, not {cfg.model!r}", file=sys.stderr)
