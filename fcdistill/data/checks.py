"""Checks of a call answer against its tools and its query style, each failure with a stage, a code and a detail.

Used wherever data is made or accepted: BFCL records and augmentation here, teacher labels, `fcd synth`
and `fcd verify` in teacher/ (which import them from here: data is upstream of teacher).

- format: every call (not only the first) against its tool's JSON Schema through `tools.call_violations`,
  the one validator the server uses too: required, types (integer means a JSON integer, never 3.0 or
  true: BFCL's rule), null, enum, bounds incl. exclusive ones, lengths, patterns, formats, nested
  objects and arrays, no unknown arguments (schemas are closed), no unknown functions; repeated
  identical calls;
- style: the shape the query style asks for (one call, several, none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fcdistill.tools import ToolCall, ToolSpec, call_violations, tool_validators

_CODES = {
    "required": "missing_required", "additionalProperties": "unknown_argument",
    "unevaluatedProperties": "unknown_argument", "type": "type", "enum": "enum", "const": "enum",
    "minimum": "bounds", "maximum": "bounds", "exclusiveMinimum": "bounds", "exclusiveMaximum": "bounds",
    "minLength": "length", "maxLength": "length", "minItems": "length", "maxItems": "length",
    "pattern": "pattern", "format": "format", "uniqueItems": "unique_items", "unknown_function": "unknown_function",
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


def format_failures(calls: list[ToolCall], tools: list[ToolSpec]) -> list[Failure]:
    """Every schema violation of every call, and repeated identical calls."""
    validators = tool_validators(tools) if calls else {}
    out: list[Failure] = []
    seen: set[str] = set()
    for i, call in enumerate(calls):
        for v in call_violations(call, tools, validators):
            if v.keyword == "unknown_function":
                out.append(Failure("format", "unknown_function", f"call {i}: {v.message}"))
            else:
                out.append(Failure("format", _CODES.get(v.keyword, v.keyword), f"call {i} {call.name}: {v.path}: {v.message}"))
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
