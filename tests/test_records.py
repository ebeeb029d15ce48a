"""Usage records (openai_forward/records.py) on real SQLite files.

Covers: rows stored as given and never twice, the table beside the key store in one file,
file mode and unusable files, summaries per group and filter, past spending for budgets, the
read-only store, the `since` parser, and the batching writer: flushed within its interval,
nothing lost on aclose or close_sync, failures kept and retried with one warning, the bound
on pending rows, malformed rows dropped alone, and four processes writing at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from openai_forward import records
from openai_forward.keystore import KeyStore
from openai_forward.records import (
    COLUMNS,
    BadRecordError,
    RecordStore,
    RecordStoreError,
    RecordWriter,
    UsageRow,
    parse_since,
    usage_row,
)

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0
T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


def row(n: int, **changes: object) -> UsageRow:
    fields: dict[str, Any] = dict(
        request_id=f"req{n:06d}",
        ts=T0 + n,
        key_id="fkid_aaaaaaaaaaaa",
        key_name="alice",
        client_ip="10.0.0.1",
        route="/",
        path="/v1/chat/completions",
        upstream="openai",
        upstream_key="key-1",
        model="gpt-4o-mini",
        status=200,
        prompt_tokens=100,
        completion_tokens=20,
        cached_tokens=10,
        reasoning_tokens=5,
        estimated=False,
        stream=True,
        client_closed=False,
        ttfb_ms=50.0,
        duration_ms=200.0,
        cost=0.5,
        error_code=None,
    )
    return usage_row(**{**fields, **changes})


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "usage.db")


@pytest.fixture
def store(db: str) -> Iterator[RecordStore]:
    s = RecordStore(db)
    yield s
    s.close()


def stored_ids(db: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM usage ORDER BY ts")]


async def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until check() holds, polling every 5 ms; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# the store


def test_row_is_stored_field_for_field(store: RecordStore, db: str) -> None:
    original = row(1, key_id=None, key_name=None, ttfb_ms=None, cost=None, cache="hit")
    assert store.insert_many([original]) == 1
    with sqlite3.connect(db) as conn:
        found = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage").fetchone()
    stored = dict(zip(COLUMNS, found, strict=True))
    # the row's keys, but the time is "ts", flags are 0/1 and the cache is a cache_hit flag
    assert stored.pop("ts") == original["time"]
    assert stored.pop("cache_hit") == 1
    assert stored == {
        name: int(value) if type(value) is bool else value
        for name, value in original.items()
        if name in COLUMNS
    }
    assert (stored["stream"], stored["estimated"], stored["client_closed"]) == (1, 0, 0)
    store.insert_many([row(2, cache="miss"), row(3, cache=None)])
    with sqlite3.connect(db) as conn:
        hits = conn.execute("SELECT cache_hit FROM usage ORDER BY ts").fetchall()
    assert hits == [(1,), (0,), (0,)]
    assert store.count() == 3


def test_same_request_written_twice_is_stored_once(store: RecordStore) -> None:
    assert store.insert_many([row(1), row(2)]) == 2
    assert store.insert_many([row(2), row(3), row(3)]) == 1
    assert store.count() == 3
    assert store.summary()[0]["requests"] == 3


def test_file_is_private_and_in_wal_mode(store: RecordStore, db: str) -> None:
    store.insert_many([row(1)])
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("first", ["keys", "records"])
def test_shares_the_file_with_the_key_store(db: str, first: str) -> None:
    opened: list[KeyStore | RecordStore] = []
    for which in (first, "records" if first == "keys" else "keys"):
        opened.append(KeyStore(db) if which == "keys" else RecordStore(db))
    keys = next(s for s in opened if isinstance(s, KeyStore))
    usage = next(s for s in opened if isinstance(s, RecordStore))
    record, _ = keys.create("alice")
    usage.insert_many([row(1, key_id=record.id, key_name="old-name")])
    assert [k.name for k in keys.list()] == ["alice"]
    assert usage.summary()[0]["key_name"] == "alice"  # the key store's name wins
    for s in opened:
        s.close()
    KeyStore(db).close()  # both reopen cleanly
    RecordStore(db).close()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RecordStoreError, match="not a usable SQLite database"):
        RecordStore(str(path))


def test_newer_schema_is_refused(store: RecordStore, db: str) -> None:
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE usage_meta SET v = 99 WHERE k = 'schema_version'")
    with pytest.raises(RecordStoreError, match=r"schema version 99.*upgrade"):
        RecordStore(db)


def test_closed_store_raises(store: RecordStore) -> None:
    store.close()
    store.close()
    with pytest.raises(RecordStoreError, match="closed"):
        store.insert_many([row(1)])


def test_malformed_row_is_refused_without_storing_the_batch(store: RecordStore) -> None:
    with pytest.raises(BadRecordError):
        store.insert_many([row(1), row(2, status=None)])
    with pytest.raises(BadRecordError):
        store.insert_many([row(3, model={"not": "text"})])
    assert store.count() == 0


def test_injection_looking_text_is_plain_data(store: RecordStore) -> None:
    evil = "x'); DROP TABLE usage; --"
    store.insert_many([row(1, key_id=evil, model=evil)])
    assert store.summary("key", key=evil)[0]["key"] == evil
    assert store.summary("key", key="' OR 1=1 --") == []
    assert store.count() == 1


# summaries


def sample(store: RecordStore) -> None:
    store.insert_many(
        [
            row(0, ts=T0, prompt_tokens=1000, completion_tokens=1000),
            row(1, ts=T0 + 10, status=429, error_code="rate_limited", cost=None),
            row(2, ts=T0 + DAY, key_id="fkid_bbbbbbbbbbbb", key_name="bob", model="o3"),
            row(3, ts=T0 + DAY + 1, key_id=None, key_name=None, upstream=None, estimated=True),
            row(4, ts=T0 + 2 * DAY, status=499, client_closed=True, duration_ms=800.0),
        ]
    )


def test_summary_by_key_totals_each_key(store: RecordStore) -> None:
    sample(store)
    groups = store.summary("key")
    assert [g["key"] for g in groups] == ["fkid_aaaaaaaaaaaa", "fkid_bbbbbbbbbbbb", None]
    alice = groups[0]
    assert alice == {
        "key": "fkid_aaaaaaaaaaaa",
        "key_name": "alice",
        "requests": 3,
        "prompt_tokens": 1200,
        "completion_tokens": 1040,
        "cached_tokens": 30,
        "reasoning_tokens": 15,
        "total_tokens": 2240,
        "cost": 1.0,
        "estimated": 0,
        "errors": 2,
        "client_closed": 1,
        "cache_hits": 0,
        "avg_duration_ms": 400.0,
        "avg_ttfb_ms": 50.0,
        "first_ts": T0,
        "last_ts": T0 + 2 * DAY,
    }
    assert groups[2]["key_name"] is None and groups[2]["estimated"] == 1


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("model", {"gpt-4o-mini": 4, "o3": 1}),
        ("upstream", {"openai": 4, None: 1}),
        ("day", {"2026-09-21": 2, "2026-09-22": 2, "2026-09-23": 1}),
        ("route", {"/": 5}),
        ("status", {200: 3, 429: 1, 499: 1}),
    ],
)
def test_summary_groups_by_each_dimension(
    store: RecordStore, by: str, expected: dict[object, int]
) -> None:
    sample(store)
    groups = store.summary(by)
    assert {g[by]: g["requests"] for g in groups} == expected
    if by in ("day", "status"):
        assert [g[by] for g in groups] == sorted(expected, key=str)


def test_summary_filters_by_time_and_key(store: RecordStore) -> None:
    sample(store)
    window = store.summary("model", since=T0 + 5, until=T0 + 2 * DAY)
    assert sum(g["requests"] for g in window) == 3  # rows 1, 2, 3; `until` is exclusive
    assert store.summary("key", key="bob")[0]["requests"] == 1
    assert store.summary("key", key="fkid_aaaaaaaaaaaa")[0]["requests"] == 3
    assert store.summary("key", key="nobody") == []


def test_cost_is_none_without_prices(store: RecordStore) -> None:
    store.insert_many([row(1, cost=None), row(2, cost=None)])
    assert store.summary()[0]["cost"] is None


def test_spent_leaves_out_cache_hits(store: RecordStore) -> None:
    """A hit's row holds the tokens it saved; nobody spent them, so no budget counts them."""
    store.insert_many([row(1), row(2, cache="hit", cost=None), row(3, cache="hit", cost=None)])
    assert store.spent(["fkid_aaaaaaaaaaaa"], 0.0) == {"fkid_aaaaaaaaaaaa": (120, 0.5)}
    assert store.summary()[0]["cache_hits"] == 2


