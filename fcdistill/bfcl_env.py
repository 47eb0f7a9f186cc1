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


# A model name registered in bfcl_eval whose config keeps dots in function names: ast_checker looks
# the name up, and dotted BFCL names (`math.factorial`) are then compared as they are.
CHECKER_MODEL = "gorilla-openfunctions-v2"


def ast_check(functions: list[dict[str, Any]], calls: list[dict[str, Any]], possible_answer: Any, language: str,
              category: str) -> tuple[bool, str | None, str | None]:
    """bfcl_eval's own ast_checker on decoded calls (`[{"fn": {"arg": value}}]`), on copies (it edits
    its inputs): (valid, error type, error text). One checker for the eval scorer, the teacher's mix-in
    score and the data stage's label check; a checker that raises on a shape it does not expect counts
    as a rejection, with the reason."""
    import copy

    checker = bfcl_import("bfcl_eval.eval_checker.ast_eval.ast_checker", "ast_checker")
    lang = bfcl_import("bfcl_eval.constants.enums", "Language")
    try:
        result = checker(copy.deepcopy(functions), copy.deepcopy(calls), copy.deepcopy(possible_answer), lang(language),
                         category, CHECKER_MODEL)
    except Exception as exc:  # noqa: BLE001 - the checker asserts on shapes it does not expect
        return False, "checker:exception", f"ast_checker raised {type(exc).__name__}: {exc}"[:300]
    if result.get("valid"):
        return True, None, None
    errors = result.get("error") or []
    text = "; ".join(map(str, errors if isinstance(errors, list) else [errors]))
    return False, str(result.get("error_type") or "ast:invalid"), text[:300] or None


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
