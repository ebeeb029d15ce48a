"""Cache stores: the contract on SQLite and on a real redis-server, then what each has alone
(SQLite: eviction, lazy expiry, the loop never waits, locks, processes; Redis: TTLs, prefixes,
outages), then ``open_cache`` and the ``cache stats|clear`` command."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cache_contract import SCENARIOS, T0, Scenario, body_entry, key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redisserver import (  # noqa: F401
    RedisServer,
    SilentServer,
    redis_db,
    redis_server,
    timed,
    warnings_in,
)

from openai_forward.cache import Entry
from openai_forward.cacheredis import RedisCache
from openai_forward.cachesqlite import EXPIRED_BATCH, SqliteCache
from openai_forward.cachestore import CacheError, CacheStore, command, open_cache

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
PATIENT = 2.0  # where Redis must answer for the test to mean anything
TIMEOUT = 0.1
FAST = 0.3  # a refused connection fails at once, far below any timeout
MARGIN = 0.4


class SqliteBackend:
    def __init__(self, path: Path, max_bytes: int = 64 << 20) -> None:
        self.path = str(path)
        self.max_bytes = max_bytes
        self.opened: list[CacheStore] = []

    def open(self, clock: Callable[[], float] | None = None) -> SqliteCache:
        store = SqliteCache(self.path, self.max_bytes, clock or time.time)
        self.opened.append(store)
        return store


class RedisBackend:
    def __init__(self, url: str, prefix: str = "t:cache:") -> None:
        self.url = url
        self.prefix = prefix
        self.opened: list[CacheStore] = []

    def open(self, clock: Callable[[], float] | None = None) -> RedisCache:
        store = RedisCache(self.url, self.prefix, PATIENT, clock=clock or time.time)
        self.opened.append(store)
        return store


def run(scenario: Callable[[Any], Awaitable[T]], backend: SqliteBackend | RedisBackend) -> T:
    """Run ``scenario(backend)`` on a fresh loop; close every store it opened."""

    async def main() -> T:
        try:
            return await scenario(backend)
        finally:
            for store in backend.opened:
                await store.aclose()
            backend.opened.clear()

    return asyncio.run(main())


def sql(path: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the cache file as another process would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_contract_sqlite(
    scenario: Scenario, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(scenario, SqliteBackend(tmp_path / "cache.db"))
    assert not warnings_in(caplog)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_contract_redis(
    scenario: Scenario, redis_db: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_db.url)
    run(scenario, backend)
    assert not warnings_in(caplog), "a Redis failure made the scenario pass by missing"


# --------------------------------------------------------------------------- SQLite only


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.db"
    run(lambda b: b.open().put(key(1), body_entry(), 60), SqliteBackend(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sql(str(path), "PRAGMA journal_mode") == [("wal",)]


def test_sqlite_evicts_the_least_recently_used_over_max_bytes(tmp_path: Path) -> None:
    size = len(body_entry(b"x" * 1000).encode())
    backend = SqliteBackend(tmp_path / "cache.db", max_bytes=3 * size + 10)

    async def body(b: SqliteBackend) -> None:
        store = b.open()
        for n in (1, 2, 3):
            await store.put(key(n), body_entry(b"x" * 1000), ttl=600, now=T0 + n)
        assert await store.get(key(1), now=T0 + 4) is not None  # 1 is now more recent than 2
        await store.put(key(4), body_entry(b"x" * 1000), ttl=600, now=T0 + 5)
        found = [await store.get(key(n), now=T0 + 6) is not None for n in (1, 2, 3, 4)]
        assert found == [True, False, True, True]
        stats = await store.stats()
        assert stats["entries"] == 3 and stats["bytes"] <= b.max_bytes
        assert sql(b.path, "SELECT v FROM cache_meta WHERE k = 'bytes'") == [(3 * size,)]

    run(body, backend)


def test_sqlite_does_not_store_an_entry_larger_than_max_bytes(tmp_path: Path) -> None:
    async def body(b: SqliteBackend) -> None:
        store = b.open()
        await store.put(key(1), body_entry(b"small"), ttl=60, now=T0)
        await store.put(key(2), body_entry(b"x" * 5000), ttl=60, now=T0)
        assert await store.get(key(2), now=T0) is None
        assert await store.get(key(1), now=T0) == body_entry(b"small")  # nothing evicted

    run(body, SqliteBackend(tmp_path / "cache.db", max_bytes=4000))


def test_sqlite_removes_expired_rows_lazily_in_small_batches(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cache.db")
    count = "SELECT COUNT(*) FROM cache"

    async def body(b: SqliteBackend) -> list[int]:
        store = b.open()
        for n in range(100):
            await store.put(key(n), body_entry(), ttl=10, now=T0)
        rows = []
        for n in range(4):  # each write removes at most one batch of expired rows
            await store.put(key(200 + n), body_entry(), ttl=10, now=T0 + 20)
            rows.append(sql(b.path, count)[0][0])
        assert sql(b.path, "SELECT v FROM cache_meta WHERE k = 'bytes'") == [
            (4 * len(body_entry().encode()),)
        ]
        return rows

    rows = run(body, backend)
    assert EXPIRED_BATCH == 32
    assert rows == [69, 38, 7, 4]  # 100 expired, 32 fewer per put, plus the ones put


def test_sqlite_lookups_of_a_large_entry_never_stall_the_loop(tmp_path: Path) -> None:
    big = Entry(200, [(b"content-type", b"application/json")], body=os.urandom(1 << 20))

    async def body(b: SqliteBackend) -> float:
        store = b.open()
        await store.put(key(1), big, ttl=600)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        late = 0.0

        async def ticker() -> None:  # a 1 ms timer: how late it fires is how long the loop hung
            nonlocal late
            while not done.is_set():
                t = loop.time()
                await asyncio.sleep(0.001)
                late = max(late, loop.time() - t - 0.001)

        # a lookup runs elsewhere: the loop has a turn before it is done (a read on the loop
        # would finish inside the task's first step)
        first = asyncio.create_task(store.get(key(1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not first.done()
        assert await first == big
        task = asyncio.create_task(ticker())
        got = await asyncio.gather(*(store.get(key(1)) for _ in range(100)))
        done.set()
        await task
        assert all(e == big for e in got)
        return late

    # generous: on a busy 2-core machine the scheduler alone makes a timer some 50 ms late
    assert run(body, SqliteBackend(tmp_path / "cache.db", max_bytes=8 << 20)) < 0.25


def test_sqlite_lookups_do_not_wait_for_another_writer_and_puts_give_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openai_forward")
    path = str(tmp_path / "cache.db")

    async def body() -> None:
        store = SqliteCache(path, 1 << 20, busy_timeout=0.2)
        try:
            await store.put(key(1), body_entry(), ttl=600)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            for _ in range(100):  # lookups past FOLD_AFTER try to write, and must not wait
                got, took = await timed(store.get(key(1)))
                assert got == body_entry() and took < 0.1
            _, took = await timed(store.put(key(2), body_entry(), ttl=600))
            assert 0.15 < took < 0.2 + MARGIN
            await store.put(key(3), body_entry(), ttl=600)
            assert len(warnings_in(caplog)) == 1  # one warning per outage
            other.execute("COMMIT")
            other.close()
            await store.put(key(2), body_entry(), ttl=600)
            assert await store.get(key(2)) == body_entry()
            assert (await store.stats())["hits"] == 101
        finally:
            await store.aclose()

    asyncio.run(body())
    assert "usable again" in caplog.records[-1].getMessage()


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"this is not SQLite" * 300)
    with pytest.raises(CacheError, match=r"cache\.db is not a usable SQLite database"):
        SqliteCache(str(path))


_WORKER = """
import asyncio, sys
from openai_forward.cache import Entry
from openai_forward.cachesqlite import SqliteCache

