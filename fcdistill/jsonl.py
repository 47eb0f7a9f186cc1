"""Durable JSONL and JSON files for resumable runs: append-only logs and atomic rewrites.

A killed run must neither lose nor duplicate output. Per-item results are appended one whole line
at a time; a line torn by a kill is cut off on the next open, and ids already present are skipped.
Whole files are written to a temporary name and renamed over the old one, so a reader sees the old
file or the new one, never half of one. Every stage (teacher, eval, data) uses these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def repair_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, after cutting off a torn last line (a kill mid-write) in place."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    rows = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line in the middle can only come from outside tampering; skip it
    return rows


class JsonlLog:
    """An append-only JSONL file of per-item results; `done` holds the ids already written."""

    def __init__(self, path: Path, key: str = "id"):
        self.path = path
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict[str, Any]] = {}
        for row in repair_jsonl(path):
            self.rows[str(row.get(key))] = row  # a later line wins (never happens unless edited)
        self._f = path.open("a", encoding="utf-8")

    @property
    def done(self) -> set[str]:
        return set(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        """Write one whole line and flush it to the OS (a process kill cannot lose it after this)."""
        ident = str(row[self.key])
        if ident in self.rows:
            return
        self._f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        self._f.flush()
        self.rows[ident] = row

    def drop(self, ids: Iterable[str]) -> None:
        """Forget rows (e.g. stale ones); they disappear from the file at the next compact()."""
        for i in ids:
            self.rows.pop(str(i), None)

    def compact(self) -> None:
        """Rewrite sorted by id, atomically, so a finished run's file is deterministic."""
        self._f.close()
        write_jsonl_atomic(self.path, [self.rows[k] for k in sorted(self.rows)])
        self._f = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]], sort_keys: bool = True) -> None:
    """Write rows to a temporary file, fsync, then rename over `path`: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=sort_keys) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    """One JSON document (indented, keys sorted), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
