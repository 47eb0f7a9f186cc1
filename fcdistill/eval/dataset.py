"""The eval set: eval-split records of a data dir, checked against the installed bfcl-eval.

Scoring must see what BFCL's own evaluator sees: the function docs exactly as in bfcl_eval's data
files (its checker reads types and required parameters from them) and the raw possible answers.
The model, in turn, is shown the docs with BFCL's language hint, as `bfcl generate` shows them.
A manifest written under another bfcl-eval version (or over other data files) is refused: its ids
and answers need not match what the checker would compare against.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcdistill.bfcl_env import with_language_hint
from fcdistill.data.bfcl import (
    KNOWN_CATEGORIES,
    MULTI_TURN_CATEGORIES,
    NO_CALL_CATEGORIES,
    RELEVANCE_CATEGORIES,
    DataError,
    Record,
    category_language,
    read_manifest,
    read_records,
)

# The held-out split of `fcd synth` (its val.jsonl), scored like BFCL's: the irrelevance style
# by "no call", the others by bfcl_eval's ast_checker over the tools converted to BFCL's docs.
SYNTH_SPLIT = "val.jsonl"
SYNTH_IRRELEVANCE = "synth_irrelevance"

class EvalError(ValueError):
    """Bad eval input (manifest, categories, endpoint, run dir); the CLI prints one line and exits 2."""


def category_kind(category: str) -> str:
    """`irrelevance` (correct: no call), `relevance` (correct: any call), `multi_turn` (a conversation,
    bfcl's multi-turn checker) or `ast` (BFCL's checker)."""
    if category in MULTI_TURN_CATEGORIES:
        return "multi_turn"
    if category in NO_CALL_CATEGORIES or category == SYNTH_IRRELEVANCE:
        return "irrelevance"
    if category in RELEVANCE_CATEGORIES:
        return "relevance"
    return "ast"


@dataclass
class EvalItem:
    """One question with everything needed to ask it and to score the answer."""

    record: Record
    functions: list[dict[str, Any]]  # BFCL's docs as in its data file: what its checker gets
    shown_functions: list[dict[str, Any]]  # with BFCL's language hint: what `bfcl generate` shows
    # multi-turn: bfcl's entry as `bfcl generate` reads it (turns, held-back docs, initial state) and
    # the ground-truth call texts of each turn
    entry: dict[str, Any] | None = None
    turn_answers: list[list[str]] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def category(self) -> str:
        return self.record.category

    @property
    def language(self) -> str:
        return category_language(self.record.category)

    @property
    def checker_category(self) -> str:
        """The category bfcl_eval's ast_checker dispatches on. A synthetic example offers several tools
        even when it calls one: it is checked as `multiple` (the simple checker reads the first tool)."""
        c = self.record.category
        return "multiple" if c.startswith("synth_") and "parallel" not in c else c


def resolve_data_dir(manifest: str | Path) -> Path:
    """--manifest may name manifest.json itself or the data directory holding it."""
    path = Path(manifest)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    raise EvalError(f"manifest {path} not found: give the data dir written by `fcd data bfcl` or its manifest.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest(data_dir: Path, categories: list[str]) -> dict[str, Any]:
    """The manifest, after refusing one written under another bfcl-eval version or other data files."""
    from fcdistill.bfcl_env import BfclMissingError, bfcl_data_dir, bfcl_version

    try:
        manifest = read_manifest(data_dir)
        here = bfcl_version()
    except (DataError, BfclMissingError) as exc:
        raise EvalError(str(exc)) from None
    theirs = manifest.get("bfcl_eval_version")
    if theirs != here:
        raise EvalError(f"{data_dir / 'manifest.json'} was written with bfcl-eval {theirs}, but this environment "
                        f"has bfcl-eval {here}: ids and answers may differ; re-run `fcd data bfcl` here "
                        f"(or install bfcl-eval=={theirs})")
    sources = manifest.get("source_files") or {}
    for category in categories:
        for rel in (f"BFCL_v4_{category}.json", f"possible_answer/BFCL_v4_{category}.json"):
            want = sources.get(rel)
            path = bfcl_data_dir() / rel
            if want is not None and path.is_file() and _sha256(path) != want:
                raise EvalError(f"bfcl_eval's {rel} differs from the file {data_dir / 'manifest.json'} was built "
                                f"from (same version {here}, other contents); re-run `fcd data bfcl`")
    return manifest


def bfcl_functions(category: str, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """id -> the `function` list of that question, read from bfcl_eval's own data file."""
    from fcdistill.bfcl_env import bfcl_data_dir

    out: dict[str, list[dict[str, Any]]] = {}
    with (bfcl_data_dir() / f"BFCL_v4_{category}.json").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                if item["id"] in ids:
                    out[item["id"]] = item["function"]
    return out


_BFCL_TYPES = {"object": "dict", "number": "float"}