async def main():
    store = SqliteCache(sys.argv[1], 64 << 20)
    for n in range(150):
        k = b"w" + n.to_bytes(31, "big")
        await store.put(k, Entry(200, [], body=b"worker %d" % n), ttl=600)
        assert (await store.get(k)).body == b"worker %d" % n
    await store.aclose()

asyncio.run(main())
"""


def test_sqlite_worker_processes_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.db")
    asyncio.run(SqliteCache(path).aclose())  # created before the workers, as at start-up
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, path],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    async def body(b: SqliteBackend) -> None:
        store = b.open()
        for n in range(150):
            await store.put(b"m" + n.to_bytes(31, "big"), body_entry(b"main %d" % n), ttl=600)
        await asyncio.get_running_loop().run_in_executor(None, worker.wait, 30)
        for n in range(150):
            got = await store.get(b"w" + n.to_bytes(31, "big"))
            assert got is not None and got.body == b"worker %d" % n
        stats = await store.stats()
        assert stats["entries"] == 300 and stats["hits"] == 150 + 150

    try:
        run(body, SqliteBackend(Path(path)))
        err = worker.communicate(timeout=30)[1]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err.decode()
    assert err == b""
    total, counter = sql(
        path, "SELECT TOTAL(size), (SELECT v FROM cache_meta WHERE k='bytes') FROM cache"
    )[0]
    assert total == counter


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "delete", "clear"]),
        st.integers(0, 5),  # key
        st.integers(0, 3000),  # body size
        st.integers(1, 50),  # ttl
        st.integers(0, 20),  # time passing before the op
    ),
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_sqlite_agrees_with_a_model_and_keeps_its_byte_count(
    tmp_path: Path, ops: list[tuple[str, int, int, int, int]]
) -> None:
    backend = SqliteBackend(tmp_path / "model.db", max_bytes=8000)

    async def body(b: SqliteBackend) -> None:
        store = b.open()
        await store.clear()
        model: dict[int, tuple[bytes, float]] = {}  # key -> (body, expires); may be evicted
        now = T0
        for op, k, size, ttl, dt in ops:
            now += dt
            if op == "put":
                text = bytes([k]) * size
                await store.put(key(k), body_entry(text), ttl=ttl, now=now)
                if len(body_entry(text).encode()) <= b.max_bytes:
                    model[k] = (text, now + ttl)
            elif op == "get":
                got = await store.get(key(k), now=now)
                text, expires = model.get(k, (b"", 0.0))
                # a hit is always the model's live entry; a miss is expiry, absence or eviction
                assert got is None or (got == body_entry(text) and now < expires)
            elif op == "delete":
                await store.delete(key(k))
                model.pop(k, None)
            else:
                await store.clear()
                model.clear()
            total, counter = sql(
                b.path, "SELECT TOTAL(size), (SELECT v FROM cache_meta WHERE k='bytes') FROM cache"
            )[0]
            assert total == counter <= b.max_bytes

    run(body, backend)


# --------------------------------------------------------------------------- Redis only


def test_redis_entries_carry_a_ttl_and_keep_to_their_prefix(redis_db: RedisServer) -> None:
    with redis_db.client() as c:
        c.set("ofw:limit", "1")
        c.set("other:e:" + key(1).hex(), "not ours")

    async def body(b: RedisBackend) -> int:
        store = b.open()
        await store.put(key(1), body_entry(), ttl=30)
        await store.get(key(1))
        with redis_db.client() as c:
            assert 0 < c.pttl("we[ird]*:e:" + key(1).hex()) <= 30_000
        return await store.clear()

    assert run(body, RedisBackend(redis_db.url, prefix="we[ird]*:")) == 1
    with redis_db.client() as c:
        assert sorted(c.keys("*")) == [b"ofw:limit", b"other:e:" + key(1).hex().encode(),
                                       b"we[ird]*:stats"]  # fmt: skip


def test_redis_value_that_is_not_an_entry_is_a_miss(redis_db: RedisServer) -> None:
    names = ["t:cache:e:" + key(n).hex() for n in (1, 2, 3)]
    with redis_db.client() as c:
        c.set(names[0], b"999999999999999garbage")  # a live expiry, then no entry
        c.set(names[1], b"garbage")  # not even an expiry
        c.set(names[2], b"")

    async def body(b: RedisBackend) -> None:
        store = b.open()
        for n in (1, 2, 3):
            assert await store.get(key(n)) is None
        assert not store.degraded

    run(body, RedisBackend(redis_db.url))
    with redis_db.client() as c:
        assert c.exists(*names) == 0  # dropped


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_redis_down_misses_fast_warns_once_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="openai_forward")
    server = RedisServer()  # not started: nothing listens on its port
    mono = FakeMonotonic()

    async def body() -> None:
        store = RedisCache(server.url, timeout=PATIENT, retry_interval=5.0, monotonic=mono)
        try:
            got, took = await timed(store.get(key(1)))
            assert got is None and took < FAST and store.degraded
            _, took = await timed(store.put(key(1), body_entry(), ttl=60))
            assert took < FAST
            with pytest.raises(CacheError, match="Redis cache"):
                await store.stats()
            server.start()
            assert await store.get(key(1)) is None  # within the retry interval: not asked
            mono.t = 5.1
            await store.put(key(1), body_entry(), ttl=60)
            assert not store.degraded
            assert await store.get(key(1)) == body_entry()
        finally:
            await store.aclose()

    try:
        asyncio.run(body())
    finally:
        server.close()
    assert len(warnings_in(caplog)) == 1
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1


def test_a_redis_that_never_answers_costs_one_timeout_per_retry_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mono = FakeMonotonic()

    async def body() -> None:
        silent = SilentServer()
        store = RedisCache(await silent.start(), timeout=TIMEOUT, monotonic=mono)
        try:
            got, took = await timed(store.get(key(1)))
            assert got is None and TIMEOUT * 0.9 < took < TIMEOUT + MARGIN
            for _ in range(10):  # no lookup pays the timeout twice in a row
                got, took = await timed(store.get(key(1)))
                assert got is None and took < TIMEOUT * 0.9
                _, took = await timed(store.put(key(1), body_entry(), ttl=60))
                assert took < TIMEOUT * 0.9
            mono.t = 2.5
            _, took = await timed(store.put(key(1), body_entry(), ttl=60))
            assert TIMEOUT * 0.9 < took < TIMEOUT + MARGIN
        finally:
            await store.aclose()
            await silent.close()

    asyncio.run(body())
    assert len(warnings_in(caplog)) == 1


def test_redis_url_password_is_masked() -> None:
    store = RedisCache("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(store)
    asyncio.run(store.aclose())


# --------------------------------------------------------------------------- open_cache, CLI


def test_open_cache_picks_the_backend_by_scheme(tmp_path: Path, redis_db: RedisServer) -> None:
    async def body() -> None:
        on_file = open_cache(str(tmp_path / "c.db"))
        on_redis = open_cache(redis_db.url)
        assert isinstance(on_file, SqliteCache) and isinstance(on_redis, RedisCache)
        await on_file.aclose()
        await on_redis.aclose()

    asyncio.run(body())


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "cache.db")

    async def body(b: SqliteBackend) -> None:
        store = b.open()
        for n in range(3):
            await store.put(key(n), body_entry(), ttl=600)
        await store.get(key(0))
        await store.get(key(9))

    run(body, SqliteBackend(Path(path)))
    yield path


def test_cache_stats_and_clear_commands(filled: str) -> None:
    out = io.StringIO()
    assert command("stats", filled, as_json=True, out=out) == 0
    shown = json.loads(out.getvalue())
    assert (shown["entries"], shown["hits"], shown["misses"]) == (3, 1, 1)
    out = io.StringIO()
    assert command("clear", filled, out=out) == 0
    assert out.getvalue() == "cleared 3 entries\n"
    out = io.StringIO()
    command("stats", filled, out=out)
    assert "entries    0\n" in out.getvalue()


def test_cache_stats_of_a_missing_file_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    path = tmp_path / "none.db"
    assert command("stats", str(path), as_json=True, out=out) == 0
    assert json.loads(out.getvalue())["entries"] == 0
    assert not path.exists()


def test_cache_command_on_redis(redis_db: RedisServer) -> None:
    async def body(b: RedisBackend) -> None:
        await b.open().put(key(1), body_entry(), ttl=600)

    run(body, RedisBackend(redis_db.url, prefix="ofw:cache:"))
    out = io.StringIO()
    assert command("stats", redis_db.url, as_json=True, out=out) == 0
    assert json.loads(out.getvalue())["entries"] == 1
    assert command("clear", redis_db.url, out=io.StringIO()) == 0


def test_cache_command_reports_an_unusable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"garbage" * 1000)
    assert command("stats", str(path), out=io.StringIO()) == 1
    assert "not a usable SQLite database" in capsys.readouterr().err
