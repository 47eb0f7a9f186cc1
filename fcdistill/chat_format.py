"""The wire format: the one place that turns conversations into student text and back.

A prompt is the student's own chat template around our messages, with the tools rendered once by
this module into the system message (compact JSON, one line a tool). An assistant turn that calls
tools is exactly `FC` + a JSON array of `{"name", "arguments"}` + end-of-turn; a plain answer is
text + end-of-turn. Train renders targets with it, serve renders prompts and parses completions with
it, eval and the teacher parse with it. Nothing else formats a prompt or parses a call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fcdistill.tools import ToolCall, ToolSpec, normalize_tools

DEFAULT_FC_TOKEN = "<tool_call>"
TOOLS_HEADER = "# Functions"
_TOOLS_INSTRUCTION = (
    "{header}\nYou may call the functions below, one JSON object a line. To call, reply with {fc} "
    'followed by a JSON list of {{"name": ..., "arguments": {{...}}}} objects and nothing else. '
    "If no function fits, or a required argument is missing, answer in plain text.\n"
)


class Message(BaseModel):
    """One chat turn, OpenAI-shaped; assistant calls are ToolCalls, tool results carry the name."""

    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None  # for role tool: the function whose result this is
    tool_call_id: str | None = Field(default=None, exclude=True)  # transport only, not rendered


class ParsedCompletion(BaseModel):
    """What a completion means: text, calls, and why it was not a clean call when it was not."""

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    error: str | None = None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def as_messages(messages: list[Any]) -> list[Message]:
    """Accept OpenAI-style dicts (tool_calls with JSON-string arguments) or Messages."""
    out: list[Message] = []
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected an object")
        calls = []
        for j, tc in enumerate(m.get("tool_calls") or []):
            fn = tc.get("function", tc) if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"messages[{i}].tool_calls[{j}]: needs function.name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as exc:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].arguments: not JSON ({exc.msg})") from None
            if not isinstance(args, dict):
                raise ValueError(f"messages[{i}].tool_calls[{j}].arguments: must be a JSON object")
            calls.append(ToolCall(name=fn["name"], arguments=args))
            if isinstance(tc, dict) and tc.get("id"):
                names_by_id[tc["id"]] = fn["name"]
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        name = m.get("name")
        if m.get("role") == "tool" and not name:
            name = names_by_id.get(m.get("tool_call_id") or "")
        out.append(Message(role=m.get("role"), content=content, tool_calls=tuple(calls), name=name,
                           tool_call_id=m.get("tool_call_id")))
    return out


class ChatFormat:
    """The contract, bound to one student's chat template, FC token and end-of-turn text.

    The tokenizer is needed only to render whole prompts; rendering targets and parsing work
    without one (eot then defaults to `<|im_end|>`, the ChatML end-of-turn).
    """

    def __init__(self, tokenizer: Any = None, fc_token: str = DEFAULT_FC_TOKEN, eot: str | None = None):
        if not fc_token or fc_token.strip() != fc_token:
            raise ValueError(f"FC token must be non-empty text without surrounding spaces, got {fc_token!r}")
        self.tokenizer = tokenizer
        self.fc_token = fc_token
        self.eot = eot or (getattr(tokenizer, "eos_token", None) if tokenizer is not None else None) or "<|im_end|>"

    # -- tools in the system message -------------------------------------------------------------
    def tools_block(self, tools: list[ToolSpec]) -> str:
        """One line a tool. Schema keys are sorted: a client's key order (or a JSONL file's, written
        sorted) must not change the prompt, or training and serving would show the same tool twice
        differently."""
        lines = [_compact({**t.model_dump(), "parameters": json.loads(json.dumps(t.parameters, sort_keys=True))})
                 for t in tools]
        return _TOOLS_INSTRUCTION.format(header=TOOLS_HEADER, fc=self.fc_token) + "\n".join(lines)

    def _split_system(self, text: str) -> tuple[str | None, list[ToolSpec]]:
        marker = _TOOLS_INSTRUCTION.format(header=TOOLS_HEADER, fc=self.fc_token)
        idx = text.rfind(marker)
        if idx < 0:
            return text, []
        body = text[idx + len(marker):]
        tools = normalize_tools([json.loads(line) for line in body.split("\n") if line])
        if idx == 0:
            return None, tools
        return text[:idx].removesuffix("\n\n"), tools

    # -- messages <-> template input -------------------------------------------------------------
    def encode_messages(self, messages: list[Any], tools: list[Any] | None = None) -> list[dict[str, str]]:
        """Text-only `{"role","content"}` messages for the chat template; tools go into the system turn."""
        msgs = as_messages(messages)
        specs = normalize_tools(tools or [])
        out: list[dict[str, str]] = []
        system_parts: list[str] = []
        if msgs and msgs[0].role == "system":
            system_parts.append(msgs[0].content or "")
            msgs = msgs[1:]
        if specs:
            system_parts.append(self.tools_block(specs))
        if system_parts:
            out.append({"role": "system", "content": "\n\n".join(system_parts)})
        for m in msgs:
            if m.role == "system":
                out.append({"role": "system", "content": m.content or ""})
            elif m.role == "assistant":
                out.append({"role": "assistant", "content": self.render_assistant(m.content, m.tool_calls)})
            elif m.role == "tool":
                out.append({"role": "tool", "content": _dumps({"name": m.name, "content": m.content})})
            else:
                out.append({"role": m.role, "content": m.content or ""})
        return out

    def decode_messages(self, encoded: list[dict[str, str]]) -> tuple[list[Message], list[ToolSpec]]:
        """Invert encode_messages (tool_call ids are transport, not content, and do not round-trip)."""
        messages: list[Message] = []
        tools: list[ToolSpec] = []
        for i, m in enumerate(encoded):
            role, text = m["role"], m["content"]
            if role == "system" and i == 0:
                content, tools = self._split_system(text)
                if content is not None or not tools:
                    messages.append(Message(role="system", content=content if content is not None else ""))
            elif role == "assistant":
                parsed = self.parse(text)
                messages.append(Message(role="assistant", content=parsed.content, tool_calls=tuple(parsed.tool_calls)))
            elif role == "tool":
                obj = json.loads(text)
                messages.append(Message(role="tool", name=obj["name"], content=obj["content"]))
            else:
                messages.append(Message(role=role, content=text))
        return messages, tools

    def render_prompt(self, messages: list[Any], tools: list[Any] | None = None) -> str:
        """The student's prompt text, ending where the assistant's answer starts."""
        if self.tokenizer is None:
            raise ValueError("rendering a prompt needs the student's tokenizer (chat template)")
        return self.tokenizer.apply_chat_template(self.encode_messages(messages, tools), tokenize=False,
                                                  add_generation_prompt=True)

    # -- assistant turns -------------------------------------------------------------------------
    def render_assistant(self, content: str | None, tool_calls: tuple[ToolCall, ...] | list[ToolCall] = ()) -> str:
        """An assistant turn's text without end-of-turn: [content] + FC + JSON array of calls."""
        if not tool_calls:
            return content or ""
        body = _compact([{"name": c.name, "arguments": c.arguments} for c in tool_calls])
        return f"{content or ''}{self.fc_token}{body}"

    def render_target(self, content: str | None = None, tool_calls: tuple[ToolCall, ...] | list[ToolCall] = ()) -> str:
        """The training completion: the assistant turn followed by end-of-turn."""
        return self.render_assistant(content, tool_calls) + self.eot

    def call_texts(self, completion: str) -> list[str]:
        """The generated text of each complete call object after the FC token, in order: what the loop
        guard compares to count copies of a call."""
        at = completion.find(self.fc_token)
        if at < 0:
            return []
        body = completion[at + len(self.fc_token):]
        return [body[c.start:c.end] for c in _scan_partial_calls(body) if c.end is not None]

    def parse(self, completion: str) -> ParsedCompletion:
        """(content, tool_calls) from a completion; malformed calls come back as text with a reason.

        Generation may run past end-of-turn (no stop token): anything after it is ignored.
        """
        idx = completion.find(self.fc_token)
        eot = completion.find(self.eot)
        if idx < 0 or 0 <= eot < idx:
            return ParsedCompletion(content=completion[:eot] if eot >= 0 else completion)
        calls, rest, error = _parse_calls(completion[idx + len(self.fc_token):])
        if error is None and rest.strip() and not rest.lstrip().startswith(self.eot):
            error = f"unexpected text after the calls: {rest.strip()[:40]!r}"
        if error is not None:
            return ParsedCompletion(content=completion[:eot] if eot >= 0 else completion, error=error)
        return ParsedCompletion(content=completion[:idx] or None, tool_calls=calls)


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


