"""The request cache: every answered request committed to SQLite, keyed by a hash of its body.

A killed run must not pay twice. The client commits each answer (WAL, one commit per write) before
its result is used, so a rerun replays it for free. Namespaces keep other cached work apart (the
teacher's executor caches tool executions under "exec").
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any


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
