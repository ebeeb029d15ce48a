"""The cache in an SQLite file of its own: the default backend (see ``cachestore.py``).

The ``cache`` table holds one row per entry (key, size, expires, last_used, value), in WAL
mode with file mode 0600. Every statement runs on one thread per store, so the event loop
never waits on the file; writes are ``BEGIN IMMEDIATE`` with a busy timeout, so several
worker processes (or gateways on one host) share the file. Over ``max_bytes`` (the sum of
entry sizes) the least recently used entries go; expired ones are removed lazily, a few per
write. A lookup records its hit or miss and the entry's new ``last_used`` in memory; that is
written with the next put, or after a second or 64 lookups by a write that gives up at once
if another process holds the lock: a lookup never waits for a writer, and LRU order is
approximate by design.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .cache import Entry
from .cachestore import DEFAULT_MAX_BYTES, CacheError
from .dbfile import create_private, set_up_or_close

log = logging.getLogger("openai_forward")
_T = TypeVar("_T")

FOLD_EVERY = 1.0  # seconds between writes of a reading process's counts and touches
FOLD_AFTER = 64  # ... or after this many lookups
EXPIRED_BATCH = 32  # expired rows removed per write
BOOK_LIMIT = 4096  # touches kept while the file is locked for long; more are forgotten

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cache_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
    # value last: reading size or expires never walks a large value's overflow pages
    "CREATE TABLE IF NOT EXISTS cache (key BLOB PRIMARY KEY, size INTEGER NOT NULL,"
    " expires REAL NOT NULL, last_used REAL NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS cache_last_used ON cache (last_used)",
    "CREATE INDEX IF NOT EXISTS cache_expires ON cache (expires)",
    "INSERT OR IGNORE INTO cache_meta (k, v)"
    " VALUES ('schema_version', 1), ('bytes', 0), ('hits', 0), ('misses', 0)",
)
_UPSERT = (
    "INSERT INTO cache (key, size, expires, last_used, value) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET size = excluded.size, expires = excluded.expires,"
    " last_used = excluded.last_used, value = excluded.value"
)
_ADD = "UPDATE cache_meta SET v = max(v + ?, 0) WHERE k = ? RETURNING v"


class _Book:
    """What lookups learnt that the file has not been told yet (the store thread's only)."""

    __slots__ = ("drop", "expired", "folded", "hits", "misses", "touched")

    def __init__(self, folded: float = 0.0) -> None:
        self.hits = self.misses = 0
        self.touched: dict[bytes, float] = {}
        self.expired: set[bytes] = set()
        self.drop: set[bytes] = set()  # rows that do not decode
        self.folded = folded

    def absorb(self, other: _Book) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.touched = {**other.touched, **self.touched}
        self.expired |= other.expired
        self.drop |= other.drop


class SqliteCache:
    """Entries in the ``cache`` table of the SQLite file ``path`` (created 0600 if absent).

    ``CacheError`` if the file cannot be created or is not a usable SQLite database.
    ``max_bytes`` bounds the sum of stored entry sizes; an entry larger is not stored.
    """

    def __init__(
        self,
        path: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        *,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._clock = clock
        self._busy_ms = int(busy_timeout * 1000)
        self._book = _Book(time.monotonic())
        self._failing = self._closed = False
        self._conn: sqlite3.Connection | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache")
        try:
            self._conn = self._thread.submit(self._open, busy_timeout).result()
        except BaseException:
            self._thread.shutdown(wait=True)
            raise

    def __repr__(self) -> str:
        return f"SqliteCache({self.path!r}, max_bytes={self.max_bytes})"

    async def get(self, key: bytes, now: float | None = None) -> Entry | None:
        """The live entry under ``key``, or None (absent, expired, unreadable, failing)."""
        return await self._run(self._get, None, key, self._clock() if now is None else now)

    async def put(self, key: bytes, entry: Entry, ttl: float, now: float | None = None) -> None:
        """Store ``entry`` under ``key`` for ``ttl`` seconds, replacing any entry there."""
        if ttl > 0:
            await self._run(self._put, None, key, entry, ttl, self._clock() if now is None else now)

    async def delete(self, key: bytes) -> None:
        """Remove the entry under ``key``, if any."""
        await self._run(self._delete, None, key)

    async def count_hits(self, n: int) -> None:
        """Count ``n`` hits answered without this store (from a worker's memory)."""
        if n > 0:
            await self._run(self._count_hits, None, n)

    def _count_hits(self, n: int) -> None:
        self._book.hits += n

    async def clear(self) -> int:
        """Remove every entry; return how many there were."""
        return await self._admin(self._clear)

    async def stats(self) -> dict[str, Any]:
        """``backend``, ``path``, ``entries``, ``bytes``, ``max_bytes``, ``hits``, ``misses``."""
        return await self._admin(self._stats)

    async def aclose(self) -> None:
        """Write what lookups learnt, close the file and stop the thread (idempotent).
        Later lookups miss and later puts are dropped."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # on the loop

    async def _run(self, fn: Callable[..., _T], default: _T, *args: Any) -> _T:
        if self._closed:
            return default
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as exc:
            if not self._failing:
                self._failing = True
                log.warning("cache %s unusable, serving without it: %s", self.path, exc)
            return default
        if self._failing:
            self._failing = False
            log.info("cache %s usable again", self.path)
        return result

    async def _admin(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise CacheError(f"the cache {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
        except sqlite3.Error as exc:
            raise CacheError(f"cache {self.path}: {exc}") from None

    # on the store's thread

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        try:
            create_private(self.path)
            conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the cache {self.path}: {exc}") from None
        set_up_or_close(conn, self._set_up, CacheError, self.path)
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        # switching to WAL does not wait for another process creating the same file
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise CacheError(f"{self.path}: cannot switch to WAL mode")
                conn.execute("PRAGMA synchronous = NORMAL")  # a cache may lose its last writes
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("closed")
        return self._conn

    def _get(self, key: bytes, now: float) -> Entry | None:
        row = self._db().execute("SELECT expires, value FROM cache WHERE key = ?", (key,))
        found = row.fetchone()
        book = self._book
        entry = None
        room = len(book.touched) + len(book.expired) < BOOK_LIMIT
        if found is not None and found[0] > now:
            try:
                entry = Entry.decode(found[1])
            except ValueError:
                book.drop.add(key)
        elif found is not None and room:
            book.expired.add(key)
        if entry is None:
            book.misses += 1
        else:
            book.hits += 1
            if room:
                book.touched[key] = now
        if book.hits + book.misses >= FOLD_AFTER or time.monotonic() - book.folded > FOLD_EVERY:
            self._fold_now(now)
        return entry

    def _put(self, key: bytes, entry: Entry, ttl: float, now: float) -> None:
        value = entry.encode()
        if len(value) > self.max_bytes:
            return

        def work(conn: sqlite3.Connection) -> None:
            old = conn.execute("SELECT size FROM cache WHERE key = ?", (key,)).fetchone()
            conn.execute(_UPSERT, (key, len(value), now + ttl, now, value))
            self._fold(conn, now)
            grown = len(value) - (old[0] if old else 0)
            total = conn.execute(_ADD, (grown, "bytes")).fetchone()[0]
            if total > self.max_bytes:
                self._evict(conn, key, total - self.max_bytes)

        self._write(work)

    def _delete(self, key: bytes) -> None:
        def work(conn: sqlite3.Connection) -> None:
            gone = conn.execute("DELETE FROM cache WHERE key = ? RETURNING size", (key,))
            conn.execute(_ADD, (-sum(r[0] for r in gone.fetchall()), "bytes")).fetchall()

        self._write(work)

    def _clear(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM cache").rowcount
            conn.execute("UPDATE cache_meta SET v = 0 WHERE k = 'bytes'")
            return n

        self._book.touched.clear()
        return self._write(work)

    def _stats(self) -> dict[str, Any]:
        conn = self._db()
        entries, size = conn.execute("SELECT COUNT(*), TOTAL(size) FROM cache").fetchone()
        meta = dict(conn.execute("SELECT k, v FROM cache_meta").fetchall())
        return {
            "backend": "sqlite",
            "path": self.path,
            "entries": entries,
            "bytes": int(size),
            "max_bytes": self.max_bytes,
            "hits": meta.get("hits", 0) + self._book.hits,
            "misses": meta.get("misses", 0) + self._book.misses,
        }

    def _close(self) -> None:
        conn, pending = self._conn, self._book
        if conn is None:
            return
        if pending.hits or pending.misses or pending.touched:
            try:
                self._write(lambda c: self._fold(c, self._clock()))
            except sqlite3.Error as exc:
                log.warning("cache %s: counts of the last lookups not written: %s", self.path, exc)
        self._conn = None
        conn.close()

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _fold_now(self, now: float) -> None:
        """Write the book if the lock is free at once: a lookup never waits for a writer."""
        conn = self._db()
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            self._write(lambda c: self._fold(c, now))
        except sqlite3.OperationalError:
            pass  # busy: the next put or lookup tries again
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    def _fold(self, conn: sqlite3.Connection, now: float) -> None:
        """Apply the book inside the caller's transaction."""
        book, self._book = self._book, _Book(time.monotonic())
        try:
            conn.executemany(
                "UPDATE cache SET last_used = ?1 WHERE key = ?2 AND last_used < ?1",
                ((t, k) for k, t in book.touched.items()),
            )
            conn.executemany(_ADD, ((book.hits, "hits"), (book.misses, "misses")))
            freed = 0
            for key in book.expired | book.drop:
                gone = conn.execute(
                    "DELETE FROM cache WHERE key = ? AND (expires <= ? OR ?) RETURNING size",
                    (key, now, key in book.drop),
                )
                freed += sum(r[0] for r in gone.fetchall())
            gone = conn.execute(
                "DELETE FROM cache WHERE key IN (SELECT key FROM cache WHERE expires <= ?"
                " ORDER BY expires LIMIT ?) RETURNING size",
                (now, EXPIRED_BATCH),
            )
            freed += sum(r[0] for r in gone.fetchall())
            conn.execute(_ADD, (-freed, "bytes")).fetchall()
        except BaseException:
            self._book.absorb(book)  # rolled back: keep it for the next write
            raise

    def _evict(self, conn: sqlite3.Connection, keep: bytes, excess: int) -> None:
        """Remove least recently used entries (never ``keep``) until ``excess`` bytes went."""
        victims: list[tuple[bytes]] = []
        freed = 0
        rows = conn.execute(
            "SELECT key, size FROM cache WHERE key != ? ORDER BY last_used", (keep,)
        )
        for key, size in rows:
            victims.append((key,))
            freed += size
            if freed >= excess:
                break
        rows.close()
        conn.executemany("DELETE FROM cache WHERE key = ?", victims)
        conn.execute(_ADD, (-freed, "bytes")).fetchall()
