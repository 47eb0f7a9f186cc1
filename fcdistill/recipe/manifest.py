"""RUN/STAGE/stage.json: what one stage of a recipe run ran with and made (read by the runner, the
report and `fcd runs show`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"


def read_stage(out: Path, stage: str) -> dict[str, Any] | None:
    path = out / stage / STAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_stage(out: Path, stage: str, record: dict[str, Any]) -> None:
    """Atomically: a run killed while writing leaves the previous record."""
    path = out / stage / STAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
