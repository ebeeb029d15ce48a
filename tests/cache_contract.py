"""The contract every cache store keeps (see openai_forward/cachestore.py), run against
SqliteCache and RedisCache by tests/test_cachestore.py.

Not collected by itself (no ``test_`` prefix). A scenario is an async function given a
``Backend``: ``open()`` makes a new store object on the same file or Redis database (a
second ``open()`` is a second gateway), closed by the runner. Each scenario starts from an
empty cache. Times are explicit (``now=``, base ``T0``) or come from a clock the scenario
moves; nothing sleeps. Expected values are written out by hand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from openai_forward.cache import Entry
from openai_forward.cachestore import CacheStore

T0 = 1_700_000_000.0


class Backend(Protocol):
    def open(self, clock: Callable[[], float] | None = None) -> CacheStore: ...


Scenario = Callable[[Backend], Awaitable[None]]


class Clock:
    """A wall clock moved by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def key(n: int) -> bytes:
    return bytes([n]) * 32


def body_entry(text: bytes = b'{"id":"chatcmpl-1","object":"chat.completion"}') -> Entry:
    return Entry(
        200,
        [(b"content-type", b"application/json"), (b"openai-model", b"gpt-4o-mini")],
        body=text,
        model="gpt-4o-mini",
        prompt_tokens=12,
        completion_tokens=3,
        cached_tokens=2,
        reasoning_tokens=1,
        created=1_700_000_000,
    )


STREAM_EVENTS = [
    (0, b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'),
    (7, b'data: {"choices":[{"delta":{"content":"Hel'),  # an event split across reads
    (7, b'lo \xc3\xa9\xff"}}]}\r\n\r\n'),  # CRLF framing and a byte that is not UTF-8
    (250, b"data: [DONE]\n\n"),
]


def stream_entry() -> Entry:
    return Entry(
        200,
        [(b"content-type", b"text/event-stream; charset=utf-8")],
        events=list(STREAM_EVENTS),
        model="gpt-4o-mini",
        prompt_tokens=5,
        completion_tokens=2,
        created=1_700_000_001,
    )


async def body_round_trip(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=60, now=T0)
    assert await store.get(key(1), now=T0 + 1) == body_entry()


async def stream_round_trip(b: Backend) -> None:
    store = b.open()
    await store.put(key(2), stream_entry(), ttl=60, now=T0)
    got = await store.get(key(2), now=T0 + 1)
    assert got == stream_entry()
    assert got is not None and got.events == STREAM_EVENTS


async def empty_body_round_trip(b: Backend) -> None:
    store = b.open()
    await store.put(key(3), Entry(200, [], body=b""), ttl=60, now=T0)
    assert await store.get(key(3), now=T0) == Entry(200, [], body=b"")


async def absent_key_misses(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=60, now=T0)
    assert await store.get(key(9), now=T0) is None


async def ttl_expiry_by_injected_now(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=10, now=T0)
    assert await store.get(key(1), now=T0 + 9.9) == body_entry()
    assert await store.get(key(1), now=T0 + 10) is None


async def ttl_expiry_by_the_stores_clock(b: Backend) -> None:
    clock = Clock()
    store = b.open(clock)
    await store.put(key(1), body_entry(), ttl=30)
    clock.t += 29
    assert await store.get(key(1)) == body_entry()
    clock.t += 2
    assert await store.get(key(1)) is None


async def a_non_positive_ttl_stores_nothing(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=0, now=T0)
    await store.put(key(2), body_entry(), ttl=-5, now=T0)
    assert await store.get(key(1), now=T0) is None
    assert await store.get(key(2), now=T0) is None


async def overwrite_replaces_the_entry_and_its_ttl(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(b"old"), ttl=10, now=T0)
    await store.put(key(1), body_entry(b"new"), ttl=100, now=T0 + 5)
    assert await store.get(key(1), now=T0 + 50) == body_entry(b"new")
    assert (await store.stats())["entries"] == 1


async def delete_removes_one_entry(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=60, now=T0)
    await store.put(key(2), stream_entry(), ttl=60, now=T0)
    await store.delete(key(1))
    await store.delete(key(7))  # absent: nothing happens
    assert await store.get(key(1), now=T0) is None
    assert await store.get(key(2), now=T0) == stream_entry()


async def clear_removes_everything_and_counts_it(b: Backend) -> None:
    store = b.open()
    for n in range(5):
        await store.put(key(n), body_entry(), ttl=60, now=T0)
    assert await store.clear() == 5
    assert await store.get(key(0), now=T0) is None
    stats = await store.stats()
    assert (stats["entries"], stats["bytes"]) == (0, 0)
    assert await store.clear() == 0


async def stats_count_entries_bytes_hits_and_misses(b: Backend) -> None:
    store = b.open()
    empty = await store.stats()
    assert (empty["entries"], empty["bytes"], empty["hits"], empty["misses"]) == (0, 0, 0, 0)
    await store.put(key(1), body_entry(), ttl=60, now=T0)
    await store.put(key(2), stream_entry(), ttl=60, now=T0)
    stats = await store.stats()
    assert stats["entries"] == 2
    # bytes: the encoded entries, each within a small header of the payload it holds
    payload = body_entry().size + stream_entry().size
    assert payload < stats["bytes"] <= payload + 2 * 512
    for _ in range(3):
        await store.get(key(1), now=T0)
    await store.get(key(2), now=T0)
    await store.get(key(3), now=T0)
    await store.get(key(1), now=T0 + 61)  # expired: a miss
    stats = await store.stats()
    assert (stats["hits"], stats["misses"]) == (4, 2)


async def counts_survive_clear(b: Backend) -> None:
    store = b.open()
    await store.put(key(1), body_entry(), ttl=60, now=T0)
    await store.get(key(1), now=T0)
    await store.get(key(2), now=T0)
    await store.clear()
    stats = await store.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)


