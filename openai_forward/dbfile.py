"""What the gateway's SQLite stores (forward keys, usage records) do alike with their file."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable


def bind_plainly() -> None:
    """Make sqlite3 bind None and bytes without its adaptation protocol.

    CPython's sqlite3 adapts every parameter that is not exactly int, float, str or
    bytearray: it looks ``__adapt__`` up on its protocol type, and the failed lookup formats
    an AttributeError each time (about 1,800 instructions, 5 times per usage row for its
    NULLs, twice per cache lookup for its key). An adapter registered for the type is found
    first. These return their argument unchanged, from C: ``{}.get(None)`` is None, and
    ``bytes(b)`` is ``b`` itself."""
    sqlite3.register_adapter(type(None), {}.get)  # type: ignore[arg-type]  # C, returns None
    sqlite3.register_adapter(bytes, bytes)


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
    bind_plainly()
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
