"""The durable store of forward keys: the keys the gateway hands to its users.

Clients send a forward key (``fk-`` + 40 base62 characters) instead of a real OpenAI key. The
store keeps, for each key, its SHA-256 digest and a short display prefix, never the key itself:
the plain key is returned once by ``KeyStore.create`` and cannot be recovered afterwards.

Storage is one embedded SQLite file, shared by every gateway worker and the CLI:

* WAL mode, ``busy_timeout`` 5000 ms, and every write in a ``BEGIN IMMEDIATE`` transaction, so
  concurrent writers queue on the write lock instead of failing with ``database is locked``
  (a deferred transaction that upgrades from read to write can fail at once in WAL mode).
* ``synchronous=FULL``: key writes are rare, and a created or revoked key must survive a power
  loss or OS crash, not only a crash of the process (TESTING.md F3).
* A ``meta`` row ``version`` is incremented in the same transaction as every write, so
  ``KeyStore.version()`` (one indexed SELECT) tells a polling worker whether to ``load()``.
* The file is created with mode 0600 (SQLite gives its ``-wal`` and ``-shm`` files the same
  mode). Only parameterised SQL is used.

Every failure of the file (not SQLite, corrupt, unreadable, newer schema, locked for longer
than the busy timeout) is raised as ``KeyStoreError`` with a message fit to show a user; no
message ever contains a plain key.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dbfile import create_private, set_up_or_close

if TYPE_CHECKING:
    from .limitconfig import Budget, Limits

KEY_PREFIX = "fk-"
ID_PREFIX = "fkid_"
SCHEMA_VERSION = 2  # 2: the policy column (limits and budget)
BUSY_TIMEOUT_MS = 5000

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_KEY_CHARS = 40  # log2(62) * 40 ~ 238 bits
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_MAX_SCOPE = 256  # characters in one models/routes entry

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS forward_keys ("
    " id TEXT PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " prefix TEXT NOT NULL,"
    " digest BLOB NOT NULL UNIQUE,"
    " models TEXT NOT NULL DEFAULT '[]',"
    " routes TEXT NOT NULL DEFAULT '[]',"
    " expires_at REAL,"
    " revoked_at REAL,"
    " created_at REAL NOT NULL,"
    " policy TEXT NOT NULL DEFAULT '{}')",
    # a name is unique among the keys not revoked; a revoked key's name may be reused
    "CREATE UNIQUE INDEX IF NOT EXISTS forward_keys_active_name"
    " ON forward_keys (name) WHERE revoked_at IS NULL",
)
# Every statement is a constant; values are always bound as parameters.
_SELECT = (
    "SELECT id, name, prefix, digest, models, routes, expires_at, revoked_at, created_at,"
    " policy FROM forward_keys"
)
_LIST_ACTIVE = _SELECT + " WHERE revoked_at IS NULL ORDER BY created_at, rowid"
_LIST_ALL = _SELECT + " ORDER BY created_at, rowid"
_FIND_ACTIVE = _SELECT + " WHERE revoked_at IS NULL AND (id = ? OR name = ?) LIMIT 1"
_INSERT = (
    "INSERT INTO forward_keys"
    " (id, name, prefix, digest, models, routes, expires_at, revoked_at, created_at, policy)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)"
)


def generate_key() -> str:
    """A new forward key: ``"fk-"`` + 40 characters drawn by ``secrets`` from base62."""
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_KEY_CHARS))


def key_digest(key: str | bytes) -> bytes:
    """SHA-256 (32 bytes) of the key's UTF-8 bytes; bytes are hashed as given.

    Never raises for any ``str`` (lone surrogates are encoded with ``surrogatepass``), so an
    odd client header only fails to match.
    """
    data = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


def display_prefix(key: str) -> str:
    """The first 7 characters of a key and an ellipsis, e.g. ``"fk-AbCd…"``: safe to show."""
    return key[:7] + "\u2026"


@dataclass(frozen=True)
class ForwardKey:
    """One forward key as the gateway knows it. Holds the digest, never the plain key.

    ``models`` are glob patterns of the models the key may use, ``routes`` route prefixes or
    upstream names it may reach; empty means no restriction. Times are epoch seconds.
    ``source`` is ``"db"`` for the key store, ``"config"`` for keys declared in the config.
    """

    id: str
    name: str
    prefix: str
    digest: bytes = field(repr=False)
    models: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = 0.0
    source: str = "db"
    limits: Limits | None = None
    budget: Budget | None = None

    def active(self, now_epoch: float) -> bool:
        """Not revoked, and not expired at ``now_epoch`` (a key expires at ``expires_at``)."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now_epoch < self.expires_at


class KeyStoreError(Exception):
    """A failure with a message fit to show a user (CLI, admin API, log): unknown name or id,
    duplicate or malformed name, unusable file. Never contains a plain key."""


