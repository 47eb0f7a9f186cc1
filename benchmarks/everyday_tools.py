"""An everyday-tools check outside BFCL: does the student pick the right tool, fill its key
arguments, and stay quiet when no tool fits?

Ten tools and thirty short requests (`everyday_tools.json`, written for this project: twenty that
one tool serves, ten that none does). The base model and each given adapter are served by one
`fcd serve` and asked through the official openai client with `tool_choice: auto`, greedy.
Scored per model: right tool (first call's name), every key argument right, and no call where no
tool fits. Results go to reports/everyday_tools.json; a killed run starts over (it takes minutes).

Usage:
  .venv/bin/python benchmarks/everyday_tools.py --adapter gt=runs/a/train/adapter --adapter aug=runs/b/train/adapter \
      [--merged gt2=runs/c/export/merged]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASES = Path(__file__).with_name("everyday_tools.json")
RESULT = ROOT / "reports" / "everyday_tools.json"


def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value).strip().strip("'\"").rstrip(".").strip().lower()


def arg_matches(got: Any, allowed: list[Any]) -> bool:
    """A call's argument equals one allowed value (numbers by value, strings case-insensitively)."""
    return any(_norm(got) == _norm(a) for a in allowed)


def score(case: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    calls = reply["tool_calls"]
    if case["tool"] is None:
        return {"kind": "no_tool", "right": not calls}
    first = calls[0] if calls else None
    tool_right = bool(first) and first["name"] == case["tool"]
    wrong_args = [] if tool_right else list(case["args"])
    if tool_right:
        wrong_args = [k for k, allowed in case["args"].items()
                      if k not in first["arguments"] or not arg_matches(first["arguments"][k], allowed)]
    return {"kind": "tool", "tool_right": tool_right, "args_right": tool_right and not wrong_args,
            "wrong_args": wrong_args}


def ask(client: Any, model: str, tools: list[dict[str, Any]], text: str, max_tokens: int) -> dict[str, Any]:
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], tools=tools,
                                          tool_choice="auto", temperature=0, max_tokens=max_tokens)
    choice = resp.choices[0]
    calls = []
    for tc in choice.message.tool_calls or []:
        try:
            arguments = json.loads(tc.function.arguments)
        except json.JSONDecodeError:
            arguments = {"<unparsed>": tc.function.arguments}
        calls.append({"name": tc.function.name, "arguments": arguments})
    return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tool_rows = [r for r in rows if r["score"]["kind"] == "tool"]
    none_rows = [r for r in rows if r["score"]["kind"] == "no_tool"]
    return {"tool_right": sum(r["score"]["tool_right"] for r in tool_rows),
            "args_right": sum(r["score"]["args_right"] for r in tool_rows),
            "tool_requests": len(tool_rows),
            "no_call_right": sum(r["score"]["right"] for r in none_rows),
            "no_tool_requests": len(none_rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", action="append", default=[], help="NAME=PATH; repeatable")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--no-base", action="store_true", help="ask only the adapters")
    ap.add_argument("--merged", action="append", default=[],
                    help="NAME=DIR: a merged student (`fcd export --merge`), served on its own; repeatable")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--result", default=str(RESULT))
    ap.add_argument("--log", default=str(ROOT / "runs" / "everyday_tools.serve.log"))
    args = ap.parse_args()

    import openai

    from fcdistill.serve.process import start_server

    cases = json.loads(CASES.read_text(encoding="utf-8"))
    # one server for the base model and its adapters, then one per merged student
    servers = [(["--model", args.base] + [x for a in args.adapter for x in ("--adapter", a)],
                ([] if args.no_base else [args.base]) + [a.split("=", 1)[0] for a in args.adapter])]
    for m in args.merged:
        name, _, path = m.partition("=")
        servers.append((["--model", path, "--served-model-name", name], [name]))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    for flags, names in servers:
        if not names:
            continue
        with start_server(flags, Path(args.log), timeout=600) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
            for name in names:
                rows = []
                for case in cases["requests"]:
                    reply = ask(client, name, cases["tools"], case["text"], args.max_tokens)
                    rows.append({"request": case["text"], "expected": case["tool"], **reply,
                                 "score": score(case, reply)})
                models[name] = {"summary": summarize(rows), "rows": rows}
                print(name, models[name]["summary"], flush=True)
    result = {"check": "everyday_tools", "cases": str(CASES.relative_to(ROOT)), "max_tokens": args.max_tokens,
              "adapters": dict(a.split("=", 1) for a in args.adapter),
              "merged": dict(m.split("=", 1) for m in args.merged), "machine": platform.machine(),
              "models": models}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| model | right tool | all key args right | no call when no tool fits |")
    for name, m in models.items():
        s = m["summary"]
        n, q = s["tool_requests"], s["no_tool_requests"]
        print(f"| {name} | {s['tool_right']}/{n} | {s['args_right']}/{n} | {s['no_call_right']}/{q} |")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
