"""Durable usage records: one row per request in SQLite, written in batches off the event loop.

The rows live in the ``usage`` table of the gateway's database file (``database`` config key),
beside the key store's tables, and follow its conventions (see keystore.py): WAL mode,
``busy_timeout`` 5 s, every write in a ``BEGIN IMMEDIATE`` transaction (concurrent writers in
several processes queue instead of failing with ``database is locked``), file mode 0600,
parameterised SQL only, failures raised as ``RecordStoreError`` with a message fit for a user.
The table's schema version is kept in its own ``usage_meta`` table, so the key store's ``meta``
table stays the key store's alone.

Durability, chosen for the write rate of a busy gateway:

* ``synchronous=NORMAL`` on the record connections: a commit does not wait for an fsync, so a
  committed batch survives a crash of the process but may roll back after an OS crash or a
  power loss. (The key store keeps ``FULL`` on its own connection.)
* ``RecordWriter`` keeps rows in memory until its next flush (every ``interval`` seconds): a
  SIGKILL loses at most the rows of one interval; SIGTERM (``aclose``) loses none.
* Rows are inserted with ``ON CONFLICT DO NOTHING`` under ``UNIQUE (ts, request_id)``, so a batch
  written twice (a retry, or ``close_sync`` racing the writer thread) is counted once. The key
  starts with ``ts`` rather than being ``request_id`` alone because request ids are random: a
  unique index on them alone takes a random B-tree insert per row (13 µs/row, 28 µs/row once
  the table holds a million rows), while ``(ts, ...)`` appends (8 µs/row, flat), and the same
  index serves every time-range query.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import operator
import os
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from .dbfile import create_private, set_up_or_close

log = logging.getLogger("openai_forward")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 5.0  # seconds; read at connect time
MAX_PENDING = 100_000  # rows a writer keeps while the file is unusable; older ones are dropped


# One request as recorded: a dict, because the access log writes it out almost as it is
# (see eventlog.json_line). Never holds a secret: keys appear by id only. Its keys, in
# the access log's order:
#   time          float, unix seconds at the request's start (the access log writes ISO)
#   request_id    str
#   client_ip     str
#   method        bytes (the access log writes it; not stored)
#   path, route   str
#   status        int: what the client got; 499 when it left before a response
#   key_id, key_name, upstream, upstream_key (the pool key's id, never the key), model
#                 str or None
#   stream        0 or 1 (flags are ints: SQLite binds them as they are; the logs write
#                 true or false)
#   ttfb_ms       float or None
#   duration_ms   float
#   prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens   int
#   estimated     0 or 1
#   cost          float or None
#   cache         "hit", "miss" or None (stored as the cache_hit flag)
#   client_closed 0 or 1
#   error_code    str or None
UsageRow = dict[str, Any]


def usage_row(
    request_id: str,
    ts: float,
    key_id: str | None,
    key_name: str | None,
    client_ip: str,
    route: str,
    path: str,
    upstream: str | None,
    upstream_key: str | None,
    model: str | None,
    status: int,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    reasoning_tokens: int,
    estimated: bool,
    stream: bool,
    client_closed: bool,
    ttfb_ms: float | None,
    duration_ms: float,
    cost: float | None,
    error_code: str | None,
    cache: str | None = None,
    method: bytes = b"POST",
) -> UsageRow:
    """A row, in the stored columns' order of arguments. (The request path writes its dict
    literally, in ``accounting.Meter.finish``: a call costs more.)"""
    return {
        "time": ts,
        "request_id": request_id,
        "client_ip": client_ip,
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "key_id": key_id,
        "key_name": key_name,
        "upstream": upstream,
        "upstream_key": upstream_key,
        "model": model,
        "stream": int(stream),
        "ttfb_ms": ttfb_ms,
        "duration_ms": duration_ms,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "reasoning_tokens": reasoning_tokens,
        "estimated": int(estimated),
        "cost": cost,
        "cache": cache,
        "client_closed": int(client_closed),
        "error_code": error_code,
    }


# the stored columns and the row key each comes from (cache_hit: see _INSERT)
_SOURCES = {
    "request_id": "request_id",
    "ts": "time",
    "key_id": "key_id",
    "key_name": "key_name",
    "client_ip": "client_ip",
    "route": "route",
    "path": "path",
    "upstream": "upstream",
    "upstream_key": "upstream_key",
    "model": "model",
    "status": "status",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
    "cached_tokens": "cached_tokens",
    "reasoning_tokens": "reasoning_tokens",
    "estimated": "estimated",
    "stream": "stream",
    "client_closed": "client_closed",
    "ttfb_ms": "ttfb_ms",
    "duration_ms": "duration_ms",
    "cost": "cost",
    "error_code": "error_code",
    "cache_hit": "cache",
}
COLUMNS = tuple(_SOURCES)
_values = operator.itemgetter(*_SOURCES.values())  # a row as a tuple, in column order, in C

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS usage ("
    " request_id TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " key_id TEXT,"
    " key_name TEXT,"
    " client_ip TEXT NOT NULL,"
    " route TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " upstream TEXT,"
    " upstream_key TEXT,"
    " model TEXT,"
    " status INTEGER NOT NULL,"
    " prompt_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL,"
    " cached_tokens INTEGER NOT NULL,"
    " reasoning_tokens INTEGER NOT NULL,"
    " estimated INTEGER NOT NULL,"
    " stream INTEGER NOT NULL,"
    " client_closed INTEGER NOT NULL,"
    " ttfb_ms REAL,"
    " duration_ms REAL NOT NULL,"
    " cost REAL,"
    " error_code TEXT,"
    " cache_hit INTEGER NOT NULL DEFAULT 0,"
    # the row's identity; also the index of time ranges (ts first, so inserts append)
    " UNIQUE (ts, request_id))",
    "CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts)",
)
# not INSERT OR IGNORE: that would also skip, silently, a row breaking a NOT NULL constraint
# cache_hit is bound as the row's "cache" and made 0/1 here
_INSERT = (
    f"INSERT INTO usage ({', '.join(COLUMNS)})"
    f" VALUES ({', '.join('?' * (len(COLUMNS) - 1))}, coalesce(? = 'hit', 0))"
    " ON CONFLICT (ts, request_id) DO NOTHING"
)
# summary(): the group expression per `by`, and the ORDER BY; constants, never user text
GROUPS = {
    "key": "key_id",
    "model": "model",
    "upstream": "upstream",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "route": "route",
    "status": "status",
}
_ORDER = {"day": "g", "status": "g"}  # the rest: biggest spender first
_AGGREGATES = (
    "COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),"
    " SUM(reasoning_tokens), SUM(cost), SUM(estimated), SUM(status >= 400), SUM(client_closed),"
    " SUM(cache_hit), AVG(duration_ms), AVG(ttfb_ms), MIN(ts), MAX(ts), MAX(key_name)"
)
_FILTERS = {
    "since": "ts >= ?",
    "until": "ts < ?",
    "key": "(key_id = ? OR key_name = ?)",
}


class RecordStoreError(Exception):
    """The usage database cannot be used (not SQLite, corrupt, newer schema, locked for longer
    than the busy timeout, disk full...). The message is fit to show a user."""


class BadRecordError(RecordStoreError):
    """A row SQLite refuses (a missing or unstorable value): retrying it cannot help."""


# what a malformed row raises: a NULL in a NOT NULL column, a value SQLite cannot bind, an
# integer beyond 64 bits, something that is not a row
_ROW_ERRORS = (
    KeyError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    OverflowError,
    TypeError,
    ValueError,
    AttributeError,
)


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class RecordStore:
    """The ``usage`` table of one SQLite file, safe to share between processes.

    One instance holds one connection, serialised by a lock; use one instance per thread that
    needs it (a ``RecordWriter`` opens its own in its writer thread). ``readonly=True`` opens
    an existing file without ever writing to it (reports); a file without a ``usage`` table
    then reads as empty.
    """

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        """Open ``path`` (creating it with mode 0600, and the table, unless ``readonly``).

        Raises ``RecordStoreError`` if the file cannot be created or opened, is not a usable
        SQLite database, or holds a newer schema of the table.
        """
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._has_table = True
        try:
            conn = self._connect()
        except OSError as exc:
            raise RecordStoreError(f"cannot create {path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot open {path}: {exc}") from None
        set_up_or_close(conn, self._set_up, RecordStoreError, path)
        self._conn = conn

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
            return sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        create_private(self.path)
        return sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, retried until the busy timeout: switching the journal mode
        does not wait for a lock held by another process creating the same file."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                if not self.readonly:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                    if mode is None or str(mode[0]).lower() != "wal":
                        raise RecordStoreError(f"{self.path}: cannot switch to WAL mode")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    self._create_schema(conn)
                self._check_schema(conn)
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01 + secrets.randbelow(20) / 1000)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage_meta'"
        ).fetchone()
        if found is not None:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO usage_meta (k, v) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name IN ('usage', 'usage_meta')"
            )
        }
        self._has_table = "usage" in tables
        if not tables:
            return  # read only, and nothing recorded yet
        row = None
        if "usage_meta" in tables:
            row = conn.execute("SELECT v FROM usage_meta WHERE k = 'schema_version'").fetchone()
        if row is None or not isinstance(row[0], int) or not self._has_table:
            raise RecordStoreError(f"{self.path}: the usage table has no schema version")
        if row[0] > SCHEMA_VERSION:
            raise RecordStoreError(
                f"{self.path} holds usage records of schema version {row[0]}, newer than this "
                f"openai-forward understands ({SCHEMA_VERSION}); upgrade openai-forward"
            )

    @contextlib.contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise RecordStoreError("the usage record store is closed")
            try:
                yield self._conn
            except _ROW_ERRORS as exc:
                raise BadRecordError(f"{self.path}: {type(exc).__name__}: {exc}") from None
            except sqlite3.Error as exc:  # locked too long, disk full, corrupt, read only...
                raise RecordStoreError(f"{self.path}: {exc}") from None

    # writing

    def insert_many(self, rows: Iterable[UsageRow]) -> int:
        """Insert ``rows`` in one transaction; return how many were new (a ``request_id``
        already stored is skipped, never counted twice).

        ``BadRecordError`` if a row cannot be stored (then none of them is);
        ``RecordStoreError`` if the file cannot be written.
        """
        if self.readonly:
            raise RecordStoreError(f"{self.path} is open read only")
        with self._using() as conn:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, map(_values, rows))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before

    # reading

    def count(self) -> int:
        """The number of rows stored."""
        if not self._has_table:
            return 0
        with self._using() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])

    def summary(
        self,
        by: str = "key",
        since: float | None = None,
        until: float | None = None,
        key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Totals per group of rows with ``since <= ts < until`` (None: unbounded), of the
        forward key whose id or name is ``key`` if given.

        ``by`` is one of ``GROUPS``. Each dict has, in this order: the group under the name
        ``by`` (None for rows without one; a day is ``YYYY-MM-DD`` in UTC), ``key_name`` (only
        for ``by="key"``: the key store's name, else the name recorded), requests,
        prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost
        (None when no row has a price), estimated, errors (status >= 400), client_closed,
        cache_hits (rows), avg_duration_ms, avg_ttfb_ms, first_ts, last_ts. Days and statuses
        come in order; other groups biggest ``total_tokens`` first. ``ValueError`` for an
        unknown ``by``.
        """
        if by not in GROUPS:
            raise ValueError(f"cannot group usage by {by!r}: use one of {', '.join(GROUPS)}")
        clauses: list[str] = []
        params: list[object] = []
        for name, value in (("since", since), ("until", until), ("key", key)):
            if value is not None:
                clauses.append(_FILTERS[name])
                params.extend((value, value) if name == "key" else (value,))
        if not self._has_table:
            return []
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        order = _ORDER.get(
            by, "SUM(prompt_tokens + completion_tokens) DESC, COUNT(*) DESC, g IS NULL, g"
        )
        query = f"SELECT {GROUPS[by]} AS g, {_AGGREGATES} FROM usage{where} GROUP BY g"
        query += f" ORDER BY {order}"
        with self._using() as conn:
            found = conn.execute(query, params).fetchall()
            names = self._key_names(conn) if by == "key" else {}
        return [_group(by, row, names) for row in found]

    def spent(self, key_ids: Sequence[str], since: float) -> dict[str, tuple[int, float]]:
        """For each id in ``key_ids``: (prompt + completion tokens, cost) of its rows with
        ``ts >= since``, (0, 0.0) for a key without any. Cache hits do not count: their rows
        hold the tokens a hit saved, which nobody spent."""
        out = {key_id: (0, 0.0) for key_id in key_ids}
        if not self._has_table or not out:
            return out
        ids = list(out)
        with self._using() as conn:
            for start in range(0, len(ids), 500):  # under SQLite's bound-variable limit
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                query = (
                    "SELECT key_id, SUM(prompt_tokens + completion_tokens), TOTAL(cost)"
                    " FROM usage WHERE ts >= ? AND cache_hit = 0"
                    f" AND key_id IN ({marks}) GROUP BY key_id"
                )
                for key_id, tokens, cost in conn.execute(query, (since, *chunk)):
                    out[key_id] = (int(tokens), float(cost))
        return out

    def _key_names(self, conn: sqlite3.Connection) -> dict[str, str]:
        """Id -> name of every key in the key store's table, if this file has one."""
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forward_keys'"
        ).fetchone()
        if found is None:
            return {}
        return {row[0]: row[1] for row in conn.execute("SELECT id, name FROM forward_keys")}

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise ``RecordStoreError``."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _group(by: str, row: tuple[Any, ...], names: dict[str, str]) -> dict[str, Any]:
    (group, requests, prompt, completion, cached, reasoning, cost, estimated, errors) = row[:9]
    closed, hits, avg_ms, avg_ttfb, first, last, recorded_name = row[9:]
    out: dict[str, Any] = {by: group}
    if by == "key":
        out["key_name"] = names.get(group, recorded_name) if group is not None else None
    out.update(
        requests=requests,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        total_tokens=prompt + completion,
        cost=None if cost is None else round(cost, 8),  # sums of prices carry float noise
        estimated=estimated,
        errors=errors,
        client_closed=closed,
        cache_hits=hits,
        avg_duration_ms=round(avg_ms, 3),
        avg_ttfb_ms=None if avg_ttfb is None else round(avg_ttfb, 3),
        first_ts=first,
        last_ts=last,
    )
    return out


