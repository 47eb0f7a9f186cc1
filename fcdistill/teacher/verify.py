"""Verification of function-call answers, stage by stage, each failure with a stage, a code and a detail.

- format: every call (not only the first) against its tool's JSON Schema with jsonschema: required,
  types (integer means a JSON integer, never 3.0 or true), null, enum, bounds incl. exclusive ones,
  lengths, patterns, formats, nested objects and arrays, no unknown arguments (schemas are closed),
  no unknown functions; plus the shape the query style asks for (one call, several, none).
- execution (optional): see `execute.py`.
- semantic: the teacher as judge, answering a strict JSON verdict `{"thought": str, "pass": bool}`
  that is parsed as JSON and validated; an unparsable verdict is a failure with that reason (never
  `"yes" in text`).

`StageTable` counts outcomes like APIGen's table: generated, failures per stage with reasons, kept.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fcdistill.tools import ToolCall, ToolSpec, closed_schema

STYLES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
STAGES = ("format", "execution", "duplicates", "contamination", "semantic")

_CODES = {
    "required": "missing_required", "additionalProperties": "unknown_argument",
    "unevaluatedProperties": "unknown_argument", "type": "type", "enum": "enum", "const": "enum",
    "minimum": "bounds", "maximum": "bounds", "exclusiveMinimum": "bounds", "exclusiveMaximum": "bounds",
    "minLength": "length", "maxLength": "length", "minItems": "length", "maxItems": "length",
    "pattern": "pattern", "format": "format", "uniqueItems": "unique_items",
}


@dataclass(frozen=True)
class Failure:
    """Why an answer was rejected: the stage, a short code to count by, and the detail."""

    stage: str
    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.code}: {self.detail}"

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "code": self.code, "detail": self.detail}


def category_style(category: str) -> str | None:
    """The query style of a BFCL category (simple_java -> simple, live_multiple -> multiple, ...)."""
    base = category.removeprefix("live_")
    if base.startswith("simple"):
        return "simple"
    if base in ("multiple", "parallel", "parallel_multiple"):
        return base
    if base == "irrelevance":
        return "irrelevance"
    return None


# -- format ------------------------------------------------------------------------------------------
def _is_strict_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer))


@functools.lru_cache(maxsize=4096)
def _validator(schema_text: str) -> Any:
    """A closed-schema validator per tool schema, cached: the same tools are checked thousands of times."""
    return _StrictValidator(closed_schema(json.loads(schema_text)),
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def format_failures(calls: list[ToolCall], tools: list[ToolSpec]) -> list[Failure]:
    """Every schema violation of every call, and repeated identical calls."""
    by_name = {t.name: t for t in tools}
    out: list[Failure] = []
    seen: set[str] = set()
    for i, call in enumerate(calls):
        spec = by_name.get(call.name)
        if spec is None:
            out.append(Failure("format", "unknown_function", f"call {i}: {call.name!r} is not among the tools"))
            continue
        v = _validator(json.dumps(spec.parameters, sort_keys=True))
        for e in sorted(v.iter_errors(call.arguments), key=lambda e: (list(map(str, e.path)), e.validator)):
            path = "/".join(map(str, e.absolute_path)) or "<arguments>"
            out.append(Failure("format", _CODES.get(str(e.validator), str(e.validator)),
                               f"call {i} {call.name}: {path}: {e.message}"))
        key = json.dumps([call.name, call.arguments], sort_keys=True)
        if key in seen:
            out.append(Failure("format", "duplicate_call", f"call {i} {call.name} repeats an earlier call"))
        seen.add(key)
    return out


def style_failures(calls: list[ToolCall], style: str | None, note: str | None = None) -> list[Failure]:
    """The answer's shape against the style: simple/multiple one call, parallel >= 2 of one function,
    parallel_multiple >= 2 across >= 2 functions, irrelevance none."""
    n, names = len(calls), {c.name for c in calls}
    why = f" ({note})" if note else ""
    if style == "irrelevance":
        return [Failure("format", "unexpected_call", f"{n} call(s) where no function fits")] if n else []
    if style is None:
        return []
    if n == 0:
        return [Failure("format", "no_call", f"a {style} query needs a call; the answer is text{why}")]
    if style in ("simple", "multiple") and n != 1:
        return [Failure("format", "call_count", f"a {style} query needs exactly 1 call, got {n}")]
    if style == "parallel" and (n < 2 or len(names) != 1):
        return [Failure("format", "call_count", f"a parallel query needs >= 2 calls of one function, got {n} "
                                                f"call(s) of {sorted(names)}")]
    if style == "parallel_multiple" and (n < 2 or len(names) < 2):
        return [Failure("format", "call_count", f"a parallel_multiple query needs >= 2 calls of >= 2 functions, "
                                                f"got {n} call(s) of {sorted(names)}")]
    return []


# -- semantic ----------------------------------------------------------------------------------------
class Verdict(BaseModel):
    """The judge's verdict; `pass` must be a JSON boolean ("yes", 1 or "true" are not verdicts)."""

    model_config = ConfigDict(strict=True, populate_by_name=True, extra="ignore")

    thought: str
    passed: bool = Field(alias="pass")


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"thought": {"type": "string", "maxLength": 400, "description": "one or two sentences of reasoning"},
                   "pass": {"type": "boolean"}},
    "required": ["thought", "pass"],
}


def parse_verdict(value: Any) -> tuple[Verdict | None, str | None]:
    """A decoded JSON value -> Verdict, or the reason it is not one."""
    if not isinstance(value, dict):
        return None, f"verdict is not a JSON object (got {type(value).__name__})"
    try:
        return Verdict.model_validate(value), None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "verdict"
        return None, f"verdict field {loc!r}: {err.get('msg')}"


# -- counting ----------------------------------------------------------------------------------------
@dataclass
class StageTable:
    """Generated, per-stage failures (with reason codes) and kept, as in APIGen's table."""

    generated: int = 0
    failed: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    reasons: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STAGES})
    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # stages not run, e.g. no --exec-module

    def fail(self, failures: list[Failure]) -> None:
        """Count one rejected item at its first failing stage; every reason code is tallied."""
        if not failures:
            return
        stage = failures[0].stage
        self.failed[stage] += 1
        for f in failures:
            if f.stage == stage:
                self.reasons[stage][f.code] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"generated": self.generated, "failed": dict(self.failed),
                "reasons": {s: dict(sorted(c.items())) for s, c in self.reasons.items() if c},
                "kept": self.kept, "skipped_stages": self.skipped,
                "consistent": self.generated == self.kept + sum(self.failed.values())}

    def row(self) -> dict[str, int]:
        return {"generated": self.generated, "fail format": self.failed["format"],
                "fail execution": self.failed["execution"], "fail semantic": self.failed["semantic"],
                "duplicates": self.failed["duplicates"], "contaminated": self.failed["contamination"],
                "kept": self.kept}

    def markdown(self, title: str | None = None) -> str:
        row = self.row()
        lines = [f"### {title}", ""] if title else []
        lines += ["| " + " | ".join(row) + " |", "|" + "---:|" * len(row),
                  "| " + " | ".join(str(v) for v in row.values()) + " |", ""]
        for stage in STAGES:
            if self.reasons[stage]:
                lines.append(f"- {stage}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons[stage].items())))
        for stage, why in self.skipped.items():
            lines.append(f"- {stage}: not run ({why})")
        return "\n".join(lines) + "\n"
