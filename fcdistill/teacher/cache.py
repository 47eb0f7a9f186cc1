"""Durable state for resumable runs: a SQLite cache of answered requests and append-only JSONL logs.

A killed run must neither pay twice nor lose or duplicate output. Every answered teacher request is
committed to SQLite (WAL) before its result is used, keyed by a hash of the request body, so a rerun
replays it for free. Per-item results are appended to JSONL one whole line at a time; a line torn by
a kill is cut off on the next open, and ids already present are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable


def request_key(payload: Any) -> str:
    """A stable hash of a JSON-serializable request (keys sorted, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """key -> JSON value in one SQLite file, safe across processes, committed per write."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process kill
        self._db.execute("CREATE TABLE IF NOT EXISTS cache (ns TEXT, key TEXT, value TEXT, PRIMARY KEY (ns, key))")

    def get(self, key: str, ns: str = "chat") -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM cache WHERE ns=? AND key=?", (ns, key)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any, ns: str = "chat") -> None:
        text = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO cache (ns, key, value) VALUES (?, ?, ?)", (ns, key, text))

    def count(self, ns: str = "chat") -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM cache WHERE ns=?", (ns,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


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


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows to a temporary file, fsync, then rename over `path`: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
