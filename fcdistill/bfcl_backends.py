"""bfcl_eval's multi-turn backends (file system, messages, posts, tickets, trading, travel, vehicle,
math), called by name with parsed arguments.

They are pure-Python simulations, so they run in process, one fresh set per conversation. bfcl runs a
call by `eval` of its text; here a call is dispatched to a public method of the conversation's
instances, and call text (bfcl's ground truth) is read with `ast`, literal arguments only: neither
model output nor data ever runs as code. Results are the strings bfcl sends back. Used by the eval's
conversation loop and scoring, and by the data stage to replay ground truth into training conversations.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
from typing import Any

# bfcl refuses these names before its eval; the same message keeps tool results identical
_REFUSED = frozenset({"kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run"})


def result_text(result: Any) -> str:
    """A backend's return value as bfcl sends it back: strings as they are, dicts as JSON."""
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


def parse_call_text(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """`mv(source='a', destination='b')` -> name, positional and keyword arguments. Only literal
    arguments are read (ast.literal_eval); anything else is a ValueError, never executed."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"not a call: {exc.msg}") from None
    if not isinstance(node, ast.Call):
        raise ValueError("not a call")
    func = node.func
    if isinstance(func, ast.Attribute):
        name = func.attr
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        raise ValueError("the called thing is not a name")
    if any(k.arg is None for k in node.keywords) or any(isinstance(a, ast.Starred) for a in node.args):
        raise ValueError("*args and **kwargs are not read")
    return name, [ast.literal_eval(a) for a in node.args], {k.arg: ast.literal_eval(k.value) for k in node.keywords}


class Backends:
    """bfcl_eval's backend instances for one conversation, loaded with its initial state."""

    def __init__(self, involved_classes: list[str], initial_config: dict[str, Any], long_context: bool) -> None:
        from fcdistill.bfcl_env import bfcl_import

        config = bfcl_import("bfcl_eval.constants.executable_backend_config")
        self.instances: dict[str, Any] = {}
        self._methods: dict[str, Any] = {}
        for class_name in involved_classes:
            module = importlib.import_module(config.CLASS_FILE_PATH_MAPPING[class_name])
            instance = getattr(module, class_name)()
            if class_name not in config.STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(initial_config.get(class_name, {})), long_context=long_context)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self._methods[name] = method  # a later class wins a shared name, as in bfcl

    def call(self, name: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        """Run one call; an unknown name or a failing call is an error string, as bfcl reports it."""
        if name in _REFUSED:
            return f"Error during execution: Function call {name} is not allowed."
        method = self._methods.get(name)
        if method is None:
            return f"Error during execution: name '{name}' is not defined"
        try:
            return result_text(method(*(args or []), **(kwargs or {})))
        except Exception as exc:  # a backend's own error (bad argument, missing file): what bfcl returns
            return f"Error during execution: {exc}"

    def named_call(self, text: str) -> tuple[str, dict[str, Any]]:
        """A call text's name and arguments, every argument by name (positional ones named from the
        method's signature: bfcl writes `sort('report.pdf')`, a tool call carries `{"file_name": ...}`)."""
        name, args, kwargs = parse_call_text(text)
        method = self._methods.get(name)
        if method is None:
            raise ValueError(f"{text!r} calls {name!r}, which no backend of this conversation has")
        try:
            return name, dict(inspect.signature(method).bind(*args, **kwargs).arguments)
        except TypeError as exc:
            raise ValueError(f"{text!r}: {exc}") from None

    def call_text(self, text: str) -> str:
        try:
            name, args, kwargs = parse_call_text(text)
        except ValueError as exc:
            return f"Error during execution: {exc}"
        return self.call(name, args, kwargs)


def turn_start(entry: dict[str, Any], turn: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What opens a turn as `bfcl generate` opens it: the function docs miss_func held back until this
    turn (they join the tools), and the user messages (bfcl's own prompt on a turn that adds docs)."""
    from fcdistill.bfcl_env import bfcl_import

    added = (entry.get("missed_function") or {}).get(str(turn))
    if not added:
        return [], copy.deepcopy(entry["question"][turn])
    prompts = bfcl_import("bfcl_eval.constants.default_prompts")
    return copy.deepcopy(added), [{"role": "user", "content": prompts.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC}]


def is_long_context(category: str) -> bool:
    return "long_context" in category
