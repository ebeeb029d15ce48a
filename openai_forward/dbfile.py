"""What the gateway's SQLite stores (forward keys, usage records) do alike with their file."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable


def create_private(path: str) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (and its parent dirs):
    SQLite then gives its -wal and -shm files the same mode."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def set_up_or_close(
    conn: sqlite3.Connection,
    set_up: Callable[[sqlite3.Connection], None],
    error: Callable[[str], Exception],
    name: str,
) -> None:
    """Run ``set_up`` on a new connection; on failure close it, and turn a file that is not
    a database into ``error`` with a message fit for a user."""
    try:
        set_up(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise error(
            f"{name} is not a usable SQLite database ({exc}); "
            "move it away or point the gateway at another file"
        ) from None
    except BaseException:
        conn.close()
        raise
