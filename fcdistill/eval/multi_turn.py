"""BFCL multi-turn: each conversation driven against an endpoint as `bfcl generate` drives it, then
judged by bfcl_eval's own multi-turn checker.

Why it is built this way:
- bfcl_eval's backends (file system, messages, posts, tickets, trading, travel, vehicle, math) are
  pure-Python simulations, so they run here, in process, one fresh set per conversation. bfcl runs a
  call by `eval` of its text; here a call is dispatched by name to a public method of the
  conversation's backends with its parsed arguments, so model output never runs as code. While
  bfcl's checker scores, its executor is swapped for the same dispatcher (call text read with `ast`,
  arguments as literals only): the state and response checks are bfcl's, and still nothing is eval'd.
- The loop is bfcl's `inference_multi_turn_FC`: a turn's user messages are added and the model asked;
  its calls run and the results go back as tool messages; the turn ends on an answer without a call
  (or one that does not decode). A turn that reaches `max_steps` steps ends the whole conversation,
  which bfcl scores as force-terminated. Functions that miss_func holds back join the tools at their
  turn, with bfcl's own user prompt. Results are the strings bfcl sends back, so a deterministic
  model sees the same conversation from either runner, and the two runners agree item by item.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fcdistill.bfcl_backends import Backends, is_long_context, turn_start
from fcdistill.tools import normalize_tools


def openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t.to_openai() for t in normalize_tools(functions)]


async def converse(client: Any, entry: dict[str, Any], category: str, max_steps: int,
                   tool_choice: str | None = None) -> dict[str, Any]:
    """One conversation: every turn, every step. Returns an output row's body: `turns` (per turn, per
    step: content, tool_calls, finish_reason, and the results sent back), `force_quit`, `usage`; or
    `error` and `status` when the endpoint failed or refused a request (the turns so far kept)."""
    from fcdistill.eval.decode import decode_fc

    functions = copy.deepcopy(entry["function"])
    backends = Backends(entry["involved_classes"], entry.get("initial_config") or {}, is_long_context(category))
    tools = openai_tools(functions)
    messages: list[dict[str, Any]] = []
    turns: list[list[dict[str, Any]]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    force_quit = False
    for t in range(len(entry["question"])):
        added, user_messages = turn_start(entry, t)
        if added:
            functions += added
            tools = openai_tools(functions)
        messages += user_messages
        steps: list[dict[str, Any]] = []
        turns.append(steps)
        while True:
            reply = await client.chat(messages, tools, tool_choice)
            if reply.error:
                return {"error": reply.error, "status": reply.status, "turns": turns, "usage": usage}
            for k in usage:
                usage[k] += int(reply.usage.get(k) or 0)
            step: dict[str, Any] = {"content": reply.content, "tool_calls": reply.tool_calls,
                                    "finish_reason": reply.finish_reason}
            if reply.forced_close:
                step["forced_close"] = reply.forced_close
            steps.append(step)
            ids = [f"call_{t}_{len(steps) - 1}_{i}" for i in range(len(reply.tool_calls))]
            assistant: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.tool_calls:
                assistant["tool_calls"] = [{"id": i, "type": "function", "function": tc}
                                           for i, tc in zip(ids, reply.tool_calls)]
            messages.append(assistant)
            decoded = decode_fc(step)
            if decoded.malformed or not decoded.calls:
                break
            step["results"] = [backends.call(c.name, kwargs=dict(c.arguments)) for c in decoded.calls]
            messages += [{"role": "tool", "content": r, "tool_call_id": i} for r, i in zip(step["results"], ids)]
            if len(steps) > max_steps:
                force_quit = True
                break
        if force_quit:
            break
    return {"turns": turns, "force_quit": force_quit, "usage": usage}


def decoded_turns(turns: list[list[dict[str, Any]]]) -> list[list[list[str]]]:
    """Each turn's steps as bfcl's checker reads them: call texts, steps without a decodable call left
    out (bfcl's evaluator skips them the same way)."""
    from fcdistill.bfcl_env import bfcl_import
    from fcdistill.eval.decode import decode_fc

    to_text = bfcl_import("bfcl_eval.model_handler.utils", "convert_to_function_call")
    out: list[list[list[str]]] = []
    for steps in turns:
        kept = []
        for step in steps:
            decoded = decode_fc(step)
            if decoded.malformed or not decoded.calls:
                continue
            kept.append(to_text([{c.name: json.dumps(c.arguments)} for c in decoded.calls]))
        out.append(kept)
    return out


class _DispatchingExecutor:
    """Stands in for bfcl's `execute_multi_turn_func_call` while its checker runs: one Backends per
    (run name, entry), kept across turns as bfcl keeps its instances, calls dispatched, not eval'd."""

    def __init__(self) -> None:
        self.backends: dict[tuple[str, str, bool], Backends] = {}

    def __call__(self, func_call_list: list[str], initial_config: dict[str, Any], involved_classes: list[str],
                 model_name: str, test_entry_id: str, long_context: bool = False,
                 is_evaL_run: bool = False) -> tuple[list[str], dict[str, Any]]:
        key = (model_name, test_entry_id, is_evaL_run)
        if key not in self.backends:
            self.backends[key] = Backends(involved_classes, initial_config, long_context)
        b = self.backends[key]
        return [b.call_text(text) for text in func_call_list], dict(b.instances)


@contextmanager
def _dispatching(checker_module: Any) -> Iterator[None]:
    original = checker_module.execute_multi_turn_func_call
    checker_module.execute_multi_turn_func_call = _DispatchingExecutor()
    try:
        yield
    finally:
        checker_module.execute_multi_turn_func_call = original


def check_conversation(entry: dict[str, Any], ground_truth: list[list[str]],
                       output: dict[str, Any]) -> tuple[bool, str | None, str | None, list[list[list[str]]] | None]:
    """(valid, error_type, error, decoded turns) by bfcl's rules: a conversation cut short (force quit,
    or fewer turns than the ground truth) is wrong; otherwise bfcl_eval's multi_turn_checker decides."""
    from fcdistill.bfcl_env import bfcl_import

    if output.get("error"):
        return False, "endpoint_error", str(output["error"])[:300], None
    turns = output.get("turns") or []
    if len(turns) != len(ground_truth):
        return (False, "multi_turn:force_terminated",
                f"the conversation ended after {len(turns)} of {len(ground_truth)} turns (a turn reached the step limit)",
                None)
    decoded = decoded_turns(turns)
    module = bfcl_import("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
    entry = {k: v for k, v in entry.items() if k != "function"}
    with _dispatching(module):
        try:
            result = module.multi_turn_checker(decoded, ground_truth, copy.deepcopy(entry), entry["id"].rsplit("_", 1)[0],
                                               "fcdistill")
        except Exception as exc:  # the checker asserts on shapes it does not expect: wrong, with why
            return False, "checker:exception", f"multi_turn_checker raised {type(exc).__name__}: {exc}"[:300], decoded
    if result.get("valid"):
        return True, None, None, decoded
    return False, str(result.get("error_type") or "multi_turn:invalid"), str(result.get("error_message") or "")[:300], decoded
