"""Dev tool, not a pipeline stage: a real local OpenAI-compatible HTTP server that replays recorded
teacher replies and injects faults. Tests and benchmarks/teacher_bench.py use it; no stage does.

A paid teacher cannot run offline, so the client, the labeling resume and the retry paths are tested
against this server over real HTTP (uvicorn + Starlette), through the real openai client. It serves
`POST /v1/chat/completions` from a script: rules match request text and return recorded replies
(chosen by the request's `seed`, so self-consistency samples differ); faults (status codes with
Retry-After, delays past the client's timeout, hangs until released) apply to the first requests of
a given body. It counts every request by body hash, which is how tests prove nothing is asked twice.

Run it alone with `python -m fcdistill.devtools.replay_teacher --script FILE --port PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections import deque
from typing import Any

from pydantic import BaseModel, Field

from fcdistill.serve.process import free_port


class ReplySpec(BaseModel):
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)  # {"name", "arguments": dict | raw str}
    finish_reason: str | None = None  # default: "tool_calls" with calls, else "stop"


class Fault(BaseModel):
    status: int = 0  # 0: none (after delay_s, answer normally)
    retry_after: float | None = None
    delay_s: float = 0.0


class Rule(BaseModel):
    match: list[str] = Field(default_factory=list)  # all must occur in the request's messages (JSON text)
    tool: str | None = None  # and the request must offer a tool of this name
    replies: list[ReplySpec] = Field(min_length=1)  # replies[seed % len]
    faults: list[Fault] = Field(default_factory=list)  # for the 1st, 2nd, ... request of the same body


class ReplayScript(BaseModel):
    rules: list[Rule] = Field(default_factory=list)
    default: ReplySpec | None = None  # no rule matched: this, else an error 400
    delay_s: float = 0.0  # every request (a slow endpoint)
    hang_on: list[int] = Field(default_factory=list)  # 1-based request ordinals that wait for release()


class ReplayState:
    """Counters shared between the server thread and the test (guarded by a lock)."""

    def __init__(self, script: ReplayScript):
        self.script = script
        self.lock = threading.Lock()
        self.total = 0
        self.by_key: dict[str, int] = {}
        self.ok_by_key: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.hanging = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.release_event: asyncio.Event | None = None
        self.bodies: deque[dict[str, Any]] = deque(maxlen=200)  # the latest request bodies, for tests

    def reset(self) -> None:
        with self.lock:
            self.total, self.by_key, self.ok_by_key, self.statuses = 0, {}, {}, {}
            self.max_in_flight = self.in_flight

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"total": self.total, "by_key": dict(self.by_key), "ok_by_key": dict(self.ok_by_key),
                    "statuses": dict(self.statuses), "in_flight": self.in_flight,
                    "max_in_flight": self.max_in_flight, "hanging": self.hanging}


def body_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _tool_names(body: dict[str, Any]) -> set[str]:
    return {t.get("function", {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)}


def choose(script: ReplayScript, body: dict[str, Any]) -> tuple[Rule | None, ReplySpec | None]:
    text = json.dumps(body.get("messages", []), ensure_ascii=False)
    names = _tool_names(body)
    for rule in script.rules:
        if all(m in text for m in rule.match) and (rule.tool is None or rule.tool in names):
            seed = body.get("seed") or 0
            return rule, rule.replies[int(seed) % len(rule.replies)]
    return None, script.default


def completion(body: dict[str, Any], reply: ReplySpec) -> dict[str, Any]:
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c.get("arguments"), str)
                           else json.dumps(c.get("arguments", {}))}} for i, c in enumerate(reply.tool_calls)]
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if calls:
        message["tool_calls"] = calls
    out_text = (reply.content or "") + "".join(c["function"]["arguments"] for c in calls)
    prompt_tokens = len(json.dumps(body.get("messages", []))) // 4 + 1
    completion_tokens = len(out_text) // 4 + 1
    return {"id": "chatcmpl-replay", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "replay"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": reply.finish_reason or ("tool_calls" if calls else "stop")}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def build_app(state: ReplayState) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": {"message": message, "type": "replay_fault", "code": status}},
                            status_code=status, headers=headers)

    async def chat(request: Request) -> Response:
        body = await request.json()
        key = body_key(body)
        with state.lock:
            state.total += 1
            ordinal = state.total
            seen = state.by_key.get(key, 0)
            state.by_key[key] = seen + 1
            state.bodies.append(body)
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            if state.loop is None:
                state.loop = asyncio.get_running_loop()
                state.release_event = asyncio.Event()
        status = 200
        try:
            script = state.script
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            if ordinal in script.hang_on:
                with state.lock:
                    state.hanging += 1
                assert state.release_event is not None
                await state.release_event.wait()
                with state.lock:
                    state.hanging -= 1
                status = 503
                return error(503, "released from a hang")
            rule, reply = choose(script, body)
            if rule is not None and seen < len(rule.faults):
                fault = rule.faults[seen]
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                if fault.status:
                    status = fault.status
                    headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                    return error(fault.status, f"injected {fault.status}", headers)
            if reply is None:
                status = 400
                return error(400, "no recorded reply matches this request")
            with state.lock:
                state.ok_by_key[key] = state.ok_by_key.get(key, 0) + 1
            return JSONResponse(completion(body, reply))
        finally:
            with state.lock:
                state.in_flight -= 1
                state.statuses[status] = state.statuses.get(status, 0) + 1

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def control(request: Request) -> Response:
        cmd = await request.json()
        if cmd.get("release") and state.release_event is not None:
            state.release_event.set()
        if "script" in cmd:
            state.script = ReplayScript.model_validate(cmd["script"])
        if cmd.get("reset"):
            state.reset()
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health), Route("/stats", stats),
                             Route("/control", control, methods=["POST"])])


class ReplayServer:
    """The server in a background thread of this process: `with ReplayServer(script) as srv: srv.url`."""

    def __init__(self, script: ReplayScript | dict[str, Any]):
        self.state = ReplayState(script if isinstance(script, ReplayScript) else ReplayScript.model_validate(script))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ReplayServer":
        import uvicorn

        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="error",
                                lifespan="off", access_log=False, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("replay server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    def release(self) -> None:
        """Let hung requests finish (with 503)."""
        loop, ev = self.state.loop, self.state.release_event
        if loop is not None and ev is not None and not loop.is_closed():
            loop.call_soon_threadsafe(ev.set)

    def set_script(self, script: ReplayScript | dict[str, Any]) -> None:
        self.state.script = script if isinstance(script, ReplayScript) else ReplayScript.model_validate(script)


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", help="JSON file with a ReplayScript (default: answer 'ok' to everything)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    script = ReplayScript(default=ReplySpec(content="ok"))
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            script = ReplayScript.model_validate(json.load(f))
    uvicorn.run(build_app(ReplayState(script)), host=args.host, port=args.port, log_level="error",
                lifespan="off", access_log=False)


if __name__ == "__main__":
    main()