def bfcl_doc_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema in the shape of BFCL's function docs (dict, float; nested items and properties
    converted too), which bfcl_eval's checker reads types and required parameters from."""
    out = dict(schema)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the checker takes one type
        kind = next((k for k in kind if k != "null"), "string")
    out["type"] = _BFCL_TYPES.get(kind, kind) if kind else "any"
    if isinstance(schema.get("items"), dict):
        out["items"] = bfcl_doc_schema(schema["items"])
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: bfcl_doc_schema(v) for k, v in schema["properties"].items()}
    return out


def synth_item(rec: Record) -> EvalItem:
    """A synthetic example as an eval item: BFCL-shaped docs, and a possible answer in which every
    argument of the target is required as given and an optional parameter left out may be omitted
    (or given its default)."""
    functions = [{"name": t.name, "description": t.description, "parameters": bfcl_doc_schema(t.parameters)}
                 for t in rec.tools]
    answer = None
    if rec.ground_truth:
        params = {t.name: t.parameters.get("properties") or {} for t in rec.tools}
        answer = []
        for call in rec.ground_truth:
            args: dict[str, list[Any]] = {k: [v] for k, v in call.arguments.items()}
            for name, spec in params.get(call.name, {}).items():
                if name not in args:
                    args[name] = ([spec["default"]] if "default" in spec else []) + [""]
            answer.append({call.name: args})
    return EvalItem(record=rec.model_copy(update={"possible_answer": answer}), functions=functions,
                    shown_functions=functions)


def load_synth_eval_set(data_dir: Path, categories: list[str] | None,
                        limit_per_category: int | None) -> tuple[Path, dict[str, Any], list[EvalItem]]:
    """(dir, manifest, items) of a `fcd synth` output's held-out split (val.jsonl)."""
    path = data_dir / SYNTH_SPLIT
    records = [Record.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    present = list(dict.fromkeys(r.category for r in records))
    if not records:
        raise EvalError(f"{path} holds no example: fcd synth kept none for its val split (raise val_fraction)")
    unknown = [c for c in categories or [] if c not in present]
    if unknown:
        raise EvalError(f"categories {', '.join(unknown)} have no items in {path}; it has: {', '.join(present)}")
    items: list[EvalItem] = []
    for category in categories or present:
        recs = [r for r in records if r.category == category]
        items += [synth_item(r) for r in recs[:limit_per_category]]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return data_dir, {"kind": "synth", "split_sha256": digest, "seed": None}, items


def multi_turn_items(category: str, records: list[Record]) -> list[EvalItem]:
    from fcdistill.bfcl_env import multi_turn_entries, multi_turn_ground_truth

    entries, answers = multi_turn_entries(category), multi_turn_ground_truth(category)
    items = []
    for r in records:
        if r.id not in entries or r.id not in answers:
            raise EvalError(f"{r.id} is not in bfcl_eval's BFCL_v4_{category}.json and its possible answers")
        e = entries[r.id]
        items.append(EvalItem(record=r, functions=e["function"], shown_functions=e["function"], entry=e,
                              turn_answers=answers[r.id]))
    return items


def load_eval_set(manifest: str | Path, categories: list[str] | None = None,
                  limit_per_category: int | None = None) -> tuple[Path, dict[str, Any], list[EvalItem]]:
    """(data dir, manifest, items) for the chosen categories of the eval split, in file order; a
    `fcd synth` output directory gives its held-out val split instead."""
    data_dir = resolve_data_dir(manifest)
    if not (data_dir / "manifest.json").is_file() and (data_dir / SYNTH_SPLIT).is_file():
        return load_synth_eval_set(data_dir, categories, limit_per_category)
    try:
        records = read_records(data_dir, "eval")
    except DataError as exc:
        raise EvalError(str(exc)) from None
    present = list(dict.fromkeys(r.category for r in records))
    wanted = list(dict.fromkeys(categories)) if categories else present
    for c in wanted:
        if c not in KNOWN_CATEGORIES:
            raise EvalError(f"unknown BFCL category {c!r}; known: {', '.join(KNOWN_CATEGORIES)}")
        if c not in present:
            raise EvalError(f"category {c!r} has no eval items in {data_dir}; it has: {', '.join(present) or 'none'}")
    manifest_data = check_manifest(data_dir, wanted)
    eval_ids = set((manifest_data.get("splits") or {}).get("eval") or [])
    stray = [r.id for r in records if r.id not in eval_ids]
    if stray:
        raise EvalError(f"{data_dir / 'eval.jsonl'} holds ids the manifest does not list as eval (e.g. {stray[0]}); "
                        f"the data dir is inconsistent: re-run `fcd data bfcl`")
    items: list[EvalItem] = []
    for category in wanted:
        recs = [r for r in records if r.category == category]
        if limit_per_category is not None:
            recs = recs[:limit_per_category]
        if category in MULTI_TURN_CATEGORIES:
            items += multi_turn_items(category, recs)
            continue
        docs = bfcl_functions(category, {r.id for r in recs})
        for r in recs:
            if r.id not in docs:
                raise EvalError(f"{r.id} is not in bfcl_eval's BFCL_v4_{category}.json")
            items.append(EvalItem(record=r, functions=docs[r.id], shown_functions=with_language_hint(r.id, docs[r.id])))
    return data_dir, manifest_data, items
