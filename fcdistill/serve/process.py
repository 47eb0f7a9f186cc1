"""`fcd serve` as a child process: start it on a free loopback port and wait until it answers.

The quickstart, the benchmarks and the tests all run the real server this way. The vllm engine
lives in its own environment on CPU machines, so the interpreter is a parameter.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # written by scripts/setup_vllm.sh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_for(engine: str) -> str:
    """The interpreter that runs `fcd serve --engine ENGINE` here."""
    if engine == "vllm":
        try:
            import vllm  # noqa: F401  (a GPU box with vLLM in the main environment)

            return sys.executable
        except ImportError:
            if not VLLM_PYTHON.is_file():
                raise RuntimeError(f"--engine vllm needs vLLM: run scripts/setup_vllm.sh (creates {VLLM_PYTHON.parent.parent})")
            return str(VLLM_PYTHON)
    return sys.executable


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT (no /v1)
    log: Path

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(args: list[str], log: Path, *, engine: str = "hf", port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600) -> ServerProcess:
    """Run `fcd serve --engine ENGINE --port PORT ARGS...` and return once /health answers 200."""
    port = port or free_port()
    # `-m fcdistill.cli`, not `-m fcdistill`: the vllm engine's processes are spawned, and a spawned child
    # imports the parent's main module again (which makes it die with the server and start quietly, see
    # engines/vllm_env.py), except a package's __main__, which multiprocessing never re-imports
    cmd = [python_for(engine), "-m", "fcdistill.cli", "serve", "--engine", engine, "--port", str(port), *args]
    handle = log.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(server.url, proc, log, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
            raise RuntimeError(f"the server exited during start-up (rc {proc.returncode}); log {log}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout:.0f}s; see {log}")