# Calls must survive re-serialization as strict JSON: no NaN/Infinity, no overflowing floats.
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def _parse_calls(body: str) -> tuple[list[ToolCall], str, str | None]:
    """Calls decoded from the JSON right after FC, the text after them, and an error if malformed."""
    stripped = body.lstrip()
    if not stripped:
        return [], "", "function-call token with no calls after it"
    try:
        value, end = _DECODER.raw_decode(stripped)
    except json.JSONDecodeError as exc:
        return [], "", f"calls are not valid JSON: {exc.msg} at char {exc.pos}"
    except ValueError as exc:
        return [], "", str(exc)
    rest = stripped[end:]
    items = value if isinstance(value, list) else [value]
    if not items:
        return [], rest, "empty list of calls"
    calls: list[ToolCall] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return [], rest, f"call {i} is not an object"
        name, args = item.get("name"), item.get("arguments", {})
        if not isinstance(name, str) or not name:
            return [], rest, f"call {i} has no function name"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return [], rest, f"call {i} ({name}) has arguments that are not JSON"
        if not isinstance(args, dict):
            return [], rest, f"call {i} ({name}) has arguments that are not an object"
        extra = set(item) - {"name", "arguments"}
        if extra:
            return [], rest, f"call {i} ({name}) has unexpected keys {sorted(extra)}"
        calls.append(ToolCall(name=name, arguments=args))
    return calls, rest, None


