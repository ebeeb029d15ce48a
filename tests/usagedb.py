"""Reading a gateway's usage rows from its SQLite file, as an operator would."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any


def rows(db: str) -> list[dict[str, Any]]:
    """Every usage row, oldest first (empty while the table does not exist yet)."""
    if not os.path.exists(db):
        return []
    conn = sqlite3.connect(db, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
        ).fetchone()
        if found is None:
            return []
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts, rowid")]
    finally:
        conn.close()


def wait_rows(db: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The rows once there are at least ``n`` (the writer flushes every interval; a separate
    process offers no event to wait on, so this polls the file)."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows(db)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
