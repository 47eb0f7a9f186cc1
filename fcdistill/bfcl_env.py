"""Importing bfcl_eval safely: its data location, version, and imports that do not write into site-packages.

bfcl_eval creates result/score folders under BFCL_PROJECT_ROOT at import time (inside site-packages
when unset), so every import of it goes through here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any


class BfclMissingError(RuntimeError):
    """bfcl_eval is not installed in this environment."""


def bfcl_package_dir() -> Path:
    """The installed bfcl_eval package directory, found without importing it."""
    try:
        spec = importlib.util.find_spec("bfcl_eval")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BfclMissingError("bfcl_eval is not installed (pip install bfcl-eval)")
    return Path(next(iter(spec.submodule_search_locations)))


def bfcl_data_dir() -> Path:
    return bfcl_package_dir() / "data"


def bfcl_version() -> str:
    bfcl_package_dir()
    return importlib.metadata.version("bfcl-eval")


def bfcl_import(module: str, attr: str | None = None, project_root: str | os.PathLike | None = None) -> Any:
    """Import a bfcl_eval module (or one attribute of it) with BFCL_PROJECT_ROOT pointed somewhere safe."""
    bfcl_package_dir()
    if project_root is not None:
        os.environ["BFCL_PROJECT_ROOT"] = str(project_root)
    else:
        os.environ.setdefault("BFCL_PROJECT_ROOT", str(Path(tempfile.gettempdir()) / "fcdistill-bfcl"))
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def with_language_hint(item_id: str, functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The docs as `bfcl generate` shows them: bfcl_eval's own language-hint preprocessing (a copy)."""
    import copy

    add_hint = bfcl_import("bfcl_eval.utils", "add_language_specific_hint_to_function_doc")
    return add_hint([{"id": item_id, "function": copy.deepcopy(functions)}])[0]["function"]


def multi_turn_entries(category: str) -> dict[str, dict[str, Any]]:
    """id -> one multi-turn entry exactly as `bfcl generate` reads it (bfcl_eval's own loader): every
    involved class's function docs in `function` with the language hint, the docs miss_func holds back
    in `missed_function` (turn index -> docs), the user turns in `question`."""
    load = bfcl_import("bfcl_eval.utils", "load_dataset_entry")
    return {e["id"]: e for e in load(category, include_prereq=False)}


def multi_turn_ground_truth(category: str) -> dict[str, list[list[str]]]:
    """id -> the ground-truth calls of each turn, as text (`cd(folder='document')`)."""
    load = bfcl_import("bfcl_eval.utils", "load_ground_truth_entry")
    return {e["id"]: e["ground_truth"] for e in load(category)}
