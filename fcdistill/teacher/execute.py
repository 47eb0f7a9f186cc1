"""Execution checks: run each call against user-given Python implementations, one subprocess per call.

The implementations are the user's code; the arguments are the model's output. Each call runs in a
fresh interpreter (`exec_runner.py`) that receives the call as JSON on stdin, with a timeout after
which the process is killed, so a hanging, crashing or state-leaking implementation cannot take the
pipeline with it. A call fails when it raises, times out, has no implementation, or returns a dict
with an "error" key (the convention APIGen's executable APIs use). Results are cached by
(module hash, call) so a resumed run does not execute again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcdistill.client.cache import ResponseCache, request_key
from fcdistill.data.checks import Failure
from fcdistill.teacher.config import TeacherError
from fcdistill.tools import ToolCall

RUNNER = Path(__file__).with_name("exec_runner.py")
EXAMPLE_MODULE = "example"  # --exec-module example: the shipped example domain's implementations


@dataclass
class ExecResult:
    ok: bool
    result: Any = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "result": self.result, "error": self.error}


class Executor:
    """Runs calls against one implementation module, `limit` processes at a time."""

    def __init__(self, module: Path | str, timeout_s: float = 5.0, limit: int = 2,
                 cache: ResponseCache | None = None):
        if str(module) == EXAMPLE_MODULE:
            from fcdistill.teacher.inputs import example_domain

            module = example_domain().implementations
        path = Path(module)
        if not path.is_file() or path.suffix != ".py":
            raise TeacherError(f"--exec-module {module}: not a Python file")
        if timeout_s <= 0:
            raise TeacherError(f"--exec-timeout must be > 0, got {timeout_s}")
        self.path = path.resolve()
        self.timeout_s = timeout_s
        self.cache = cache
        self.limit = limit  # processes at once: the executor's one limit
        self._sem = asyncio.Semaphore(limit)
        self._module_hash = hashlib.sha256(self.path.read_bytes()).hexdigest()

    async def run(self, call: ToolCall) -> ExecResult:
        key = request_key({"module": self._module_hash, "name": call.name, "arguments": call.arguments,
                           "timeout": self.timeout_s})
        if self.cache is not None:
            hit = self.cache.get(key, ns="exec")
            if hit is not None:
                return ExecResult(**hit)
        async with self._sem:
            result = await self._spawn(call)
        if self.cache is not None:
            self.cache.put(key, result.as_dict(), ns="exec")
        return result

    async def _spawn(self, call: ToolCall) -> ExecResult:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(RUNNER), str(self.path), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(self.path.parent))
        payload = json.dumps({"name": call.name, "arguments": call.arguments}).encode()
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload), self.timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return ExecResult(ok=False, error=f"timed out after {self.timeout_s:g}s")
        lines = out.decode("utf-8", "replace").strip().splitlines()
        try:
            reply = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            return ExecResult(ok=False, error=f"runner exited {proc.returncode}: {tail[0][:200]}")
        if not reply.get("ok"):
            return ExecResult(ok=False, error=str(reply.get("error"))[:300])
        result = reply.get("result")
        if isinstance(result, dict) and "error" in result:
            return ExecResult(ok=False, result=result, error=f"returned an error: {str(result['error'])[:200]}")
        return ExecResult(ok=True, result=result)

    async def check(self, calls: list[ToolCall]) -> tuple[list[ExecResult], list[Failure]]:
        """Run every call (concurrently, bounded); failures name the call and the reason."""
        results = list(await asyncio.gather(*(self.run(c) for c in calls)))
        failures = []
        for i, (c, r) in enumerate(zip(calls, results)):
            if not r.ok:
                code = "timeout" if (r.error or "").startswith("timed out") else \
                    "no_implementation" if (r.error or "").startswith("no implementation") else "error"
                failures.append(Failure("execution", code, f"call {i} {c.name}: {r.error}"))
        return results, failures
