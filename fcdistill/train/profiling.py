"""Profile a few optimizer steps with torch.profiler, so a slow step is explained rather than guessed at.

`profile: {start_step: 5, steps: 3}` in a training config (or `--set profile.start_step=5`) records
steps 5..7 and writes `output_dir/profile/`: `ops.txt` (the operators by time on the device, or on the
CPU without one), `ops.json` (the same rows, machine-readable, with the recorded steps' wall time and
device time) and, with `trace: true`, a Chrome trace (large: tens of MB for a 0.5B model). Only the
main process records. The window opens when step `start_step` begins and closes when the last
recorded step ends, so it holds the data loading, logging and saving of the steps between. A run
resumed past `start_step` records nothing (it says so); one that ends inside the window writes the
steps it recorded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fcdistill.train.config import ProfileSettings

log = logging.getLogger("fcdistill.train")
ROWS = 40


def _rows(events: Any, device: bool, limit: int) -> list[dict[str, Any]]:
    key = "self_device_time_total" if device else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:limit]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
             **({"self_device_ms": round(e.self_device_time_total / 1e3, 3)} if device else {})}
            for e in ranked]


def _device_seconds(events: Any) -> float:
    """Time the device spent in kernels: its own rows only (an operator's row repeats its kernels' time)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e6


def profile_callback(settings: ProfileSettings, out: Path) -> Any:
    """A TrainerCallback recording optimizer steps start_step .. start_step + steps - 1 into `out`."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.t0 = 0.0
            self.first = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.is_world_process_zero and state.global_step >= settings.start_step:
                log.warning("profile: this run starts after step %d (resumed at %d); no step is recorded",
                            settings.start_step, state.global_step)

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # global_step counts finished steps: the step about to run is global_step + 1
            if self.prof is None and state.is_world_process_zero and state.global_step + 1 == settings.start_step:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.t0, self.first = time.perf_counter(), settings.start_step

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.prof is not None and state.global_step >= settings.start_step + settings.steps - 1:
                self._write(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.prof is not None:  # the run ended inside the window: keep what was recorded
                self._write(state.global_step)

        def _write(self, last: int) -> None:
            device = torch.cuda.is_available()
            if device:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
            steps = list(range(self.first, last + 1))
            out.mkdir(parents=True, exist_ok=True)
            events = prof.key_averages()
            sort = "self_device_time_total" if device else "self_cpu_time_total"
            (out / "ops.txt").write_text(events.table(sort_by=sort, row_limit=ROWS, max_name_column_width=70) + "\n",
                                         encoding="utf-8")
            summary = {"steps": steps, "wall_seconds_per_step": round(wall / max(1, len(steps)), 4),
                       "device_seconds_per_step": round(_device_seconds(events) / max(1, len(steps)), 4)
                       if device else None,
                       "ops": _rows(events, device, ROWS)}
            (out / "ops.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            if settings.trace:
                prof.export_chrome_trace(str(out / "trace.json"))

    return ProfileSteps()
