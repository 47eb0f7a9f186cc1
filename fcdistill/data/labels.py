"""Teacher labels on disk, and how exports merge them into BFCL records (light imports only).

The format is the contract between `fcd label` (teacher/label.py writes it) and `fcd data export`
(export.py reads it), so it lives here, upstream of both.

`fcd label --data DATA` writes DATA/labels/:
- teacher.jsonl    accepted labels, one per record id: calls or text, agreement, votes, verification
- rejected.jsonl   labels that failed verification, with every reason (never trained on)
- mixin_check.jsonl the teacher's answers on mix-in items, scored against the ground truth
- summary.json, config.json

`apply_teacher_labels` is what data/export.py calls to train on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

LABELS_DIR = "labels"
ACCEPTED = "teacher.jsonl"
REJECTED = "rejected.jsonl"
MIXIN = "mixin_check.jsonl"
TEACHER_LABELED = "teacher_labeled"  # label_source of a record whose target now comes from the teacher


def record_hash(record: Any) -> str:
    """What a label answers: the question and its tools. A label whose hash differs is stale."""
    payload = {"messages": record.messages, "tools": [t.model_dump() for t in record.tools]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run; `fcd label` repairs it on resume
    return rows


def load_teacher_labels(data_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(accepted, rejected) label rows by record id."""
    base = Path(data_dir) / LABELS_DIR
    accepted = {r["id"]: r for r in _read_rows(base / ACCEPTED) if r.get("status") == "ok"}
    rejected = {r["id"]: r for r in _read_rows(base / REJECTED)}
    return accepted, rejected


def apply_teacher_labels(records: list[Any], data_dir: Path) -> tuple[list[Any], list[str]]:
    """Records with the teacher's labels applied, and a note for each teacher record left without one.

    A record with label_source "teacher" and an accepted, current label gets the teacher's target:
    `ground_truth` becomes the teacher's calls (BFCL's own answer is dropped, it is not ours to train
    on) or, for a text answer, `ground_truth=None` and `target_content` the teacher's text; its
    label_source becomes "teacher_labeled" and label_errors is cleared (the label passed our checks).
    Other records come back unchanged, mix-in ("ground_truth") included.
    """
    from fcdistill.tools import ToolCall

    accepted, rejected = load_teacher_labels(data_dir)
    out, notes = [], []
    for rec in records:
        if rec.label_source != "teacher":
            out.append(rec)
            continue
        label = accepted.get(rec.id)
        if label is None:
            bad = rejected.get(rec.id)
            if bad is not None:
                why = (bad.get("reasons") or [{}])[0]
                notes.append(f"{rec.id}: teacher label rejected: {why.get('stage')}/{why.get('code')}: {why.get('detail')}")
            else:
                notes.append(f"{rec.id}: awaits teacher labels")
            out.append(rec)
            continue
        if label.get("record_hash") != record_hash(rec):
            notes.append(f"{rec.id}: teacher label is stale (the question or tools changed); rerun `fcd label`")
            out.append(rec)
            continue
        calls = label.get("calls")
        update: dict[str, Any] = {"label_source": TEACHER_LABELED, "label_errors": []}
        if calls:
            update.update(ground_truth=[ToolCall(**c) for c in calls], target_content=None)
        else:
            update.update(ground_truth=None, target_content=label.get("content") or "")
        out.append(rec.model_copy(update=update))
    return out, notes