async def two_gateways_share_entries(b: Backend) -> None:
    one, two = b.open(), b.open()
    await one.put(key(1), stream_entry(), ttl=60, now=T0)
    assert await two.get(key(1), now=T0 + 1) == stream_entry()
    await two.put(key(1), body_entry(b"from two"), ttl=60, now=T0 + 2)
    assert await one.get(key(1), now=T0 + 3) == body_entry(b"from two")
    await two.delete(key(1))
    assert await one.get(key(1), now=T0 + 3) is None
    await one.put(key(2), body_entry(), ttl=60, now=T0)
    assert await two.clear() == 1
    assert await one.get(key(2), now=T0) is None


async def two_gateways_add_up_their_counts(b: Backend) -> None:
    one, two = b.open(), b.open()
    await one.put(key(1), body_entry(), ttl=60, now=T0)
    await one.get(key(1), now=T0)
    await two.get(key(1), now=T0)
    await two.get(key(5), now=T0)
    await one.aclose()  # a gateway's counts are in the shared total once it stops
    await two.aclose()
    stats = await b.open().stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


async def hits_from_a_workers_memory_are_counted(b: Backend) -> None:
    one, two = b.open(), b.open()
    await one.get(key(1), now=T0)
    await one.count_hits(3)
    await two.count_hits(2)
    await two.count_hits(0)
    await one.aclose()
    await two.aclose()
    stats = await b.open().stats()
    assert (stats["hits"], stats["misses"]) == (5, 1)


async def many_keys_stay_apart(b: Backend) -> None:
    store = b.open()
    for n in range(40):
        await store.put(key(n), body_entry(b"%d" % n), ttl=60, now=T0)
    for n in range(40):
        assert await store.get(key(n), now=T0) == body_entry(b"%d" % n)
    assert (await store.stats())["entries"] == 40


async def a_large_entry_round_trips(b: Backend) -> None:
    store = b.open()
    big = Entry(200, [(b"content-type", b"application/json")], body=bytes(range(256)) * 8192)
    await store.put(key(1), big, ttl=60, now=T0)
    assert await store.get(key(1), now=T0) == big


SCENARIOS: list[Scenario] = [
    body_round_trip,
    stream_round_trip,
    empty_body_round_trip,
    absent_key_misses,
    ttl_expiry_by_injected_now,
    ttl_expiry_by_the_stores_clock,
    a_non_positive_ttl_stores_nothing,
    overwrite_replaces_the_entry_and_its_ttl,
    delete_removes_one_entry,
    clear_removes_everything_and_counts_it,
    stats_count_entries_bytes_hits_and_misses,
    counts_survive_clear,
    two_gateways_share_entries,
    two_gateways_add_up_their_counts,
    hits_from_a_workers_memory_are_counted,
    many_keys_stay_apart,
    a_large_entry_round_trips,
]
