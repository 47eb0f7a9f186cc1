"""`fcd eval run`: ask any OpenAI-compatible endpoint the eval questions, then score and report.

Why it is built this way:
- transport is the neutral client (fcdistill.client: bounded concurrency, jittered retries, progress
  bar), without its response cache: two servers that share a model name must not share answers;
- every answer is appended to `outputs.jsonl` as it arrives, so a killed run resumes where it
  stopped and a rerun asks only the ids it has no answer for; scoring is cheap and redone from
  that file each time (items.jsonl, summary.json, report.md, chart.png);
- an endpoint that cannot be reached is found before any question is sent, and the run stops
  with its URL; a question the endpoint refuses (HTTP 400: too long, ...) is an answer scored wrong;
- tool names go out as BFCL spells them (`math.factorial`); an endpoint that rejects such names
  (HTTP 400) gets API-safe names from then on, mapped back before scoring.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from fcdistill.eval.dataset import EvalError, EvalItem, load_eval_set
from fcdistill.jsonl import repair_jsonl, write_jsonl_atomic
from fcdistill.tools import is_api_safe_name

OUTPUTS = "outputs.jsonl"
ITEMS = "items.jsonl"
RUN_INFO = "run.json"
_ABORT_STATUS = {401, 403, 404}  # the run is misconfigured (key, model): stop, do not score as wrong
_MAX_CONSECUTIVE_FAILURES = 8


@dataclass
class EvalOptions:
    endpoint: str
    model: str
    manifest: Path
    out: Path
    categories: list[str] | None = None
    mode: Literal["fc", "prompt"] = "fc"
    concurrency: int = 4
    api_key: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    tool_names: Literal["auto", "original", "safe"] = "auto"
    tool_choice: str | None = None  # None: not sent (BFCL sends none); "required" forces a call
    limit_per_category: int | None = None
    timeout_s: float = 300.0
    max_attempts: int = 4
    progress: bool = True
    label: str | None = None
    max_steps: int = 20  # multi-turn: steps a turn may take before the conversation is cut (bfcl's limit)

    def check(self) -> None:
        if self.mode not in ("fc", "prompt"):
            raise EvalError(f"--mode must be fc or prompt, got {self.mode!r}")
        if self.tool_names not in ("auto", "original", "safe"):
            raise EvalError(f"--tool-names must be auto, original or safe, got {self.tool_names!r}")
        if self.tool_choice not in (None, "auto", "required", "none"):
            raise EvalError(f"--tool-choice must be auto, required or none, got {self.tool_choice!r}")
        if self.tool_choice and self.mode == "prompt":
            raise EvalError("--tool-choice applies to fc mode only (prompt mode sends no tools)")
        for name, value in (("--concurrency", self.concurrency), ("--max-tokens", self.max_tokens),
                            ("--max-steps", self.max_steps)):
            if value < 1:
                raise EvalError(f"{name} must be at least 1, got {value}")
        if self.limit_per_category is not None and self.limit_per_category < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit_per_category}")
        if not 0.0 <= self.temperature <= 2.0:
            raise EvalError(f"--temperature must be within [0, 2], got {self.temperature}")
        if not self.model:
            raise EvalError("--model is required: the model name the endpoint serves")


def normalize_endpoint(url: str) -> str:
    """`http://host:port` gets `/v1` (OpenAI-compatible servers live there); a URL with a path is kept."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EvalError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parsed.path in ("", "/") else url


def check_endpoint(endpoint: str, api_key: str | None, timeout_s: float = 10.0) -> list[str] | None:
    """The shared up-front check (fcdistill.client.check_endpoint), failing as an EvalError."""
    from fcdistill.client.endpoint import EndpointError, check_endpoint as check

    try:
        return check(endpoint, api_key, timeout_s, key_hint="--api-key")
    except EndpointError as exc:
        raise EvalError(str(exc)) from None


# -- per-item outputs (append-only, resumable) ----------------------------------------------------
def read_outputs(path: Path) -> dict[str, dict[str, Any]]:
    """id -> answer; a line cut off by a killed run is dropped (and cut from the file) so it is re-asked."""
    return {row["id"]: row for row in repair_jsonl(path)}


def _identity(opts: EvalOptions, data_dir: Path, manifest: dict[str, Any], multi_turn: bool) -> dict[str, Any]:
    """What decides the answers: a rerun into the same dir must match it, or it would mix two runs."""
    ident = {"model": opts.model, "mode": opts.mode, "max_tokens": opts.max_tokens, "temperature": opts.temperature,
             "tool_choice": opts.tool_choice, "bfcl_eval_version": manifest.get("bfcl_eval_version"),
             "data_seed": manifest.get("seed"), "data_dir": str(data_dir.resolve())}
    if multi_turn:
        ident["max_steps"] = opts.max_steps
    return ident


