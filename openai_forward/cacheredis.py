"""The cache in Redis, shared by every gateway instance using one URL (see ``cachestore.py``).

``prefix + "e:" + hex(key)`` holds the entry behind a 15-digit expiry in unix ms, set with
``PX`` so Redis drops it on its own; a Lua script reads it and counts the hit or miss in the
hash ``prefix + "stats"`` in one round trip (the expiry prefix lets an injected clock decide
expiry as on SQLite). Size is bounded by Redis's ``maxmemory`` with an LRU policy
(``allkeys-lru``), not here. When Redis fails or is slow, ``get`` misses and ``put`` is
dropped within ``timeout``, Redis is left alone for ``retry_interval`` seconds, and one
WARNING is logged per outage (the URL's password masked).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .cache import Entry
from .cachestore import CacheError
from .config import mask_url

log = logging.getLogger("openai_forward")
_T = TypeVar("_T")
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

# KEYS: the entry, the stats hash. ARGV: now in unix ms. The value starts with its expiry in
# unix ms (15 digits), so an injected clock decides expiry the same way on every backend.
_GET_LUA = """
local v = redis.call('GET', KEYS[1])
local expires = v and tonumber(string.sub(v, 1, 15))
if expires and expires > tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[2], 'hits', 1)
  return v
end
if v then redis.call('UNLINK', KEYS[1]) end  -- expired by the caller's clock, or not ours
redis.call('HINCRBY', KEYS[2], 'misses', 1)
return false
"""
_EXPIRY = 15  # digits of the expiry prefix
_MAX_MS = 10**_EXPIRY - 1
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class RedisCache:
    """Entries in Redis under ``prefix``, shared by every gateway using the same URL.

    ``get`` and ``put`` never take much longer than ``timeout``; after a failure Redis is
    not asked again for ``retry_interval`` seconds (``monotonic`` clock), and lookups miss.
    ``ValueError`` (password masked) for an unusable URL. Needs the ``redis`` package.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "ofw:cache:",
        timeout: float = 0.25,
        *,
        clock: Callable[[], float] = time.time,
        retry_interval: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        max_connections: int = 16,
    ) -> None:
        self.url = mask_url(url)
        try:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                socket_timeout=None,  # every call is bounded by `timeout` as a whole
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError:
            raise ValueError(f"invalid Redis URL {self.url}") from None
        self._client: Redis = Redis.from_pool(pool)
        self._lookup = self._client.register_script(_GET_LUA)
        self._prefix = prefix
        self._stats_key = prefix + "stats"
        self._timeout = timeout
        self._clock = clock
        self._monotonic = monotonic
        self._retry_interval = retry_interval
        self._retry_at = 0.0
        self._degraded = False

    def __repr__(self) -> str:
        return f"RedisCache({self.url!r}, prefix={self._prefix!r}, degraded={self._degraded})"

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable (lookups miss, puts are dropped)."""
        return self._degraded

    async def get(self, key: bytes, now: float | None = None) -> Entry | None:
        """The live entry under ``key``, or None (absent, expired, unreadable, Redis down)."""
        t = self._clock() if now is None else now
        if not self._use_redis():
            return None
        name = self._name(key)
        try:
            value = await self._call(self._lookup([name, self._stats_key], [int(t * 1000)]))
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._answered()
        if value is None:
            return None
        try:
            return Entry.decode(memoryview(value)[_EXPIRY:])
        except ValueError:
            await self.delete(key)
            return None

    async def put(self, key: bytes, entry: Entry, ttl: float, now: float | None = None) -> None:
        """Store ``entry`` under ``key`` for ``ttl`` seconds (Redis ``PX``), replacing any."""
        t = self._clock() if now is None else now
        ms = int(ttl * 1000)
        if ms <= 0 or not self._use_redis():
            return
        expires = min(max(int((t + ttl) * 1000), 0), _MAX_MS)
        value = b"%015d" % expires + entry.encode()
        await self._run(self._client.set(self._name(key), value, px=ms))

    async def delete(self, key: bytes) -> None:
        """Remove the entry under ``key``, if any."""
        if self._use_redis():
            await self._run(self._client.unlink(self._name(key)))

    async def clear(self) -> int:
        """Remove every entry under the prefix (SCAN, UNLINK in batches); how many went."""
        removed = 0
        async for names in self._scan():
            removed += await self._admin(self._client.unlink(*names))
        return removed

    async def stats(self) -> dict[str, Any]:
        """``backend``, ``url`` (masked), ``entries``, ``bytes``, ``hits``, ``misses``."""
        entries = size = 0
        async for names in self._scan():
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.strlen(name)
            lengths = await self._admin(pipe.execute())
            entries += sum(1 for n in lengths if n)
            size += sum(max(n - _EXPIRY, 0) for n in lengths)
        counts = await self._admin(self._client.hgetall(self._stats_key))
        return {
            "backend": "redis",
            "url": self.url,
            "entries": entries,
            "bytes": size,
            "hits": int(counts.get(b"hits", 0)),
            "misses": int(counts.get(b"misses", 0)),
        }

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        await self._client.aclose()

    def _name(self, key: bytes) -> str:
        return self._prefix + "e:" + key.hex()

    async def _scan(self) -> AsyncIterator[list[bytes | str]]:
        match = self._prefix.translate(_GLOB) + "e:*"
        cursor = -1
        while cursor != 0:
            step = self._client.scan(max(cursor, 0), match=match, count=500)
            cursor, names = await self._admin(step)
            if names:
                yield names

    async def _admin(self, aw: Awaitable[_T]) -> _T:
        try:
            return await self._call(aw)
        except _FAILURES as exc:
            raise CacheError(f"Redis cache {self.url}: {type(exc).__name__}: {exc}") from None

    if sys.version_info >= (3, 11):

        async def _call(self, aw: Awaitable[_T]) -> _T:
            async with asyncio.timeout(self._timeout):  # no Task per call, unlike wait_for
                return await aw

    else:

        async def _call(self, aw: Awaitable[_T]) -> _T:
            return await asyncio.wait_for(aw, self._timeout)

    async def count_hits(self, n: int) -> None:
        """Count ``n`` hits answered without this store (from a worker's memory)."""
        if n > 0 and self._use_redis():
            await self._run(self._client.hincrby(self._stats_key, "hits", n))

    async def _run(self, aw: Awaitable[Any]) -> None:
        try:
            await self._call(aw)
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._answered()

    def _use_redis(self) -> bool:
        # during an outage one call per retry interval probes Redis; the others skip it
        if not self._degraded:
            return True
        t = self._monotonic()
        if t < self._retry_at:
            return False
        self._retry_at = t + self._retry_interval
        return True

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._monotonic() + self._retry_interval
        if not self._degraded:
            self._degraded = True
            log.warning(
                "Redis cache unreachable: serving without it until it answers (%s: %s)",
                self.url,
                type(exc).__name__,
            )

    def _answered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("Redis cache answers again (%s)", self.url)
