"""Profile a few optimizer steps with torch.profiler, so a slow step is explained rather than guessed at.

`profile: {start_step: 5, steps: 3}` in a training config (or `--set profile.start_step=5`) records
steps 5..7 and writes `output_dir/profile/`: `ops.txt` (the operators by time on the device, or on the
CPU without one), `ops.json` (the same rows, machine-readable, with the profiled steps' wall time) and,
with `trace: true`, a Chrome trace (large: tens of MB for a 0.5B model). Only the main process records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

ROWS = 40


class ProfileSettings(BaseModel):
    """Which optimizer steps to record (the first ones pay for allocation and kernel selection)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    start_step: Annotated[int, Field(ge=1)] = 5
    steps: Annotated[int, Field(ge=1, le=50)] = 3
    trace: bool = False


def _rows(events: Any, device: bool, limit: int) -> list[dict[str, Any]]:
    key = "self_device_time_total" if device else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:limit]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
             **({"self_device_ms": round((getattr(e, "self_device_time_total", 0) or 0) / 1e3, 3)} if device else {})}
            for e in ranked]


def profile_callback(settings: ProfileSettings, out: Path) -> Any:
    """A TrainerCallback recording optimizer steps start_step .. start_step + steps - 1 into `out`."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.t0 = 0.0
            self.done = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # global_step counts finished steps: the step about to run is global_step + 1
            if self.prof is None and not self.done and state.is_world_process_zero and state.global_step + 1 == settings.start_step:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.prof is None or state.global_step < settings.start_step + settings.steps - 1:
                return
            device = torch.cuda.is_available()
            if device:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            out.mkdir(parents=True, exist_ok=True)
            events = self.prof.key_averages()
            sort = "self_cuda_time_total" if device else "self_cpu_time_total"
            (out / "ops.txt").write_text(events.table(sort_by=sort, row_limit=ROWS, max_name_column_width=70) + "\n",
                                         encoding="utf-8")
            summary = {"steps": list(range(settings.start_step, settings.start_step + settings.steps)),
                       "wall_seconds_per_step": round(wall / settings.steps, 4),
                       "self_device_seconds_per_step": round(
                           sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e6 / settings.steps, 4)
                       if device else None,
                       "ops": _rows(events, device, ROWS)}
            (out / "ops.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            if settings.trace:
                self.prof.export_chrome_trace(str(out / "trace.json"))
            self.prof, self.done = None, True

    return ProfileSteps()
