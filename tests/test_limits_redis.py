"""RedisStore: the limit contract against a real redis-server, then what only Redis has
(TTLs, instances sharing limits, Redis TIME, outages, FLUSHALL, passwords)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from limits_contract import LEASE_EXPIRY_SCENARIOS, SCENARIOS, Scenario, conc, quota, rate
from redisserver import (  # noqa: F401
    RedisServer,
    SilentServer,
    redis_db,
    redis_server,
    timed,
    warnings_in,
)

from openai_forward.config import mask_url
from openai_forward.limits import Bucket, Decision
from openai_forward.redisstore import RedisStore

T = TypeVar("T")
WARNING = "Redis state store unreachable"
TIMEOUT = 0.1  # the default: what a silent Redis costs a request
MARGIN = 0.4  # scheduling slack on a loaded machine; far below "hangs"
# Where Redis must answer for the test to mean anything (a fallback answer would pass a limit
# test for the wrong reason, and a cold connection on a loaded machine can exceed 0.1 s).
PATIENT = 2.0
FAST = 0.3  # a refused or closed connection fails at once, well before any timeout


class FakeClock:
    """The local clock a store uses for its retry interval, moved by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class LoopHarness:
    """The contract's sync Harness over a RedisStore, every call on one event loop."""

    def __init__(self, store: RedisStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop

    def admit(self, buckets: Sequence[Bucket], now: float) -> Decision:
        return self.loop.run_until_complete(self.store.admit(buckets, now))

    def settle(self, decision: Decision, deltas: Sequence[float], now: float) -> None:
        self.loop.run_until_complete(self.store.settle(decision, deltas, now))

    def renew(self, decisions: Sequence[Decision], now: float) -> None:
        self.loop.run_until_complete(self.store.renew(decisions, now))


def run(body: Callable[..., Awaitable[T]], *stores: Any) -> T:
    """Run ``body(*stores)`` on a fresh event loop; close the stores afterwards."""

    async def main() -> T:
        try:
            return await body(*stores)
        finally:
            for s in stores:
                await s.aclose()

    return asyncio.run(main())


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server for tests that stop, kill or restart it."""
    s = RedisServer().start()
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("scenario", SCENARIOS + LEASE_EXPIRY_SCENARIOS, ids=lambda s: s.__name__)
def test_contract(
    scenario: Scenario, redis_db: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.new_event_loop()
    store = RedisStore(redis_db.url, timeout=PATIENT)
    try:
        scenario(LoopHarness(store, loop))
        assert not store.degraded, "the scenario was answered by the fallback, not Redis"
        assert not warnings_in(caplog)
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()


# --------------------------------------------------------------------------- Redis only


def test_every_key_written_has_a_ttl(redis_db: RedisServer) -> None:
    store = RedisStore(redis_db.url, timeout=PATIENT, prefix="ttl:")
    buckets = [
        rate("ttl|rpm", 10),
        rate("ttl|tpm", 1000, cost=300),
        quota("ttl|usd", 5, period=7 * 86400, cost=0.25, seed=1.5),
        conc("ttl|inflight", 3, period=30),
    ]

    async def body(s: RedisStore) -> None:
        kept = [await s.admit(buckets) for _ in range(3)]
        await s.renew(kept)
        await s.settle(kept[0], [0, -200, 0.1, 0])
        await s.settle(kept[1], [0, 500, -0.2, 0])
        await s.admit([quota("ttl|fresh", 1, cost=0.5)])
        await s.settle(await s.admit([rate("ttl|refund", 100, cost=40)]), [-40])

    run(body, store)
    with redis_db.client() as c:
        keys = sorted(k.decode() for k in c.scan_iter(match="*"))
        assert keys == [
            "ttl:ttl|fresh",
            "ttl:ttl|inflight",
            "ttl:ttl|rpm",
            "ttl:ttl|tpm",
            "ttl:ttl|usd",
        ]
        ttls = {k: c.pttl(k) for k in keys}
        assert all(t > 0 for t in ttls.values()), ttls
        assert ttls["ttl:ttl|inflight"] <= 30_000
        assert ttls["ttl:ttl|rpm"] <= 19_000  # three requests: tat = now + 18 s, + 1 s
        assert 7 * 86400_000 < ttls["ttl:ttl|usd"] <= 8 * 86400_000
        assert float(c.get("ttl:ttl|usd") or 0) == pytest.approx(1.5 + 0.75 + 0.1 - 0.2)
        assert c.zcard("ttl:ttl|inflight") == 1  # two leases settled, one live


def test_two_instances_share_one_limit_exactly(redis_db: RedisServer) -> None:
    b = rate("shared|rpm", 10)

    async def body(one: RedisStore, two: RedisStore) -> list[Decision]:
        return await asyncio.gather(*(s.admit([b]) for _ in range(25) for s in (one, two)))

    stores = RedisStore(redis_db.url, timeout=PATIENT), RedisStore(redis_db.url, timeout=PATIENT)
    decisions = run(body, *stores)
    assert not any(s.degraded for s in stores)
    assert sum(d.allowed for d in decisions) == 10
    for d in decisions:
        if not d.allowed:
            assert d.refused == b
            assert 5.0 < d.retry_after <= 6.0


def test_clock_is_redis_time_so_skewed_instances_agree(redis_db: RedisServer) -> None:
    """Without ``now`` the script reads Redis TIME: the instances' own clocks (here a day
    apart) play no part, and the stored tat is Redis TIME + the charge."""
    b = rate("clock|rpm", 10)
    slow = RedisStore(redis_db.url, timeout=PATIENT, clock=lambda: 0.0)
    fast = RedisStore(redis_db.url, timeout=PATIENT, clock=lambda: 86400.0)

    async def body(a: RedisStore, z: RedisStore) -> tuple[list[Decision], Decision]:
        first = [await a.admit([b]) for _ in range(10)]
        return first, await z.admit([b])

    first, refused = run(body, slow, fast)
    assert all(d.allowed for d in first)
    assert [d.states[0].remaining for d in first] == list(range(9, -1, -1))
    assert 59.0 < first[-1].states[0].reset <= 60.0
    assert not refused.allowed and 5.0 < refused.retry_after <= 6.0
    with redis_db.client() as c:
        secs, micros = c.time()
        tat = float(c.get("ofw:clock|rpm") or 0)
    assert 59.0 < tat - (secs + micros / 1e6) <= 60.0


def test_quota_restarts_from_its_seed_after_flushall(redis_db: RedisServer) -> None:

    async def body(s: RedisStore) -> tuple[Decision, Decision, Decision]:
        before = await s.admit([quota("flush|usd", 100, cost=5, seed=90)])
        redis_db.flush()  # or a failover to an empty replica
        # The caller passes the spend its database knows: 95 after the first request.
        after = await s.admit([quota("flush|usd", 100, cost=5, seed=95)])
        return before, after, await s.admit([quota("flush|usd", 100, cost=1, seed=95)])

    before, after, over = run(body, RedisStore(redis_db.url, timeout=PATIENT))
    assert before.allowed and before.states[0].remaining == 5
    assert after.allowed and after.states[0].remaining == 0
    assert not over.allowed and over.retry_after == 3600


def test_redis_down_at_start_answers_locally_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="openai_forward")
    server = RedisServer()  # not started yet: nothing listens on its port
    clock = FakeClock()
    store = RedisStore(server.url, timeout=PATIENT, retry_interval=5.0, clock=clock)
    b = conc("down|inflight", 1)

    async def body(s: RedisStore) -> None:
        d, took = await timed(s.admit([b]))
        assert took < FAST
        assert d.allowed and s.degraded
        assert not (await s.admit([b])).allowed  # the fallback counts the live lease
        await s.settle(d, [0])  # a fallback decision settles on the fallback
        assert not await s.ping()
        server.start()
        clock.t = 4.9  # before retry_interval: Redis is not asked, though it is back
        assert (await s.admit([b])).allowed and s.degraded
        clock.t = 5.1
        assert (await s.admit([b])).allowed and not s.degraded
        with server.client() as c:
            assert c.zcard("ofw:down|inflight") == 1

    try:
        run(body, store)
    finally:
        server.close()
    assert len(warnings_in(caplog)) == 1
    assert WARNING in warnings_in(caplog)[0]
    assert sum("store answers again" in r.getMessage() for r in caplog.records) == 1


def test_redis_killed_mid_traffic_then_restarted_recovers(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openai_forward")
    clock = FakeClock()
    store = RedisStore(server.url, timeout=PATIENT, retry_interval=1.0, clock=clock)
    b = [rate("kill|rpm", 100), conc("kill|inflight", 50)]

    async def body(s: RedisStore) -> None:
        held = [await s.admit(b) for _ in range(5)]
        assert all(d.allowed for d in held) and not s.degraded
        server.kill()
        d, took = await timed(s.admit(b))
        assert d.allowed and s.degraded and took < FAST
        # Redis decisions cannot settle while it is down: dropped at once, keys expire.
        _, took = await timed(s.settle(held[0], [0, 0]))
        assert took < FAST
        for _ in range(20):
            assert (await s.admit(b)).allowed
        server.start()
        clock.t = 1.5
        d = await s.admit(b)
        assert d.allowed and not s.degraded
        assert d.states[0].remaining == 99  # restarted empty: only this admission counts
        await s.settle(d, [0, 0])
        assert await s.ping()

    run(body, store)
    assert len(warnings_in(caplog)) == 1
    assert sum("store answers again" in r.getMessage() for r in caplog.records) == 1


def test_a_redis_that_never_answers_costs_one_timeout_per_retry_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    b = [rate("silent|rpm", 10), quota("silent|usd", 10), conc("silent|inflight", 2)]

    async def body() -> None:
        silent = SilentServer()
        store = RedisStore(await silent.start(), timeout=TIMEOUT, retry_interval=2.0, clock=clock)
        try:
            d, took = await timed(store.admit(b))
            assert d.allowed and store.degraded
            assert TIMEOUT * 0.9 < took < TIMEOUT + MARGIN
            assert silent.accepted == 1
            for _ in range(10):  # no request pays the timeout twice in a row
                d, took = await timed(store.admit(b))
                assert took < TIMEOUT * 0.9  # an attempt would cost the timeout
                await store.settle(d, [0, 0, 0])
            assert silent.accepted == 1
            clock.t = 2.5  # the retry interval is over: one call probes again, bounded
            _, took = await timed(store.admit(b))
            assert TIMEOUT * 0.9 < took < TIMEOUT + MARGIN and silent.accepted == 2
            _, took = await timed(store.ping())
            assert took < TIMEOUT + MARGIN
        finally:
            await store.aclose()
            await silent.close()

    asyncio.run(body())
    assert len(warnings_in(caplog)) == 1


def test_the_password_never_appears_in_keys_values_logs_or_repr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cr3t-Pa55w0rd"
    server = RedisServer(password=password).start()
    wrong = RedisStore(server.url.replace(password, "wr0ng-Pa55w0rd"), timeout=PATIENT)
    store = RedisStore(server.url, timeout=PATIENT)
    b = [rate("pw|rpm", 10), quota("pw|usd", 10, cost=2), conc("pw|inflight", 3)]
    seen: list[str] = [repr(store), repr(wrong)]

    async def body(s: RedisStore, w: RedisStore) -> None:
        d = await s.admit(b)
        assert d.allowed and not s.degraded
        await s.renew([d])
        await s.settle(d, [0, 1, 0])
        assert (await w.admit(b)).allowed and w.degraded  # refused AUTH: answered locally
        with server.client() as c:
            for k in c.scan_iter(match="*"):
                seen.append(repr(k))
                seen.append(repr(c.dump(k)))
        server.kill()
        assert (await s.admit(b)).allowed and s.degraded
        seen.append(repr(s))

    try:
        run(body, store, wrong)
    finally:
        server.close()
    seen += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert len(warnings_in(caplog)) == 2  # one per store
    assert "redis://:***@127.0.0.1" in repr(store)
    for text in seen:
        assert password not in text and "wr0ng-Pa55w0rd" not in text, text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
        ("redis://host:6379", "redis://host:6379"),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_an_invalid_url_error_masks_the_password() -> None:
    with pytest.raises(ValueError) as info:
        RedisStore("http://:hunter2-secret@host:6379")
    assert "hunter2-secret" not in str(info.value)
    assert ":***@" in str(info.value)
