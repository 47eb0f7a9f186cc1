"""How `fcd serve` runs and stops: a start-up line, an optional access log, and a shutdown with a bound.

On SIGTERM or SIGINT, in whatever state (idle, mid-request, mid-stream, a client holding a
keep-alive connection):
- uvicorn stops accepting connections; requests and streams still open get GRACE_S seconds to end,
  then they are cancelled (a cancelled generation stops in the engine);
- the app's lifespan shuts the engine down (the vllm engine's EngineCore and workers are child
  processes: vLLM terminates them, and kills them after ENGINE_STOP_S);
- whatever this process started and is still alive then is killed;
- a watchdog started by the first signal kills everything and exits after BOUND_S, so shutdown never
  depends on a library finishing in time. A second SIGINT skips the waiting.
A SIGKILL runs none of this: the vllm engine's children are told by the kernel instead (see
`engines/vllm_env.py`, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

GRACE_S = 3.0  # open requests and streams, after a signal
ENGINE_STOP_S = 3.0  # the engine's own shutdown (vLLM: EngineCore terminate -> kill)
BOUND_S = 15.0  # the watchdog: nothing of the server is left after this

access_log = logging.getLogger("fcdistill.access")


def kill_descendants(timeout: float = 3.0) -> int:
    """Terminate this process's descendants, SIGKILL those still alive after `timeout`; returns how
    many had to be killed. Uses psutil (vLLM and the serve extra depend on it); without it, does nothing."""
    try:
        import psutil
    except ImportError:
        return 0
    try:
        children = [p for p in psutil.Process().children(recursive=True) if _live_engine_process(p)]
    except psutil.Error:
        return 0
    for p in children:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(alive)


class _CancelledAtShutdown(logging.Filter):
    """uvicorn logs each request it cancels after the grace period as "Exception in ASGI application"
    with a traceback; its one-line "Cancel N running task(s)" already says what happened. (Only the
    server cancels a request's task: a client that leaves is noticed by the app, not cancelled.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


def _live_engine_process(p: Any) -> bool:
    """A descendant to stop: running, and not multiprocessing's resource tracker, which removes the
    shared memory the engine's processes leave and exits by itself once every process using it is gone."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE and not any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:  # gone meanwhile, or not ours to read
        return False


def _watchdog(bound: float) -> None:
    def fire() -> None:
        print(f"fcd serve: shutdown took over {bound:.0f}s; killing the engine's processes", file=sys.stderr, flush=True)
        kill_descendants(timeout=1.0)
        os._exit(1)

    timer = threading.Timer(bound, fire)
    timer.daemon = True
    timer.start()


def start_line(url: str, engine: str, model: str, adapters: dict[str, str], api_key: bool) -> str:
    names = ", ".join(adapters) if adapters else "none"
    key = ("API key required (Authorization: Bearer KEY)" if api_key
           else "no API key needed (clients may send any)")
    return f"fcd serve: serving on {url}/v1 (engine {engine}, model {model}, adapters: {names}; {key})"


def serve(app: Any, host: str, port: int, announce: str, log_requests: bool = False,
          stop_engine: Callable[[], None] | None = None) -> None:
    """Run `app` until SIGTERM/SIGINT, then stop within BOUND_S; print `announce` once listening.
    `stop_engine` runs after the server stopped, for when the app's lifespan did not (a second SIGINT)."""
    import uvicorn

    if log_requests:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False

    class Server(uvicorn.Server):
        stopping = False

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound and listening: only now is the address worth printing
                print(announce, file=sys.stderr, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not Server.stopping:
                Server.stopping = True
                stopping_since[0] = time.monotonic()
                _watchdog(BOUND_S)
                print(f"fcd serve: {signal.Signals(sig).name}: stopping (open requests get {GRACE_S:.0f}s, "
                      f"all of it at most {BOUND_S:.0f}s)", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACE_S)
    logging.getLogger("uvicorn.error").addFilter(_CancelledAtShutdown())
    server = Server(config)
    # uvicorn re-raises the signal it caught once it is done, under the handlers it found: these let
    # the cleanup below run before the process ends
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: received.append(s))
    stopping_since = [time.monotonic()]
    try:
        server.run()
    finally:  # also when uvicorn gives up at start-up (the port is taken: it exits)
        if stop_engine is not None:
            stop_engine()  # a no-op when the app's lifespan already stopped it
        if killed := kill_descendants():  # whatever the engine left behind ends here
            print(f"fcd serve: killed {killed} engine process(es) that outlived the engine's shutdown",
                  file=sys.stderr, flush=True)
        gc.collect()  # engine objects finalized now, not during interpreter exit
    print(f"fcd serve: stopped in {time.monotonic() - stopping_since[0]:.1f}s", file=sys.stderr, flush=True)
