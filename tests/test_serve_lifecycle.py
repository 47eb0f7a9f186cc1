"""`fcd serve` pieces that need no model: the API key check, and processes that die with the server."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap

from fastapi.testclient import TestClient


class _NoEngine:
    """Enough of an engine for the HTTP layer's start-up; nothing here generates."""

    model_name = "m"
    adapters: dict[str, str] = {}
    fc_token = "<tool_call>"
    context_length = 2048
    failure = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.logits_size = len(tokenizer)

    async def generate(self, request):  # pragma: no cover - never called
        raise AssertionError("no generation in this test")
        yield

    def stats(self) -> dict:
        return {}

    async def shutdown(self) -> None:
        return None


def test_api_key_is_compared_in_constant_time(smollm2_tokenizer, monkeypatch):
    """`!=` on the key leaks, through how long a refusal takes, how much of a guess was right;
    secrets.compare_digest does not."""
    from fcdistill.serve.app import create_app

    compared = []
    real = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with TestClient(create_app(_NoEngine(smollm2_tokenizer), api_key="s3cret")) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3creT"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"
        assert client.get("/health").status_code == 200  # open without a key
    assert len(compared) == 3 and all(b == b"Bearer s3cret" for _, b in compared)


CHAIN = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    import fcdistill.cli  # as the `fcd` script does; spawned children import this main module again

    def grandchild(ready):
        ready.set()  # its target runs after the import that asked for the parent-death signal
        time.sleep(600)

    def child():
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        p = ctx.Process(target=grandchild, args=(ready,))
        p.start()
        ready.wait(60)
        print(os.getpid(), p.pid, flush=True)  # both processes are armed by now
        time.sleep(600)

    if __name__ == "__main__":
        os.environ["FCD_KILL_WITH_PARENT"] = str(os.getpid())  # what `fcd serve --engine vllm` sets
        mp.get_context("spawn").Process(target=child).start()
        time.sleep(600)
""")


def test_spawned_processes_die_with_a_killed_server(tmp_path):
    """The chain vLLM builds under `fcd serve` (server -> EngineCore -> worker, started by spawn) with
    plain processes: a SIGKILL of the server, which runs no cleanup, still leaves nothing running."""
    import psutil

    script = tmp_path / "server.py"
    script.write_text(CHAIN)
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    procs = []
    try:
        pids = [int(p) for p in server.stdout.readline().split()]
        assert len(pids) == 2, pids
        procs = [psutil.Process(p) for p in pids]
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        gone, alive = psutil.wait_procs(procs, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [f"{p.pid} {p.cmdline()}" for p in alive]
    finally:
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        server.kill()
