"""The Redis limit store: limits shared by every gateway instance that points at one Redis.

Same semantics as ``LocalStore`` (see ``limits.py``); each operation is one Lua script that
checks and charges every bucket of the call atomically on the server, so instances never race.
The clock is Redis ``TIME`` unless the caller injects ``now``: instances with skewed clocks
agree.

Key layout (``prefix`` defaults to ``"ofw:"``), one key per bucket, every key with a TTL:

* rate: ``prefix + name`` -> string, the bucket's ``tat`` in seconds; expires 1 s after it.
* quota: ``prefix + name`` -> string, the committed amount; expires ``period + 86400`` s after
  the last write. An absent key starts from ``bucket.seed`` (so a FLUSHALL or a failover to an
  empty replica does not reset spending).
* concurrent: ``prefix + name`` -> ZSET of lease ids scored by expiry time; expired members are
  removed on every admit and renew; the key lives as long as its longest lease.

When Redis is unreachable, slow or fails, every call answers from ``fallback`` (a LocalStore:
limits are then counted per instance) within ``timeout``, and Redis is not tried again for
``retry_interval`` seconds. One WARNING is logged per outage and one INFO line when Redis
answers again. Log lines and ``repr`` show the URL with its password masked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import mask_url
from .limits import Bucket, BucketState, Decision, LocalStore

log = logging.getLogger("openai_forward")

_T = TypeVar("_T")

# A connection refused, a timeout, a reply we cannot use: all mean "answer locally".
_FAILURES = (RedisError, OSError, asyncio.TimeoutError, ValueError, IndexError)

_COMMON = """
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end
local function fmt(x)
  return string.format('%.17g', x)
end
-- PEXPIRE that never shortens: Redis 6 has no PEXPIRE GT.
local function extend(key, seconds)
  local want = ms(seconds)
  if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, want) end
end
local now = clock(ARGV[1])
local lease = ARGV[2]
"""

# KEYS[i]: bucket i. ARGV: now ('' = TIME), lease id, then kind, limit, period, cost, seed per
# bucket. Returns {allowed 0/1, index of the first refusing bucket or 0, retry_after,
# remaining_1, reset_1, ...}; floats as round-tripping strings (Lua numbers are truncated to
# integers on the way out).
_ADMIT = (
    _COMMON
    + """
local ok, first, retry = 1, 0, 0
local now_state, new_state, values = {}, {}, {}
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 5
  local kind, key = ARGV[j + 1], KEYS[i]
  local limit, period, cost = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local value, wait, pass
  if kind == 'rate' then
    local tick = period / limit
    local t0 = math.max(tonumber(redis.call('GET', key)) or now, now)
    value = t0 + math.min(cost, limit) * tick
    now_state[i] = {math.floor((period - (t0 - now)) / tick + 1e-9), t0 - now}
    new_state[i] = {math.floor((period - (value - now)) / tick + 1e-9), value - now}
    wait = value - now - period
    pass = wait <= 1e-9
  elseif kind == 'quota' then
    local committed = tonumber(redis.call('GET', key)) or tonumber(ARGV[j + 5])
    value = committed + cost
    now_state[i] = {limit - committed, period}
    new_state[i] = {limit - value, period}
    wait, pass = period, value <= limit + 1e-9
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local count = redis.call('ZCARD', key)
    value = now + period
    now_state[i] = {limit - count, 0}
    new_state[i] = {limit - count - 1, 0}
    wait, pass = 1, count + 1 <= limit
  end
  values[i] = value
  if not pass then
    ok = 0
    if first == 0 then first = i end
    retry = math.max(retry, wait)
  end
end
local reply = {ok, first, fmt(retry)}
local shown = ok == 1 and new_state or now_state
for i = 1, #KEYS do
  reply[2 + 2 * i] = fmt(math.max(shown[i][1], 0))
  reply[3 + 2 * i] = fmt(shown[i][2])
end
if ok == 0 then return reply end
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 5
  local kind, key, period = ARGV[j + 1], KEYS[i], tonumber(ARGV[j + 3])
  if kind == 'rate' then
    redis.call('SET', key, fmt(values[i]), 'PX', ms(values[i] - now + 1))
  elseif kind == 'quota' then
    redis.call('SET', key, fmt(values[i]), 'PX', ms(period + 86400))
  else
    redis.call('ZADD', key, values[i], lease)
    extend(key, period)
  end
