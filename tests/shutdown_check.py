"""One check shared by the shutdown tests: signal a running `fcd serve`, then time its exit and the end
of every process of its tree (EngineCore, workers, resource tracker)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from fcdistill.serve.lifecycle import BOUND_S
from fcdistill.serve.process import ServerProcess


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def tree_of(server: ServerProcess) -> list[psutil.Process]:
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


def signal_and_time(server: ServerProcess, signals: list[str], tree: list[psutil.Process]) -> dict:
    """Send `signals` (a second one a second later), wait for the server, then for its tree; the row
    says how long each took and what was left. The caller asserts; it must kill what is left."""
    started = time.monotonic()
    for i, name in enumerate(signals):
        if i:
            time.sleep(1.0)
        if server.proc.poll() is None:
            os.kill(server.proc.pid, getattr(signal, name))
    server.proc.wait(timeout=BOUND_S + 30)
    row: dict = {"signals": signals, "server_exit_s": round(time.monotonic() - started, 2)}
    while alive(tree) and time.monotonic() - started < BOUND_S:
        time.sleep(0.1)
    row["tree_gone_s"] = round(time.monotonic() - started, 2)
    row["processes_left"] = [f"{p.pid}:{p.name()}" for p in alive(tree)]
    return row
