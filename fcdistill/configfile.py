"""Config files (training configs, recipes, teacher settings): a YAML mapping, or one line saying why not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(path: Path, what: str, error: type[ValueError]) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty one); `error`, one line
    naming the file and the line, otherwise."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{path}: not valid YAML{where}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise error(f"{path}: expected a mapping of fields at the top level")
    return tree


def existing_file(path: Path, what: str) -> Path:
    """`path` when it is a file; otherwise a ValueError naming `what` (a config field validator's error)."""
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} is not a file: {path}")
    return path