end
return reply
"""
)

# KEYS[i]: bucket i. ARGV: now, lease id, then kind, period, x, delta per bucket, where x is
# the limit (rate) or the value to assume if the key is gone (quota: seed + cost).
_SETTLE = (
    _COMMON
    + """
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 4
  local kind, key = ARGV[j + 1], KEYS[i]
  local period, x, delta = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  if kind == 'rate' then
    -- A tat in the past is a full bucket, like no key: the delta applies from now.
    local tat = math.max(tonumber(redis.call('GET', key)) or now, now) + delta * period / x
    if tat > now then
      redis.call('SET', key, fmt(tat), 'PX', ms(tat - now + 1))
    else
      redis.call('DEL', key)  -- absent means tat = now: a full bucket
    end
  elseif kind == 'quota' then
    local committed = tonumber(redis.call('GET', key)) or x
    redis.call('SET', key, fmt(math.max(committed + delta, 0)), 'PX', ms(period + 86400))
  else
    redis.call('ZREM', key, lease)
  end
end
return 0
"""
)

# KEYS[i]: a concurrent bucket. ARGV: now, '', then lease id, period per key.
_RENEW = (
    _COMMON
    + """
for i = 1, #KEYS do
  local key, id, period = KEYS[i], ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZADD', key, 'XX', 'CH', now + period, id) == 1 then extend(key, period) end