def test_unknown_grouping_is_refused(store: RecordStore) -> None:
    with pytest.raises(ValueError, match="cannot group usage by 'colour'"):
        store.summary("colour")


def test_spent_sums_tokens_and_cost_since_a_time(store: RecordStore) -> None:
    sample(store)
    spent = store.spent(["fkid_aaaaaaaaaaaa", "fkid_bbbbbbbbbbbb", "fkid_never"], T0 + 5)
    assert spent == {
        "fkid_aaaaaaaaaaaa": (240, 0.5),  # rows 1 (no price) and 4
        "fkid_bbbbbbbbbbbb": (120, 0.5),
        "fkid_never": (0, 0.0),
    }
    many = [f"fkid_{n}" for n in range(1200)] + ["fkid_aaaaaaaaaaaa"]
    assert store.spent(many, 0.0)["fkid_aaaaaaaaaaaa"] == (2240, 1.0)


# read only


def test_read_only_store_never_creates_anything(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(RecordStoreError):
        RecordStore(str(missing), readonly=True)
    assert not missing.exists()
    keys_only = tmp_path / "keys.db"
    KeyStore(str(keys_only)).close()
    with RecordStore(str(keys_only), readonly=True) as ro:
        assert ro.summary() == [] and ro.count() == 0 and ro.spent(["k"], 0) == {"k": (0, 0.0)}
        with pytest.raises(RecordStoreError, match="read only"):
            ro.insert_many([row(1)])
    with sqlite3.connect(keys_only) as conn:
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name = 'usage'").fetchone() is None
        )


