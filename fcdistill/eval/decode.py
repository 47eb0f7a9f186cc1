"""Reading calls out of an answer: an OpenAI tool_calls reply, or prompt-mode text in BFCL's python
syntax. Decoding never raises: malformed output becomes a reason, which scoring reports and the
multi-turn loop treats as the end of a turn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fcdistill.tools import ToolCall


@dataclass
class Decoded:
    """Calls read from one answer, or why none could be read."""

    calls: list[ToolCall] = field(default_factory=list)
    text: str | None = None
    malformed: str | None = None  # the answer tried to call but could not be decoded


def decode_fc(output: dict[str, Any]) -> Decoded:
    """Calls from an OpenAI tool_calls reply; names the endpoint needed changed are mapped back."""
    back = output.get("name_map") or {}
    text = output.get("content")
    tool_calls = output.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        return Decoded(text=text, malformed="tool_calls is not a list")
    calls: list[ToolCall] = []
    for i, tc in enumerate(tool_calls):
        name = tc.get("name") if isinstance(tc, dict) else None
        if not isinstance(name, str) or not name:
            return Decoded(text=text, malformed=f"call {i} has no function name")
        name = back.get(name, name)
        raw = tc.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            return Decoded(text=text, malformed=f"call {i} ({name}): arguments are not JSON ({exc.msg} at char {exc.pos})")
        if not isinstance(args, dict):
            return Decoded(text=text, malformed=f"call {i} ({name}): arguments are not a JSON object")
        calls.append(ToolCall(name=name, arguments=args))
    return Decoded(calls=calls, text=text)


def decode_prompt(text: str | None, language: str) -> Decoded:
    """Prompt mode: the reply text read by bfcl_eval's own python-syntax decoder."""
    from fcdistill.chat_format import parse_python_calls

    text = text or ""
    try:
        parsed = parse_python_calls(text, language)
    except Exception as exc:  # e.g. a decoded call whose arguments are not a mapping
        return Decoded(text=text, malformed=f"decoded calls have an unexpected shape: {type(exc).__name__}"[:300])
    if parsed.error:
        # Plain prose is what a no-call answer looks like in prompt mode: no call, not a malformed one.
        return Decoded(text=text, malformed=parsed.error if text.lstrip().startswith("[") else None)
    return Decoded(calls=list(parsed.tool_calls), text=None)


def decode(output: dict[str, Any], language: str) -> Decoded:
    if output.get("mode") == "prompt":
        return decode_prompt(output.get("content"), language)
    return decode_fc(output)