end
return 0
"""
)


@dataclass(slots=True)
class _Lease:
    """The ticket of a decision Redis made: its lease id, and whether it was settled."""

    id: str
    settled: bool = False


def _secrets_of(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return [url]
    found += re.findall(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    return [s for raw in found if raw for s in {raw, unquote(raw)}]


class RedisStore:
    """Limit state in Redis, shared by every gateway instance using the same URL and prefix.

    ``admit``/``settle``/``renew`` have the LocalStore contract, as coroutines. They never
    raise for a Redis failure and never take much longer than ``timeout``: see the module
    docstring for the fallback. ``now=None`` means Redis ``TIME``; ``clock`` (default
    ``time.monotonic``) is the local one: it times the retry interval and is the clock of
    the fallback created when none is given. At most ``max_connections`` sockets
    are open; calls beyond that queue for one. Call ``aclose()`` when done.
    """

    is_async = True

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.1,
        retry_interval: float = 2.0,
        prefix: str = "ofw:",
        fallback: LocalStore | None = None,
        clock: Callable[[], float] | None = None,
        max_connections: int = 16,
    ) -> None:
        """Raise ValueError (password masked) if ``url`` is not a usable Redis URL."""
        self._url = mask_url(url)
        self._secrets = _secrets_of(url)
        try:
            # Bounded and blocking: one Redis thread gains nothing from hundreds of sockets,
            # and opening them in a burst costs more than queueing for a warm one (the
            # default pool raises past 100). The wait counts against `timeout`.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                # `_call` bounds every call (pool wait, connect, write, read) by `timeout`;
                # a socket timeout as well would cost redis-py a Task per write.
                socket_timeout=None,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # a retry would pay the timeout twice
            )
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL {self._url}: {self._scrub(exc)}") from None
        self._client = Redis.from_pool(pool)
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)
        self._renew = self._client.register_script(_RENEW)
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._prefix = prefix
        self._clock = clock or time.monotonic
        self._fallback = fallback if fallback is not None else LocalStore(self._clock)
        self._degraded = False
        self._retry_at = 0.0
        self._lease_ids = map(f"{os.urandom(8).hex()}:{{}}".format, itertools.count())

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and decisions come from the fallback."""
        return self._degraded

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, prefix={self._prefix!r}, degraded={self._degraded})"

    async def admit(self, buckets: Sequence[Bucket], now: float | None = None) -> Decision:
        """Check every bucket and charge all of them, or none if one refuses."""
        if not buckets:
            return Decision(True, [], ticket=_Lease(""))
        if not self._use_redis():
            return self._fallback.admit(buckets, now)
        lease = _Lease(next(self._lease_ids))
        args: list[Any] = ["" if now is None else now, lease.id]
        for b in buckets:
            args += (b.kind, b.limit, b.period, b.cost, b.seed)
        keys = [self._prefix + b.name for b in buckets]
        try:
            reply = await self._call(self._admit(keys, args))
            decision = _decision(buckets, reply, lease)
        except _FAILURES as exc:
            self._failed(exc)
            return self._fallback.admit(buckets, now)
        self._answered()
        return decision

    async def settle(
        self, decision: Decision, deltas: Sequence[float], now: float | None = None
    ) -> None:
        """Apply ``deltas[i]`` (actual - reserved; missing ones count as 0) to
        ``decision.states[i]``'s bucket and release the lease, once per decision.

        A decision made by the fallback settles there; one made by Redis is dropped if Redis
        is down now (its keys expire on their own).
        """
        lease = decision.ticket
        if not decision.allowed:
            return
        if not isinstance(lease, _Lease):
            self._fallback.settle(decision, deltas, now)
            return
        if lease.settled:
            return
        lease.settled = True
        keys: list[str] = []
        args: list[Any] = ["" if now is None else now, lease.id]
        for i, st in enumerate(decision.states):
            b, delta = st.bucket, deltas[i] if i < len(deltas) else 0.0
            if b.kind == "concurrent":
                args += (b.kind, 0, 0, 0)
            elif delta:
                args += (b.kind, b.period, b.limit if b.kind == "rate" else b.seed + b.cost, delta)
            else:
                continue
            keys.append(self._prefix + b.name)
        if keys and self._use_redis():
            await self._run(self._settle(keys, args))

    async def renew(self, decisions: Sequence[Decision], now: float | None = None) -> None:
        """Push the expiry of the live concurrent leases of ``decisions`` to now + period."""
        keys: list[str] = []
        args: list[Any] = ["" if now is None else now, ""]
        local = []
        for d in decisions:
            lease = d.ticket
            if not d.allowed or (isinstance(lease, _Lease) and lease.settled):
                continue
            if not isinstance(lease, _Lease):
                local.append(d)
                continue
            for st in d.states:
                if st.bucket.kind == "concurrent":
                    keys.append(self._prefix + st.bucket.name)
                    args += (lease.id, st.bucket.period)
        if local:
            self._fallback.renew(local, now)
        if keys and self._use_redis():
            await self._run(self._renew(keys, args))

    async def ping(self) -> bool:
        """True if Redis answers PING within ``timeout``; updates ``degraded``. Never raises."""
        return await self._run(self._client.ping())

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        await self._client.aclose()

    def _use_redis(self) -> bool:
        # During an outage one call per retry interval probes Redis; the others go local
        # at once, so no request pays the timeout twice in a row.
        if not self._degraded:
            return True
        t = self._clock()
        if t < self._retry_at:
            return False
        self._retry_at = t + self._retry_interval
        return True

    async def _run(self, aw: Awaitable[Any]) -> bool:
        try:
            await self._call(aw)
        except _FAILURES as exc:
            self._failed(exc)
            return False
        self._answered()
        return True

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock() + self._retry_interval
        if not self._degraded:
            self._degraded = True
            log.warning(
                "Redis state store unreachable: rate limits are counted per instance until it "
                "answers again (%s: %s: %s)",
                self._url,
                type(exc).__name__,
                self._scrub(exc) or "timed out",
            )

    def _answered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("Redis state store answers again (%s): rate limits are shared", self._url)

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    if sys.version_info >= (3, 11):

        async def _call(self, aw: Awaitable[_T]) -> _T:
            async with asyncio.timeout(self._timeout):
                return await aw

    else:

        async def _call(self, aw: Awaitable[_T]) -> _T:
            return await asyncio.wait_for(aw, self._timeout)


def _decision(buckets: Sequence[Bucket], reply: list[Any], lease: _Lease) -> Decision:
    states = [
        BucketState(b, float(reply[3 + 2 * i]), float(reply[4 + 2 * i]))
        for i, b in enumerate(buckets)
    ]
    if reply[0] == 1:
        return Decision(True, states, ticket=lease)
    return Decision(False, states, buckets[reply[1] - 1], float(reply[2]))