# -- streaming: tool calls as they are generated -------------------------------------------------
@dataclass
class CallDelta:
    """One streamed piece of a call: its name on the first piece, fragments of its arguments' JSON after."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class _Partial:
    start: int  # where the call's object starts in the body
    name: str | None = None
    args_start: int | None = None  # where the arguments' value starts in the body
    args_end: int | None = None  # where it ends, once it is complete
    args_is_object: bool = False
    end: int | None = None  # just after the call's object, once it is complete


def first_copies(calls: list[ToolCall], texts: list[str], limit: int = 1) -> list[ToolCall]:
    """The calls without the copies of one call beyond its first `limit`. Two calls are the same when
    their generated text is (`ChatFormat.call_texts`), as the loop guard counts them; `texts` that do not
    line up with `calls` leave them as they are."""
    if len(texts) != len(calls):
        return calls
    seen: dict[str, int] = {}
    out = []
    for c, text in zip(calls, texts):
        seen[text] = seen.get(text, 0) + 1
        if seen[text] <= limit:
            out.append(c)
    return out


def _scan_partial_calls(body: str) -> list[_Partial]:
    """The calls in a prefix of the JSON after the FC token (`[{"name": ..., "arguments": {...}}, ...]`
    or one object): each one's name once its string is complete, and where its arguments' text lies."""
    calls: list[_Partial] = []
    depth, level = 0, None  # the depth of call objects: 2 in a list, 1 for a lone object
    in_str = esc = False
    key = None  # the call object's key whose value comes next
    str_start = 0
    expect_key = False
    for i, ch in enumerate(body):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == level:
                    text = body[str_start:i + 1]
                    try:
                        value = json.loads(text)
                    except json.JSONDecodeError:
                        return calls
                    if expect_key:
                        key, expect_key = value, False
                    elif key == "name" and calls:
                        calls[-1].name = value if isinstance(value, str) else None
            continue
        if ch.isspace():
            continue
        if level is None:
            level = 2 if ch == "[" else 1
        if ch == ":":
            continue
        if depth == level and key == "arguments" and calls and calls[-1].args_start is None:
            calls[-1].args_start, calls[-1].args_is_object = i, ch == "{"
        if ch == '"':
            in_str, str_start = True, i
        elif ch in "{[":
            depth += 1
            if depth == level and ch == "{":
                calls.append(_Partial(start=i))
                expect_key = True
        elif ch in "}]":
            if depth == level + 1 and key == "arguments" and calls and calls[-1].args_end is None:
                calls[-1].args_end = i + 1
            if depth == level and ch == "}" and calls:
                calls[-1].end = i + 1
            depth -= 1
            if depth < level:
                key = None
        elif ch == "," and depth == level:
            if key == "arguments" and calls and calls[-1].args_end is None:
                calls[-1].args_end = i  # a scalar value
            expect_key, key = True, None
    return calls


class CallStreamer:
    """Tool calls in OpenAI's streamed shape, read from a completion as it grows: a first delta with a
    call's name once the name is complete, then fragments of its arguments' JSON text as they are
    generated (the raw text: the fragments joined are the model's arguments).

    `stream_arguments(name)` says whether that function's arguments may stream before they are
    checked; a call whose arguments may not comes whole when `finish` is given the checked calls.

    `copies` (the server's loop guard is on: its `same_calls`): a copy of a call beyond the first `copies`
    of it is never sent (`first_copies`). While a new call's text is still the start of a call that has
    all its copies already it is held back; once it differs it streams, and if it ends as one more copy
    it is dropped unseen.
    """

    def __init__(self, fc_token: str, stream_arguments: Any = None, copies: int | None = None):
        self.fc_token = fc_token
        self.stream_arguments = stream_arguments or (lambda name: True)
        self.copies = copies
        self.sent: list[tuple[str, int]] = []  # per announced call: its name, argument characters sent
        self._announced: dict[int, int] = {}  # body index of a call -> its index in `sent`

    def _repeats(self, body: str, calls: list[_Partial], i: int) -> bool | None:
        """True: call i is a copy beyond the limit; None: it may still become one; False: it cannot."""
        if self.copies is None:
            return False
        call = calls[i]
        text = body[call.start:call.end] if call.end is not None else body[call.start:]
        counts: dict[str, int] = {}
        for c in calls[:i]:
            if c.end is not None:
                counts[body[c.start:c.end]] = counts.get(body[c.start:c.end], 0) + 1
        if call.end is not None:
            return counts.get(text, 0) >= self.copies
        return None if any(n >= self.copies and e.startswith(text) for e, n in counts.items()) else False

    def feed(self, text: str) -> list[CallDelta]:
        """The new pieces, given the whole completion so far."""
        at = text.find(self.fc_token)
        if at < 0:
            return []
        body = text[at + len(self.fc_token):]
        out: list[CallDelta] = []
        calls = _scan_partial_calls(body)
        for i, call in enumerate(calls):
            if i not in self._announced:
                repeats = self._repeats(body, calls, i)
                if repeats:
                    continue  # a copy: never sent
                if repeats is None or call.name is None or call.args_start is None or not call.args_is_object \
                        or not self.stream_arguments(call.name):
                    break  # announced in order: a later call waits for this one
                self._announced[i] = len(self.sent)
                self.sent.append((call.name, 0))
                out.append(CallDelta(self._announced[i], name=call.name))
            k = self._announced[i]
            name, done = self.sent[k]
            args = body[call.args_start:call.args_end] if call.args_end is not None else body[call.args_start:]
            if len(args) > done:
                out.append(CallDelta(k, arguments=args[done:]))
                self.sent[k] = (name, len(args))
        return out

    def finish(self, calls: list[ToolCall]) -> list[CallDelta] | None:
        """The rest, given the checked calls: those not streamed yet, whole. None when what was streamed
        is not what was checked (the caller then reports the calls as the non-streamed path would)."""
        out: list[CallDelta] = []
        for i, call in enumerate(calls):
            if i < len(self.sent):
                if self.sent[i][0] != call.name:
                    return None
                continue
            out.append(CallDelta(i, name=call.name, arguments=_dumps(call.arguments)))
        return out if len(calls) >= len(self.sent) else None


# -- BFCL's python-syntax call format (prompt mode: teachers and models without tool support) ----
def render_python_calls(calls: list[ToolCall]) -> str:
    """`[f(a=1, b='x')]`, the call syntax BFCL's prompt-mode system prompt asks for."""
    parts = [f"{c.name}({', '.join(f'{k}={v!r}' for k, v in c.arguments.items())})" for c in calls]
    return f"[{', '.join(parts)}]"


def parse_python_calls(text: str, language: str = "python") -> ParsedCompletion:
    """Decode prompt-mode output with bfcl_eval's own AST decoder; never raises."""
    from fcdistill.bfcl_env import bfcl_import

    decode = bfcl_import("bfcl_eval.model_handler.utils", "default_decode_ast_prompting")
    return_format = bfcl_import("bfcl_eval.constants.enums", "ReturnFormat")
    try:
        decoded = decode(text, return_format(language))
    except Exception as exc:  # the decoder raises on anything it cannot read
        return ParsedCompletion(content=text, error=f"not a python-syntax call list: {type(exc).__name__}: {exc}"[:300])
    if not isinstance(decoded, list) or not all(isinstance(d, dict) and len(d) == 1 for d in decoded):
        return ParsedCompletion(content=text, error="decoded calls have an unexpected shape")
    return ParsedCompletion(tool_calls=[ToolCall(name=k, arguments=v) for d in decoded for k, v in d.items()])
