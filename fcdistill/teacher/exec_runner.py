"""Runs ONE user-supplied tool implementation in its own process (started by execute.py).

argv[1] is the implementation module's path; stdin is `{"name": ..., "arguments": {...}}`. The call
comes in as JSON data and is applied as keyword arguments: nothing from the model is evaluated. The
last stdout line is the JSON result; the user's own prints go to stderr so they cannot forge it.
"""

import contextlib
import importlib.util
import json
import sys


def _resolve(module, name):
    table = getattr(module, "TOOLS", None)  # optional {"tool.name": callable}, for dotted names
    if isinstance(table, dict) and name in table:
        return table[name]
    target = module
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def main() -> None:
    request = json.loads(sys.stdin.read())
    name, arguments = request["name"], request["arguments"]
    out = {"ok": False, "error": "internal"}
    with contextlib.redirect_stdout(sys.stderr):
        try:
            spec = importlib.util.spec_from_file_location("fcd_user_tools", sys.argv[1])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # the module itself is broken: say so, once per call
            out = {"ok": False, "error": f"cannot import implementations: {type(exc).__name__}: {exc}"}
        else:
            fn = _resolve(module, name)
            if not callable(fn):
                out = {"ok": False, "error": f"no implementation for {name!r}"}
            else:
                try:
                    out = {"ok": True, "result": fn(**arguments)}
                except Exception as exc:
                    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(out, default=repr, ensure_ascii=False)
    if len(text) > 20000:  # keep results small: they go into the judge's prompt
        text = json.dumps({"ok": out["ok"], "result": repr(out.get("result"))[:2000] + "...(truncated)"})
    sys.stdout.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