def test_read_only_store_sees_rows_written_meanwhile(store: RecordStore, db: str) -> None:
    store.insert_many([row(1)])
    with RecordStore(db, readonly=True) as ro:
        assert ro.count() == 1
        store.insert_many([row(2)])
        assert ro.count() == 2


# parse_since


NOW = datetime(2026, 11, 10, 12, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 1800),
        ("24h", NOW - DAY),
        ("7d", NOW - 7 * DAY),
        ("7D", NOW - 7 * DAY),
        ("12H", NOW - 12 * 3600),
        ("1.5h", NOW - 5400),
        ("2w", NOW - 14 * DAY),
        (" 90s ", NOW - 90),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T12:00", datetime(2026, 11, 1, 12, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T12:00Z", datetime(2026, 11, 1, 12, tzinfo=timezone.utc).timestamp()),
        ("2026-11-01T14:00+02:00", datetime(2026, 11, 1, 12, tzinfo=timezone.utc).timestamp()),
    ],
)
def test_parse_since_accepts_durations_and_dates(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "7", "7 days", "-3d", "2026-13-01", "3M"])
def test_parse_since_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration such as 30m, 24h or 7d.*2026-11-01"):
        parse_since(text, NOW)


# the writer


def test_rows_added_on_the_loop_are_flushed_within_the_interval(db: str) -> None:
    async def main() -> float:
        writer = RecordWriter(db, interval=0.2)
        writer.start(asyncio.get_running_loop())
        await wait_for(lambda: writer.written == 0, 1)
        for n in range(50):
            writer.add(row(n))
        assert writer.pending == 50
        took = await wait_for(lambda: writer.written == 50, 5)
        assert writer.pending == 0
        await writer.aclose()
        return took

    assert asyncio.run(main()) < 0.2 + 0.3  # one interval, plus the write itself
    assert len(stored_ids(db)) == 50


def test_a_full_batch_is_flushed_before_the_interval(db: str) -> None:
    async def main() -> float:
        writer = RecordWriter(db, interval=30, max_batch=100)
        writer.start(asyncio.get_running_loop())
        for n in range(100):
            writer.add(row(n))
        took = await wait_for(lambda: writer.written == 100, 5)
        await writer.aclose()
        return took

    assert asyncio.run(main()) < 5


def test_aclose_writes_every_pending_row(db: str) -> None:
    async def main() -> RecordWriter:
        writer = RecordWriter(db, interval=60, max_batch=1000)
        writer.start(asyncio.get_running_loop())
        for n in range(12_345):
            writer.add(row(n))
        await writer.aclose()
        await writer.aclose()  # idempotent
        return writer

    writer = asyncio.run(main())
    assert writer.written == 12_345 and writer.pending == 0 and writer.dropped == 0
    assert len(stored_ids(db)) == 12_345


def test_close_sync_writes_pending_rows_without_a_loop(db: str) -> None:
    writer = RecordWriter(db, interval=60)
    for n in range(10):
        writer.add(row(n))
    writer.close_sync()
    assert writer.written == 10 and len(stored_ids(db)) == 10