def _shown(text: str) -> str:
    """A user-supplied name or id as it may appear in a message: quoted, cut to 64
    characters, and reduced to its display prefix if it looks like a forward key."""
    if text.startswith(KEY_PREFIX):
        return repr(display_prefix(text))
    return repr(text if len(text) <= 64 else text[:64] + "\u2026")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = _shown(name) if isinstance(name, str) else type(name).__name__
        raise KeyStoreError(
            f"invalid key name {shown}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
        )
    if name.startswith(KEY_PREFIX):
        # a pasted key would otherwise be stored (and shown) as a name
        raise KeyStoreError(f"invalid key name {_shown(name)}: must not start with {KEY_PREFIX!r}")
    if name.startswith(ID_PREFIX):
        raise KeyStoreError(
            f"invalid key name {_shown(name)}: must not start with {ID_PREFIX!r} (key ids do)"
        )
    return name


def _check_scope(values: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise KeyStoreError(f"{what} must be a list of strings, not a single string")
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value or len(value) > _MAX_SCOPE:
            raise KeyStoreError(
                f"{what}: each entry must be a non-empty string of at most {_MAX_SCOPE} characters"
            )
        if value.startswith(KEY_PREFIX):
            raise KeyStoreError(f"{what}: an entry must not start with {KEY_PREFIX!r}")
        out.append(value)
    return tuple(out)


def _check_time(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KeyStoreError(f"{what} must be a finite number of epoch seconds")
    return float(value)


def _row(row: tuple[Any, ...]) -> ForwardKey:
    return ForwardKey(
        id=row[0],
        name=row[1],
        prefix=row[2],
        digest=bytes(row[3]),
        models=tuple(json.loads(row[4])),
        routes=tuple(json.loads(row[5])),
        expires_at=row[6],
        revoked_at=row[7],
        created_at=row[8],
        source="db",
        **_policy(row[9]),
    )


def _policy(text: str) -> dict[str, Any]:
    """A key's limits and budget from their stored JSON (checked when written)."""
    from .limitconfig import parse_budget, parse_limits

    data = json.loads(text or "{}")
    out: dict[str, Any] = {}
    if data.get("limits"):
        out["limits"] = parse_limits(data["limits"], "limits")
    if data.get("budget"):
        out["budget"] = parse_budget(data["budget"], "budget")
    return out


def _policy_text(limits: Limits | None, budget: Budget | None) -> str:
    data: dict[str, Any] = {}
    if limits:
        data["limits"] = {k: v for k, v in dataclasses.asdict(limits).items() if v}
    if budget:
        data["budget"] = {k: v for k, v in dataclasses.asdict(budget).items() if v}
    return json.dumps(data, sort_keys=True)


class KeyStore:
    """Forward keys in one SQLite file, safe to share between processes.

    One instance holds one connection; its methods may be called from any thread (they are
    serialised by a lock). Use one instance per process, or per thread that needs it.
    """

    def __init__(self, path: str) -> None:
        """Open ``path``, creating it (mode 0600, parent dirs too) and the schema if missing.

        Raises ``KeyStoreError`` if the file cannot be opened, is not an SQLite database or
        is corrupt, or was written by a newer version of the schema.
        """
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            create_private(path)
        except OSError as exc:
            raise KeyStoreError(f"cannot create key store {path}: {exc.strerror or exc}") from None
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open key store {path}: {exc}") from None
        set_up_or_close(conn, self._set_up, KeyStoreError, f"key store {path}")
        self._conn = conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema. Switching the journal mode does not wait for a lock held
        by another process creating the same file at the same moment: retry until the busy
        timeout instead."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA busy_timeout = 5000")  # = BUSY_TIMEOUT_MS
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise KeyStoreError(f"key store {self.path}: cannot switch to WAL mode")
                conn.execute("PRAGMA synchronous = FULL")
                self._init_schema(conn)
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.01 + secrets.randbelow(20) / 1000)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if row is None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
                conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('version', 0)")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        found = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
        if found is None or not isinstance(found[0], int):
            raise KeyStoreError(
                f"key store {self.path}: not a forward key store (no schema version)"
            )
        if found[0] > SCHEMA_VERSION:
            raise KeyStoreError(
                f"key store {self.path} has schema version {found[0]}, newer than this "
                f"openai-forward understands ({SCHEMA_VERSION}); upgrade openai-forward"
            )
        if found[0] < 2:
            self._migrate_to_2(conn)

    def _migrate_to_2(self, conn: sqlite3.Connection) -> None:
        """Schema 1 → 2: keys gain limits and a budget (stored as JSON, '{}' for none)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = [r[1] for r in conn.execute("PRAGMA table_info(forward_keys)")]
            if "policy" not in columns:
                conn.execute(
                    "ALTER TABLE forward_keys ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'"
                )
            conn.execute("UPDATE meta SET v = 2 WHERE k = 'schema_version'")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # plumbing

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise KeyStoreError("the key store is closed")
            try:
                yield self._conn
            except sqlite3.DatabaseError as exc:
                raise KeyStoreError(f"key store {self.path}: {exc}") from None

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction that also bumps the version row; committed if
        the block returns, rolled back if it raises."""
        with self._reading() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("UPDATE meta SET v = v + 1 WHERE k = 'version'")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # the API

    def create(
        self,
        name: str,
        *,
        models: Sequence[str] = (),
        routes: Sequence[str] = (),
        expires_at: float | None = None,
        now: float | None = None,
        limits: Limits | None = None,
        budget: Budget | None = None,
    ) -> tuple[ForwardKey, str]:
        """Create a key named ``name`` (unique among keys not revoked).

        Returns the record and the plain key; the plain key is shown to the caller once and
        is not stored. ``KeyStoreError`` for a bad or duplicate name or a bad scope.
        """
        _check_name(name)
        model_list = _check_scope(models, "models")
        route_list = _check_scope(routes, "routes")
        expires = _check_time(expires_at, "expires_at")
        created = _check_time(now, "now")
        created = time.time() if created is None else created
        with self._writing() as conn:
            taken = conn.execute(
                "SELECT 1 FROM forward_keys WHERE name = ? AND revoked_at IS NULL", (name,)
            ).fetchone()
            if taken is not None:
                raise KeyStoreError(f"a key named {_shown(name)} already exists")
            for _ in range(8):  # an id or digest collision is astronomically unlikely
                plain = generate_key()
                record = ForwardKey(
                    id=ID_PREFIX + secrets.token_hex(6),
                    name=name,
                    prefix=display_prefix(plain),
                    digest=key_digest(plain),
                    models=model_list,
                    routes=route_list,
                    expires_at=expires,
                    created_at=created,
                    limits=limits or None,
                    budget=budget or None,
                )
                clash = conn.execute(
                    "SELECT 1 FROM forward_keys WHERE id = ? OR digest = ?",
                    (record.id, record.digest),
                ).fetchone()
                if clash is None:
                    break
            else:  # pragma: no cover
                raise KeyStoreError("could not draw a unique key id; try again")
            conn.execute(
                _INSERT,
                (
                    record.id,
                    record.name,
                    record.prefix,
                    record.digest,
                    json.dumps(list(record.models)),
                    json.dumps(list(record.routes)),
                    record.expires_at,
                    record.created_at,
                    _policy_text(record.limits, record.budget),
                ),
            )
        return record, plain

    def list(self, include_revoked: bool = False) -> builtins.list[ForwardKey]:
        """Keys not revoked (and the revoked ones too if asked), oldest first."""
        query = _LIST_ALL if include_revoked else _LIST_ACTIVE
        with self._reading() as conn:
            return [_row(r) for r in conn.execute(query).fetchall()]

    def revoke(self, name_or_id: str, now: float | None = None) -> ForwardKey:
        """Revoke the key not yet revoked whose id or name is ``name_or_id``; return it.

        ``KeyStoreError`` if no key has that id or name, or if it is already revoked.
        """
        if not isinstance(name_or_id, str):
            raise KeyStoreError("a key is revoked by its name or id (a string)")
        when = _check_time(now, "now")
        when = time.time() if when is None else when
        with self._writing() as conn:
            # names cannot start with "fkid_", so an id and a name never collide
            row = conn.execute(_FIND_ACTIVE, (name_or_id, name_or_id)).fetchone()
            if row is None:
                seen = conn.execute(
                    "SELECT 1 FROM forward_keys WHERE id = ? OR name = ?",
                    (name_or_id, name_or_id),
                ).fetchone()
                if seen is not None:
                    raise KeyStoreError(f"the key {_shown(name_or_id)} is already revoked")
                raise KeyStoreError(f"no key has the name or id {_shown(name_or_id)}")
            conn.execute("UPDATE forward_keys SET revoked_at = ? WHERE id = ?", (when, row[0]))
        return dataclasses.replace(_row(row), revoked_at=when)

    def version(self) -> int:
        """A number that changes whenever any process changes the keys (one cheap SELECT)."""
        with self._reading() as conn:
            row = conn.execute("SELECT v FROM meta WHERE k = 'version'").fetchone()
        return int(row[0]) if row is not None else 0

    def load(self) -> dict[bytes, ForwardKey]:
        """Digest -> record for every key not revoked, expired ones included: the caller
        checks ``active()`` at request time."""
        return {key.digest: key for key in self.list()}

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise ``KeyStoreError``."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
