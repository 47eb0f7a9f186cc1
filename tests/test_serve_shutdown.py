"""`fcd serve --engine vllm` stops within a bound on SIGTERM and SIGINT in every state, and no process
of its tree (EngineCore, worker, resource tracker) outlives it, not even after a SIGKILL.

An idle server on SIGTERM is checked at the end of tests/test_serve.py, on its shared servers (both
engines). Each case here starts its own server (a signal ends it), so the server starts lean: no torch.compile, a
small KV cache (10% of RAM: about 2.4 GB free are needed). The busy state is every state at once: a
request mid-generation, a stream mid-way and a client holding an idle keep-alive connection. Figures
go to stdout (pytest -s). tests/test_serve_lifecycle.py checks the same die-with-the-server chain
with plain processes, in seconds.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
from shutdown_check import alive, signal_and_time, tree_of

from fcdistill.serve.lifecycle import BOUND_S
from fcdistill.serve.process import start_server

pytestmark = pytest.mark.slow

LEAN = ["--model", "smollm2-135m", "--enforce-eager", "--gpu-memory-utilization", "0.1", "--max-model-len", "1024"]
LONG = {"model": "smollm2-135m", "max_tokens": 900, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, one number per line."}]}


def _busy(url: str) -> list[httpx.Client]:
    """A request generating, a stream mid-way (first chunks read), and an idle keep-alive client."""
    def request() -> None:
        with contextlib_suppress():
            httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=120)

    streaming = threading.Event()

    def stream() -> None:
        with contextlib_suppress():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=120) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 4:
                        streaming.set()

    for target in (request, stream):
        threading.Thread(target=target, daemon=True).start()
    assert streaming.wait(120), "the stream never started"
    keep_alive = httpx.Client(timeout=120)
    assert keep_alive.get(f"{url}/health").status_code == 200  # the connection stays open
    # both requests admitted: the stream is sending tokens, the plain one is being prepared or generating
    deadline = time.monotonic() + 60
    while (n := _in_flight(keep_alive, url)) < 2:
        assert time.monotonic() < deadline, f"{n:g} requests in flight after 60 s, not the request and the stream"
        time.sleep(0.05)
    return [keep_alive]


def _in_flight(client: httpx.Client, url: str) -> float:
    line = next(x for x in client.get(f"{url}/metrics").text.splitlines() if x.startswith("fcd_requests_in_flight "))
    return float(line.split()[1])


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True  # the server going away mid-request is the point


@pytest.fixture()
def figures():
    rows: list[dict] = []
    yield rows
    for row in rows:
        print(json.dumps(row))


@pytest.mark.parametrize("state, signals", [
    ("busy", ["SIGTERM"]),
    ("busy", ["SIGINT"]),
    ("busy", ["SIGINT", "SIGINT"]),  # Ctrl-C, and Ctrl-C again: uvicorn then skips the app's shutdown
    ("idle", ["SIGKILL"]),  # nothing of ours runs: the kernel ends the children (PR_SET_PDEATHSIG)
], ids=["busy-SIGTERM", "busy-SIGINT", "busy-SIGINTx2", "idle-SIGKILL"])
def test_vllm_server_and_its_processes_end_within_the_bound(tmp_path, state, signals, figures):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = start_server(LEAN, tmp_path / "serve.log", engine="vllm", env=env, timeout=600)
    tree = []
    try:
        tree = tree_of(server)
        assert any("EngineCore" in p.name() for p in tree), [p.name() for p in tree]
        row: dict = {"state": state}
        if signals == ["SIGKILL"]:  # an idle server costs next to nothing
            before = sum(sum(p.cpu_times()[:2]) for p in alive(tree))
            time.sleep(10)
            row["idle_cpu_percent_of_a_core"] = round(10 * (sum(sum(p.cpu_times()[:2]) for p in alive(tree)) - before), 1)
            assert row["idle_cpu_percent_of_a_core"] < 25, row
        clients = _busy(server.url) if state == "busy" else []
        tree = tree_of(server)
        row.update(signal_and_time(server, signals, tree))
        figures.append(row)
        for c in clients:
            c.close()
        assert row["server_exit_s"] < BOUND_S, (row, server.log.read_text()[-3000:])
        assert not row["processes_left"], (row, server.log.read_text()[-3000:])
    finally:
        for p in alive(tree):  # never leave this test's processes behind, whatever failed
            p.kill()