def test_the_loop_keeps_running_while_the_database_is_locked(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordStore(db).close()
    monkeypatch.setattr(records, "BUSY_TIMEOUT", 1.0)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")

    async def main() -> int:
        writer = RecordWriter(db, interval=0.01)
        writer.start(asyncio.get_running_loop())
        writer.add(row(0))
        ticks = 0
        deadline = time.monotonic() + 0.5  # the writer thread is stuck in its busy wait
        while time.monotonic() < deadline:
            batch = [row(ticks * 1000 + n) for n in range(1, 1001)]
            started = time.perf_counter()
            for one in batch:
                writer.add(one)
            assert time.perf_counter() - started < 0.05  # add() never waits for SQLite
            await asyncio.sleep(0.01)
            ticks += 1
        locker.execute("ROLLBACK")
        await writer.aclose()
        return ticks

    try:
        assert asyncio.run(main()) >= 10
    finally:
        locker.close()


def test_failed_flush_keeps_rows_warns_once_and_retries(
    db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    RecordStore(db).close()
    monkeypatch.setattr(records, "BUSY_TIMEOUT", 0.05)
    locker = sqlite3.connect(db, isolation_level=None)

    async def main() -> RecordWriter:
        writer = RecordWriter(db, interval=0.02)
        writer.start(asyncio.get_running_loop())
        locker.execute("BEGIN EXCLUSIVE")
        for n in range(30):
            writer.add(row(n))
        await wait_for(lambda: "cannot write" in caplog.text, 5)
        await asyncio.sleep(0.2)  # several failing intervals
        assert writer.pending == 30 and writer.written == 0
        locker.execute("ROLLBACK")
        await wait_for(lambda: writer.written == 30, 5)
        await writer.aclose()
        return writer

    with caplog.at_level(logging.INFO, logger="openai_forward"):
        try:
            writer = asyncio.run(main())
        finally:
            locker.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "30 rows kept" in warnings[0].getMessage()
    assert "database is locked" in warnings[0].getMessage()
    assert "writing to" in caplog.text  # the recovery is logged too
    assert writer.dropped == 0 and len(stored_ids(db)) == 30


def test_unopenable_file_is_retried_once_it_can_be_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "sub"
    blocker.write_text("a file where the directory should be")
    path = str(blocker / "usage.db")

    async def main() -> RecordWriter:
        writer = RecordWriter(path, interval=0.02)
        writer.start(asyncio.get_running_loop())
        writer.add(row(1))
        await wait_for(lambda: "cannot write" in caplog.text, 5)
        blocker.unlink()
        await wait_for(lambda: writer.written == 1, 5)
        await writer.aclose()
        return writer

    with caplog.at_level(logging.WARNING, logger="openai_forward"):
        asyncio.run(main())
    assert stored_ids(path) == ["req000001"]


def test_pending_rows_are_bounded_dropping_the_oldest(
    db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    RecordStore(db).close()
    monkeypatch.setattr(records, "BUSY_TIMEOUT", 0.05)
    monkeypatch.setattr(records, "MAX_PENDING", 10)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")

    async def main() -> RecordWriter:
        writer = RecordWriter(db, interval=60)
        for n in range(25):
            writer.add(row(n))
        assert await writer.flush() == 0
        assert writer.pending == 10 and writer.dropped == 15
        locker.execute("ROLLBACK")
        assert await writer.flush() == 10
        await writer.aclose()
        return writer

    with caplog.at_level(logging.WARNING, logger="openai_forward"):
        try:
            asyncio.run(main())
        finally:
            locker.close()
    assert stored_ids(db) == [f"req{n:06d}" for n in range(15, 25)]


def test_a_malformed_row_is_dropped_alone(db: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> RecordWriter:
        writer = RecordWriter(db, interval=60, max_batch=4)
        for n in range(10):
            writer.add(row(n, status=None) if n == 5 else row(n))
        assert await writer.flush() == 9
        await writer.aclose()
        return writer

    with caplog.at_level(logging.WARNING, logger="openai_forward"):
        writer = asyncio.run(main())
    assert writer.dropped == 1 and writer.written == 9
    assert "1 malformed rows dropped" in caplog.text
    assert len(stored_ids(db)) == 9


def test_rewriting_rows_after_a_crash_does_not_count_them_twice(db: str) -> None:
    async def main() -> None:
        writer = RecordWriter(db, interval=60)
        for n in range(5):
            writer.add(row(n))
        await writer.flush()
        for n in range(3, 8):  # e.g. close_sync racing the writer thread
            writer.add(row(n))
        assert await writer.flush() == 3
        await writer.aclose()

    asyncio.run(main())
    assert len(stored_ids(db)) == 8


WRITER = """
import asyncio, sys
from openai_forward.records import RecordWriter, usage_row

tag, db, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    writer = RecordWriter(db, interval=0.005, max_batch=50)
    writer.start(asyncio.get_running_loop())
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # everyone starts at once
    for n in range(count):
        writer.add(usage_row(f"{tag}-{n}", float(n), None, None, "127.0.0.1", "/", "/v1/x",
                            None, None, None, 200, 1, 1, 0, 0, False, False, False, None,
                            1.0, None, None))
        if n % 100 == 0:
            await asyncio.sleep(0.001)
    await writer.aclose()
    assert writer.written == count and writer.dropped == 0, (writer.written, writer.dropped)

asyncio.run(main())
"""


def test_four_processes_write_at_once_without_failing(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")  # created by the racing processes themselves
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), f"p{i}", db, "3000"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        assert "locked" not in err and "cannot write" not in err
    with RecordStore(db) as check:
        assert check.count() == 12_000
