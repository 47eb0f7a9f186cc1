"""Asking the teacher: function calls and JSON values read out of its replies.

`TeacherClient` is the neutral client (fcdistill.client: transport, retries, cache, limits) plus the
teacher's two questions: `ask_calls` (function calls, in tools or prompt mode) and `ask_json`
(structured replies as text, as response_format json_schema, or as a forced schema-tool call). They
interpret replies and never raise on malformed output: they return it with a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from fcdistill.chat_format import parse_python_calls
from fcdistill.client.cache import ResponseCache
from fcdistill.client.http import Client
from fcdistill.teacher.config import TeacherConfig
from fcdistill.tools import ToolCall, ToolSpec, safe_tool_names


@dataclass
class CallAnswer:
    """Function calls the teacher made (or its text), with why they could not be read if so."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None
    error: str | None = None  # malformed calls
    truncated: bool = False  # the reply hit max_tokens (finish_reason "length") before its calls were whole
    note: str | None = None  # prompt mode: why the text was not read as calls
    transport_error: str | None = None
    cached: bool = False


@dataclass
class JsonAnswer:
    value: Any = None
    error: str | None = None
    transport_error: str | None = None
    raw: str | None = None


def strip_fences(text: str) -> str:
    """Text without one surrounding markdown code fence (```json ... ```), which chat models add."""
    s = text.strip()
    m = re.fullmatch(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```", s, flags=re.S)
    return m.group(1).strip() if m else s


class TeacherClient(Client):
    """The client for one teacher endpoint; use as `async with TeacherClient(cfg) as t:`."""

    cfg: TeacherConfig

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache | None = None, measure: bool = False):
        super().__init__(cfg, cache=cache, measure=measure)

    async def __aenter__(self) -> "TeacherClient":
        return self

    async def ask_calls(self, messages: list[dict[str, Any]], tools: list[ToolSpec], *, sample: int | None = None,
                        tool_choice: Any = "auto", record_id: str = "item", language: str = "python",
                        system: str | None = None) -> CallAnswer:
        """The teacher's answer to a question with tools: calls (names restored) or text."""
        msgs = [dict(m) for m in messages]
        if system:
            msgs = _with_system(msgs, system)
        if self.cfg.mode == "prompt":
            from fcdistill.bfcl_env import bfcl_import

            add_system = bfcl_import("bfcl_eval.model_handler.utils", "system_prompt_pre_processing_chat_model")
            msgs = add_system(msgs, [t.model_dump() for t in tools], record_id.replace(":", "_"))
            reply = await self.chat(msgs, sample=sample)
            if reply.error:
                return CallAnswer(transport_error=reply.error)
            text = reply.content or ""
            parsed = parse_python_calls(text, language) if text.strip() else None
            if parsed is None or parsed.error or not parsed.tool_calls:
                note = parsed.error if parsed is not None else "empty reply"
                if reply.finish_reason == "length" and text.lstrip().startswith("["):
                    return CallAnswer(content=text, cached=reply.cached, truncated=True,
                                      error="calls cut off at max_tokens (finish_reason length)")
                return CallAnswer(content=text, note=note, cached=reply.cached)
            return CallAnswer(calls=parsed.tool_calls, cached=reply.cached)
        names = safe_tool_names(tools)
        back = {v: k for k, v in names.items()}
        api_tools = [{"type": "function", "function": {"name": names[t.name], "description": t.description,
                                                       "parameters": t.parameters}} for t in tools]
        choice = tool_choice
        if isinstance(tool_choice, dict) and tool_choice.get("function", {}).get("name") in names:
            choice = {"type": "function", "function": {"name": names[tool_choice["function"]["name"]]}}
        reply = await self.chat(msgs, api_tools, choice, sample=sample)
        if reply.error:
            return CallAnswer(transport_error=reply.error)
        if reply.finish_reason == "length" and not reply.tool_calls:  # a cut-off answer is no target
            return CallAnswer(content=reply.content, cached=reply.cached, truncated=True,
                              error="reply cut off at max_tokens (finish_reason length)")
        calls: list[ToolCall] = []
        for i, tc in enumerate(reply.tool_calls):
            name = back.get(tc["name"], tc["name"])
            raw = tc.get("arguments") or "{}"
            try:
                args = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError as exc:
                return CallAnswer(content=reply.content, cached=reply.cached,
                                  error=f"call {i} ({name}): arguments are not JSON ({exc.msg})")
            if not isinstance(args, dict):
                return CallAnswer(content=reply.content, cached=reply.cached,
                                  error=f"call {i} ({name}): arguments are not a JSON object")
            try:
                calls.append(ToolCall(name=name, arguments=args))
            except ValueError:
                return CallAnswer(content=reply.content, cached=reply.cached, error=f"call {i} has no function name")
        return CallAnswer(calls=calls, content=reply.content, cached=reply.cached)

    async def ask_json(self, messages: list[dict[str, Any]], schema: dict[str, Any], tool_name: str, *,
                       sample: int | None = None, max_tokens: int | None = None,
                       temperature: float | None = None) -> JsonAnswer:
        """A JSON value: parsed from the message text (free, or constrained by response_format's
        json_schema), or from the arguments of a forced call to a schema tool."""
        if self.cfg.structured == "tool":
            tool = {"type": "function", "function": {"name": tool_name, "description": "Submit the answer.",
                                                     "parameters": schema}}
            reply = await self.chat(messages, [tool], {"type": "function", "function": {"name": tool_name}},
                                    sample=sample, max_tokens=max_tokens, temperature=temperature)
            if reply.error:
                return JsonAnswer(transport_error=reply.error)
            call = next((c for c in reply.tool_calls if c["name"] == tool_name), None)
            if call is None:
                cut = " (cut off at max_tokens)" if reply.finish_reason == "length" else ""
                return JsonAnswer(error=f"no {tool_name} call in the reply{cut}", raw=reply.content)
            return _json_value(call.get("arguments") or "", reply.finish_reason)
        fmt = {"type": "json_schema", "json_schema": {"name": tool_name, "schema": schema}} \
            if self.cfg.structured == "schema" else None
        reply = await self.chat(messages, sample=sample, max_tokens=max_tokens, temperature=temperature,
                                response_format=fmt)
        if reply.error:
            return JsonAnswer(transport_error=reply.error)
        return _json_value(reply.content or "", reply.finish_reason)


def _with_system(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0].get('content') or ''}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _json_value(text: str, finish_reason: str | None = None) -> JsonAnswer:
    """Strict JSON (one surrounding code fence allowed): anything else is an error with its reason."""
    try:
        return JsonAnswer(value=json.loads(strip_fences(text)), raw=text)
    except json.JSONDecodeError as exc:
        snippet = text.strip().replace("\n", " ")[:60]
        cut = "cut off at max_tokens, " if finish_reason == "length" else ""
        return JsonAnswer(error=f"not JSON ({cut}{exc.msg} at char {exc.pos}): {snippet!r}", raw=text)