def _prepare_run_dir(opts: EvalOptions, data_dir: Path, manifest: dict[str, Any], multi_turn: bool) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / RUN_INFO
    ident = _identity(opts, data_dir, manifest, multi_turn)
    info: dict[str, Any] = {}
    if path.is_file() and read_outputs(opts.out / OUTPUTS):  # a dir without answers can be reused freely
        info = json.loads(path.read_text())
        old = info.get("identity", {})
        diff = [k for k in ident if k != "data_dir" and old.get(k) != ident[k]]
        if diff:
            k = diff[0]
            raise EvalError(f"{opts.out} holds answers with {k}={old.get(k)!r}, not {ident[k]!r}; "
                            f"use another --out (or delete it) to start a new run")
    info.update({"identity": ident, "endpoint": opts.endpoint, "label": opts.label or info.get("label") or opts.model,
                 "categories": opts.categories, "tool_names": opts.tool_names if opts.tool_names != "auto" else info.get("tool_names") or "auto"})
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


# -- asking ------------------------------------------------------------------------------------------
def answer_row(item: EvalItem, mode: str, content: str | None, tool_calls: list[dict[str, Any]] | None,
               finish_reason: str | None, name_map: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """One answer as `fcd eval` records it and its Scorer reads it; benchmarks that score answers they
    got another way (benchmarks/engine_ab.py) build theirs here too."""
    row: dict[str, Any] = {"id": item.id, "category": item.category, "mode": mode, "content": content,
                           "tool_calls": tool_calls, "finish_reason": finish_reason, **extra}
    if name_map:
        row["name_map"] = name_map
    return row


def fc_request(item: EvalItem, safe: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """OpenAI tools for one item (our JSON Schema, BFCL's hinted description) and the name map back."""
    from fcdistill.tools import safe_tool_names

    names = safe_tool_names([f["name"] for f in item.functions]) if safe else {}
    descriptions = {f["name"]: f.get("description", "") for f in item.shown_functions}
    tools = [{"type": "function", "function": {"name": names.get(t.name, t.name),
                                               "description": descriptions.get(t.name, t.description),
                                               "parameters": t.parameters}} for t in item.record.tools]
    return tools, {v: k for k, v in names.items() if v != k}


def prompt_messages(item: EvalItem) -> list[dict[str, Any]]:
    """BFCL's python-syntax system prompt with the hinted docs, made by bfcl_eval itself."""
    from fcdistill.bfcl_env import bfcl_import

    add_system = bfcl_import("bfcl_eval.model_handler.utils", "system_prompt_pre_processing_chat_model")
    return add_system(copy.deepcopy(item.record.messages), copy.deepcopy(item.shown_functions), item.id)


def _refused(status: int | None) -> bool:
    """A final HTTP 4xx (the endpoint refused the question), as opposed to a transport failure that
    outlasted the retries (5xx, 408/409/429, timeouts, dropped connections, a 200 without a usable body)."""
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)


@dataclass
class _Progress:
    asked: int = 0
    answered: int = 0
    transport_errors: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped: bool = False
    notes: list[str] = field(default_factory=list)


async def _ask_all(opts: EvalOptions, todo: list[EvalItem], info: dict[str, Any], outputs_path: Path) -> _Progress:
    from fcdistill.client import Client, ClientConfig

    cfg = ClientConfig(base_url=opts.endpoint, model=opts.model, api_key=opts.api_key, api_key_env=None,
                       temperature=opts.temperature, max_tokens=opts.max_tokens, concurrency=opts.concurrency,
                       timeout_s=opts.timeout_s, max_attempts=opts.max_attempts, backoff_max_s=8.0, cache=None,
                       progress=opts.progress)
    prog = _Progress()
    state = {"safe": info.get("tool_names") == "safe"}

    async def ask(item: EvalItem) -> dict[str, Any] | None:
        if prog.stopped:
            return None
        t0 = time.perf_counter()
        if item.entry is not None:
            from fcdistill.eval.multi_turn import converse

            body = await converse(client, item.entry, item.category, opts.max_steps, opts.tool_choice)
            return {"id": item.id, "category": item.category, "mode": opts.mode, **body,
                    "latency_s": round(time.perf_counter() - t0, 3)}
        name_map: dict[str, str] = {}
        if opts.mode == "prompt":
            reply = await client.chat(prompt_messages(item))
        else:
            safe = state["safe"]
            tools, name_map = fc_request(item, safe)
            reply = await client.chat(copy.deepcopy(item.record.messages), tools, opts.tool_choice)
            unsafe = not all(is_api_safe_name(f["name"]) for f in item.functions)
            if reply.error and reply.status == 400 and not safe and unsafe and opts.tool_names == "auto":
                tools, name_map = fc_request(item, True)
                retry = await client.chat(copy.deepcopy(item.record.messages), tools, opts.tool_choice)
                if not retry.error:
                    state["safe"] = True
                    prog.notes.append(f"{opts.endpoint} rejected dotted tool names ({reply.error[:120]}); "
                                      f"sending API-safe names from {item.id} on, mapped back before scoring")
                reply = retry
        row = answer_row(item, opts.mode, reply.content, reply.tool_calls, reply.finish_reason, name_map,
                         usage=reply.usage, latency_s=round(time.perf_counter() - t0, 3))
        if reply.forced_close:
            row["forced_close"] = reply.forced_close  # fcd serve closed a looping or over-long answer
        if reply.error:
            row = {"id": item.id, "category": item.category, "mode": opts.mode, "error": reply.error,
                   "status": reply.status}
        return row

    def on_result(item: EvalItem, row: dict[str, Any] | None) -> None:
        if row is None:
            return
        prog.asked += 1
        status = row.get("status")
        if "error" in row and not _refused(status):
            # Transport failure after the retries (or a 200 without a usable answer): not an answer;
            # a rerun asks again.
            prog.transport_errors += 1
            prog.consecutive_failures += 1
            prog.last_error = row["error"]
            if prog.consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                prog.stopped = True
            return
        if status in _ABORT_STATUS:
            hint = "--api-key" if status in (401, 403) else "--model and --endpoint"
            raise EvalError(f"endpoint {opts.endpoint} answered {row['error'][:200]} (model {opts.model!r}); check {hint}")
        prog.consecutive_failures = 0
        prog.answered += 1
        usage = row.get("usage") or {}
        prog.prompt_tokens += usage.get("prompt_tokens", 0)
        prog.completion_tokens += usage.get("completion_tokens", 0)
        with outputs_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    async with Client(cfg) as client:
        await client.each(todo, ask, on_result, f"eval {opts.label or opts.model}")
    if state["safe"] and info.get("tool_names") != "safe":
        info["tool_names"] = "safe"
        (opts.out / RUN_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return prog


# -- scoring ------------------------------------------------------------------------------------------
def score_outputs(items: list[EvalItem], outputs: dict[str, dict[str, Any]], out: Path) -> list[Any]:
    """Score every answered item (bfcl_eval's checker) and rewrite items.jsonl from scratch."""
    from fcdistill.eval.score import Scorer

    scorer = Scorer()
    scores = [scorer.score(it, outputs[it.id]) for it in items if it.id in outputs]
    write_jsonl_atomic(out / ITEMS, [s.to_json() for s in scores], sort_keys=False)
    return scores


def run_eval(endpoint: str, model: str, data_dir: str | Path, categories: list[str] | None, out_dir: str | Path,
             mode: str = "fc", concurrency: int = 4, api_key: str | None = None, max_tokens: int = 512,
             **options: Any) -> dict[str, Any]:
    """Ask, score and report one eval run; returns the summary (also in OUT/summary.json).

    `data_dir` is the data dir of `fcd data bfcl` or its manifest.json. Extra options: temperature,
    tool_names (auto|original|safe), tool_choice, limit_per_category, timeout_s, max_attempts,
    progress, label. Raises EvalError on bad input or an unreachable endpoint.
    """
    opts = EvalOptions(endpoint=endpoint, model=model, manifest=Path(data_dir), out=Path(out_dir),
                       categories=categories or None, mode=mode, concurrency=concurrency, api_key=api_key,
                       max_tokens=max_tokens, **options)
    return execute(opts)


def execute(opts: EvalOptions) -> dict[str, Any]:
    from fcdistill.eval.report import summarize, write_reports

    opts.check()
    opts.endpoint = normalize_endpoint(opts.endpoint)
    data_dir, manifest, items = load_eval_set(opts.manifest, opts.categories, opts.limit_per_category)
    multi_turn = any(it.entry is not None for it in items)
    if multi_turn and opts.mode != "fc":
        raise EvalError("multi-turn categories run in fc mode only (tools and tool results over the API)")
    outputs_path = opts.out / OUTPUTS
    outputs = read_outputs(outputs_path)
    todo = [it for it in items if it.id not in outputs]
    started = time.time()
    prog = _Progress()
    if todo:  # only a run with questions left needs the endpoint: checked before anything is written
        served = check_endpoint(opts.endpoint, opts.api_key)
        if served and opts.model not in served:
            print(f"warning: {opts.endpoint} lists {', '.join(served[:8])}, not {opts.model!r}", file=sys.stderr)
    info = _prepare_run_dir(opts, data_dir, manifest, multi_turn)
    if todo:
        prog = asyncio.run(_ask_all(opts, todo, info, outputs_path))
        outputs = read_outputs(outputs_path)
    scores = score_outputs(items, outputs, opts.out)
    run = {"label": info["label"], "model": opts.model, "endpoint": opts.endpoint, "mode": opts.mode,
           "data_dir": str(data_dir), "bfcl_eval_version": manifest.get("bfcl_eval_version"),
           "max_tokens": opts.max_tokens, "temperature": opts.temperature, "tool_choice": opts.tool_choice,
           "tool_names": info.get("tool_names"),
           "this_invocation": {"asked": prog.asked, "answered": prog.answered, "skipped_already_answered":
                               len(items) - len(todo), "transport_errors": prog.transport_errors,
                               "prompt_tokens": prog.prompt_tokens, "completion_tokens": prog.completion_tokens,
                               "seconds": round(time.time() - started, 1), "notes": prog.notes}}
    if prog.last_error:
        run["this_invocation"]["last_transport_error"] = prog.last_error
    summary = summarize(scores, items, run)
    write_reports(opts.out, summary)
    return summary
