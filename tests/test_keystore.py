"""The forward key store (openai_forward/keystore.py) on real SQLite files.

Covers: create/list/revoke, name rules, digests only on disk (the secret scanner over the
.db, -wal and -shm files), load() and active(), version() seen across instances and across
processes, concurrent writers in two processes, file mode 0600, corrupt files, and
injection-looking input treated as plain strings.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openai_forward.keystore import (
    KEY_PREFIX,
    ForwardKey,
    KeyStore,
    KeyStoreError,
    display_prefix,
    generate_key,
    key_digest,
)
from openai_forward.limitconfig import Budget, Limits

REPO = Path(__file__).resolve().parent.parent
BASE62 = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
INJECTION = "' OR 1=1 --"


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "keys.db")


@pytest.fixture
def store(db: str) -> Iterator[KeyStore]:
    s = KeyStore(db)
    yield s
    s.close()


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# helpers


def test_generate_key_shape_and_randomness() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == len(KEY_PREFIX) + 40
        assert set(key[3:]) <= BASE62


def test_digest_and_prefix() -> None:
    key = "fk-AbCdEfGh"
    assert key_digest(key) == key_digest(key.encode()) and len(key_digest(key)) == 32
    assert key_digest(key) != key_digest(key + " ")
    assert len(key_digest("fk-\ud800")) == 32  # a lone surrogate only fails to match
    assert display_prefix(key) == "fk-AbCd\u2026"


def test_active() -> None:
    base = ForwardKey(id="fkid_0", name="a", prefix="fk-x\u2026", digest=b"d")
    assert base.active(1e12)
    expiring = ForwardKey(id="fkid_0", name="a", prefix="p", digest=b"d", expires_at=100.0)
    assert expiring.active(99.9) and not expiring.active(100.0)
    revoked = ForwardKey(id="fkid_0", name="a", prefix="p", digest=b"d", revoked_at=5.0)
    assert not revoked.active(1.0)
    assert "digest" not in repr(base)


# create / list / revoke


def test_create_list_revoke(store: KeyStore) -> None:
    record, plain = store.create("alice", models=["gpt-4o*"], routes=["/v1/chat"], now=1000.0)
    assert plain.startswith(KEY_PREFIX) and len(plain) == 43
    assert record.id.startswith("fkid_") and len(record.id) == 17
    int(record.id[5:], 16)
    assert record.name == "alice" and record.source == "db"
    assert record.prefix == display_prefix(plain) and record.digest == key_digest(plain)
    assert record.models == ("gpt-4o*",) and record.routes == ("/v1/chat",)
    assert record.created_at == 1000.0 and record.expires_at is None and record.revoked_at is None
    bob, _ = store.create("bob.smith@example_1-2", now=1001.0)

    assert store.list() == [record, bob]
    revoked = store.revoke("alice", now=2000.0)
    assert revoked.id == record.id and revoked.revoked_at == 2000.0
    assert not revoked.active(1500.0)
    assert store.list() == [bob]
    assert store.list(include_revoked=True) == [revoked, bob]

    by_id = store.revoke(bob.id)
    assert by_id.name == "bob.smith@example_1-2" and by_id.revoked_at is not None
    assert store.list() == []

    with pytest.raises(KeyStoreError, match="already revoked"):
        store.revoke("alice")
    with pytest.raises(KeyStoreError, match="already revoked"):
        store.revoke(bob.id)
    with pytest.raises(KeyStoreError, match="no key"):
        store.revoke("carol")


def test_names_unique_among_active_keys(store: KeyStore) -> None:
    first, _ = store.create("team")
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create("team")
    store.revoke("team")
    second, _ = store.create("team")  # a revoked name may be reused
    assert second.id != first.id
    assert store.revoke("team").id == second.id  # the active one, not the revoked one
    third, _ = store.create("team")
    assert [k.id for k in store.list(include_revoked=True)] == [first.id, second.id, third.id]
    assert [k.id for k in store.list()] == [third.id]


@pytest.mark.parametrize(
    "name",
    ["", "a b", "x" * 65, "caf\u00e9", "tab\t", "line\n", "a/b", "a:b", "fk-pasted", "fkid_1"],
)
def test_bad_names_refused(store: KeyStore, name: str) -> None:
    with pytest.raises(KeyStoreError, match="invalid key name"):
        store.create(name)
    assert store.list(include_revoked=True) == []


def test_name_limits_and_scope_validation(store: KeyStore) -> None:
    store.create("x" * 64)
    store.create("A.b_c-d@e9")
    with pytest.raises(KeyStoreError, match="single string"):
        store.create("m", models="gpt-4o")
    with pytest.raises(KeyStoreError, match="non-empty"):
        store.create("m", routes=[""])
    with pytest.raises(KeyStoreError, match="finite"):
        store.create("m", expires_at=float("nan"))
    assert len(store.list()) == 2


def test_plain_key_never_stored(tmp_path: Path, db: str) -> None:
    store = KeyStore(db)
    plains = [store.create(f"k{i}", models=["gpt-*"])[1] for i in range(5)]
    store.revoke("k0")
    store.list()

    def scan() -> None:
        files = [Path(db + suffix) for suffix in ("", "-wal", "-shm")]
        blob = b"".join(f.read_bytes() for f in files if f.exists())
        assert blob  # something was scanned
        for plain in plains:
            raw = plain.encode()
            for i in range(len(raw) - 7):
                assert raw[i : i + 8] not in blob, f"fragment at {i} of a key is on disk"

    assert Path(db + "-wal").exists()  # scanned while the writes sit in the WAL
    scan()
    store.close()
    scan()  # and after the checkpoint into the main file


def test_messages_never_echo_a_key(store: KeyStore) -> None:
    _, plain = store.create("a")
    for call in (lambda: store.revoke(plain), lambda: store.create(plain)):
        with pytest.raises(KeyStoreError) as info:
            call()
        assert plain[:8] not in str(info.value)


def test_load_by_digest_and_expiry(store: KeyStore) -> None:
    now = time.time()
    live, live_plain = store.create("live")
    old, old_plain = store.create("old", expires_at=now - 10)
    later, later_plain = store.create("later", expires_at=now + 3600)
    _, gone_plain = store.create("gone")
    store.revoke("gone")

    loaded = store.load()
    assert set(loaded) == {live.digest, old.digest, later.digest}  # expired kept, revoked not
    assert loaded[key_digest(live_plain)] == live
    assert loaded[key_digest(later_plain.encode())].name == "later"
    assert key_digest(gone_plain) not in loaded
    assert key_digest(live_plain + "\n") not in loaded

    assert loaded[key_digest(live_plain)].active(now)
    assert not loaded[key_digest(old_plain)].active(now)
    assert loaded[key_digest(later_plain)].active(now)
    assert not loaded[key_digest(later_plain)].active(now + 3601)


# version across instances and processes


def test_version_changes_on_writes_from_another_instance(db: str) -> None:
    reader, writer = KeyStore(db), KeyStore(db)
    try:
        v0 = reader.version()
        assert reader.version() == v0  # stable without writes
        writer.create("a")
        v1 = reader.version()
        assert v1 != v0
        writer.revoke("a")
        v2 = reader.version()
        assert v2 not in (v0, v1)
        with pytest.raises(KeyStoreError):
            writer.create("bad name")  # a refused write changes nothing
        with pytest.raises(KeyStoreError):
            writer.revoke("a")
        assert reader.version() == v2
        assert [k.name for k in reader.load().values()] == []
    finally:
        reader.close()
        writer.close()


def test_version_changes_on_write_from_another_process(store: KeyStore, db: str) -> None:
    before = store.version()
    proc = run_python(
        """
        import sys
        from openai_forward.keystore import KeyStore
        s = KeyStore(sys.argv[1])
        record, _ = s.create("from-child")
        s.close()
        print(record.id)
        """,
        db,
    )
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert store.version() != before
    assert [k.id for k in store.load().values()] == [out.strip()]


def test_two_processes_create_concurrently(tmp_path: Path) -> None:
    db = str(tmp_path / "new" / "dir" / "keys.db")  # created concurrently too
    go = tmp_path / "go"
    code = """
        import os, sys, time
        from openai_forward.keystore import KeyStore
        path, go, tag = sys.argv[1:]
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.002)
        s = KeyStore(path)
        for i in range(50):
            s.create(f"{tag}-{i}")
        s.close()
        print("done", flush=True)
    """
    procs = [run_python(code, db, str(go), tag) for tag in ("a", "b")]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "locked" not in err and out.strip() == "done"
    with KeyStore(db) as s:
        names = {k.name for k in s.list()}
        assert len(names) == 100
        assert names == {f"{t}-{i}" for t in "ab" for i in range(50)}
        assert len(s.load()) == 100


# the file


def test_file_mode_0600_and_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "keys.db"
    old = os.umask(0o022)
    try:
        with KeyStore(str(path)) as s:
            s.create("a")
            for suffix in ("", "-wal", "-shm"):
                mode = stat.S_IMODE(os.stat(str(path) + suffix).st_mode)
                assert mode == 0o600, (suffix, oct(mode))
    finally:
        os.umask(old)


def test_wal_mode_and_schema_version(store: KeyStore, db: str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == 2
    finally:
        conn.close()


def test_schema_1_store_is_migrated_and_keeps_its_keys(tmp_path: Path) -> None:
    """A key store written by the previous version gains the policy column on open; its
    keys keep working, with no limits and no budget."""
    path = str(tmp_path / "old.db")
    with KeyStore(path) as store:
        _, plain = store.create("old")
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE forward_keys DROP COLUMN policy")
    conn.execute("UPDATE meta SET v = 1 WHERE k = 'schema_version'")
    conn.commit()
    conn.close()
    with KeyStore(path) as store:
        (record,) = store.list()
        assert record.name == "old" and record.limits is None and record.budget is None
        assert key_digest(plain) in store.load()
        made, _ = store.create("new", limits=Limits(rpm=5))
        assert made.limits == Limits(rpm=5)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == 2
    conn.close()


def test_limits_and_budget_are_stored_with_the_key(store: KeyStore) -> None:
    limits = Limits(rpm=10, concurrent=2)
    budget = Budget(tokens_per_day=1000, cost_per_month=2.5)
    made, _ = store.create("capped", limits=limits, budget=budget)
    (loaded,) = [k for k in store.list() if k.name == "capped"]
    assert loaded.limits == limits and loaded.budget == budget
    assert made.limits == limits and made.budget == budget


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database, just some text\n" * 100,
        b"SQLite format 3\x00" + b"\xff" * 4000,
        os.urandom(8192),
    ],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.db"
    path.write_bytes(content)
    with pytest.raises(KeyStoreError) as info:
        KeyStore(str(path))
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert path.read_bytes() == content  # left untouched


def test_newer_schema_refused(db: str) -> None:
    with KeyStore(db):
        pass
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE meta SET v = 99 WHERE k = 'schema_version'")
    conn.close()
    with pytest.raises(KeyStoreError, match="newer"):
        KeyStore(db)


def test_directory_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError):
        KeyStore(str(tmp_path))


def test_closed_store(db: str) -> None:
    s = KeyStore(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(KeyStoreError, match="closed"):
        s.version()


# injection-looking input


def test_injection_is_plain_strings(store: KeyStore) -> None:
    a, _ = store.create("a")
    b, _ = store.create("b", models=[INJECTION], routes=["'; DROP TABLE forward_keys; --"])
    for probe in (
        INJECTION,
        "a' OR '1'='1",
        "' OR (SELECT 1) IS NOT NULL --",
        "fkid_' OR 1=1 --",
        "a\x00",
        "%",
        "_",
    ):
        with pytest.raises(KeyStoreError, match="no key"):
            store.revoke(probe)
    with pytest.raises(KeyStoreError, match="invalid key name"):
        store.create(INJECTION)
    assert store.list() == [a, b]
    assert store.list()[1].models == (INJECTION,)
    assert store.list()[1].routes == ("'; DROP TABLE forward_keys; --",)