class RecordWriter:
    """Collects usage rows inside one gateway worker and writes them in batches.

    ``add`` only appends to a list. Every ``interval`` seconds (sooner once ``max_batch`` rows
    wait) the pending rows are handed to one dedicated writer thread, which owns its own
    ``RecordStore`` and commits them ``max_batch`` rows per transaction: the event loop never
    waits on SQLite. A failing write logs one warning on ``openai_forward`` and keeps the rows
    for the next interval (at most ``MAX_PENDING``; beyond that the oldest are dropped and
    counted in ``dropped``, as are rows SQLite refuses as malformed).

    Rows wait in memory only: a SIGKILL loses at most one interval; ``aclose`` (graceful
    shutdown) writes everything. ``add``, ``start``, ``flush`` and ``aclose`` belong to the
    loop's thread.
    """

    def __init__(self, path: str, *, interval: float = 1.0, max_batch: int = 512) -> None:
        self.path = path
        self.interval = interval
        self.max_batch = max(1, max_batch)
        self.written = 0  # rows stored (a row already stored is not counted again)
        self.dropped = 0
        self._pending: list[UsageRow] = []
        self._inflight: list[UsageRow] = []  # handed to the thread, not yet known written
        self._wake = asyncio.Event()
        self._closing = False  # the periodic task stops
        self._closed = False
        self._failing = False
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="records")
        self._store: RecordStore | None = None
        self._open_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Rows added and not yet written."""
        return len(self._pending) + len(self._inflight)

    def add(self, row: UsageRow) -> None:
        """Queue ``row`` for the next flush. O(1); never blocks, never raises."""
        pending = self._pending
        pending.append(row)
        # flush early, once per batch: a busy worker writes small batches, still warm in
        # the CPU's cache, and holds fewer rows in memory
        if len(pending) == self.max_batch:
            self._wake.set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the periodic flush on ``loop`` (once)."""
        if self._task is None:
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            if self._closing:
                return  # aclose writes the rest, once
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Hand every pending row to the writer thread and wait for it; return how many were
        newly stored. On failure the rows are kept (see the class) and 0 is returned."""
        async with self._flushing:  # one batch at a time, in order
            self._trim()
            rows, self._pending = self._pending, []
            if not rows:
                return 0
            self._inflight = rows
            loop = asyncio.get_running_loop()
            try:
                outcome = await loop.run_in_executor(self._thread, self._write, rows)
            except asyncio.CancelledError:
                # the thread may still commit them; a later write of the same rows is ignored
                self._pending[:0] = rows
                raise
            finally:
                self._inflight = []
            return self._settle(rows, *outcome)

    async def aclose(self) -> None:
        """Stop the periodic flush, write every pending row and wait for it, close the store
        (idempotent). Rows that still cannot be written are logged as lost."""
        if self._closed:
            return
        self._closing = self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._pending:
            log.warning("usage records: %d rows lost at shutdown (%s)", self.pending, self.path)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close_store)
        self._thread.shutdown(wait=True)

    def close_sync(self) -> None:
        """Write every pending row from the calling thread and close: a last resort once the
        loop is gone (interpreter exit). Rows the writer thread may be writing at the same
        moment are written again; their ``(ts, request_id)`` makes that harmless."""
        if self._closed:
            return
        self._closing = self._closed = True
        rows = self._inflight + self._pending
        self._pending = []
        if rows:
            self._settle(rows, *self._write(rows))
            if self._pending:
                log.warning("usage records: %d rows lost at exit (%s)", self.pending, self.path)
        self._close_store()
        self._thread.shutdown(wait=False)

    # the writer thread

    def _write(self, rows: list[UsageRow]) -> tuple[int, int, int, str | None]:
        """(rows handled from the front, rows stored, malformed rows dropped, error)."""
        done = stored = bad = 0
        try:
            store = self._open()
            for start in range(0, len(rows), self.max_batch):
                chunk = islice(rows, start, start + self.max_batch)
                try:
                    stored += store.insert_many(chunk)
                except BadRecordError:
                    n, b = _one_by_one(store, rows[start : start + self.max_batch])
                    stored, bad = stored + n, bad + b
                done = min(len(rows), start + self.max_batch)
        except RecordStoreError as exc:
            return done, stored, bad, str(exc)
        except Exception as exc:  # the thread boundary: whatever it is, keep the rows
            return done, stored, bad, f"{type(exc).__name__}: {exc}"
        return done, stored, bad, None

    def _open(self) -> RecordStore:
        with self._open_lock:
            if self._store is None:
                self._store = RecordStore(self.path)
            return self._store

    def _close_store(self) -> None:
        with self._open_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    # back on the loop

    def _settle(
        self, rows: list[UsageRow], done: int, stored: int, bad: int, error: str | None
    ) -> int:
        self.written += stored
        self.dropped += bad
        if bad:
            log.warning("usage records: %d malformed rows dropped (%s)", bad, self.path)
        if error is None:
            if self._failing:
                self._failing = False
                log.info("usage records: writing to %s again", self.path)
            return stored
        self._pending[:0] = rows[done:]
        self._trim()
        if not self._failing:
            self._failing = True
            log.warning(
                "usage records: cannot write (%s); %d rows kept in memory, retrying every %gs",
                error,
                len(self._pending),
                self.interval,
            )
        return stored

    def _trim(self) -> None:
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess


def _one_by_one(store: RecordStore, rows: Sequence[UsageRow]) -> tuple[int, int]:
    """Insert rows singly, skipping the malformed ones: (stored, dropped)."""
    stored = bad = 0
    for row in rows:
        try:
            stored += store.insert_many((row,))
        except BadRecordError:
            bad += 1
    return stored, bad


# a unit in either case, except M: months or minutes?
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdwSHDW])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> float:
    """A point in time as epoch seconds: a duration back from ``now`` (``30m``, ``24h``,
    ``7d``; also ``s`` and ``w``; ``7D`` too, but not ``3M``: months or minutes?) or an ISO
    date or date-time (``2026-11-01``, ``2026-11-01T12:00``, ``2026-11-01T12:00+02:00``,
    ``...Z``), UTC when no zone is given.
    ``ValueError`` with a message naming the accepted forms otherwise."""
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match is not None:
        return now - float(match[1]) * _UNITS[match[2].lower()]
    iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value  # Python 3.10 lacks Z
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration such as 30m, 24h or 7d, "
            "nor a date such as 2026-11-01 or 2026-11-01T12:00 (UTC unless a zone is given)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
