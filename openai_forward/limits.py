"""Rate limits, concurrency limits and quotas: the buckets, the decisions, the local store.

The semantics every store implements (this module's ``LocalStore``, ``shmstore.SharedStore``,
``redisstore.RedisStore``) are fixed in /work/spec/issue5-common.md and checked by one
contract suite (tests/limits_contract.py). In short:

* rate: GCRA with weights. ``T = period / limit``; state ``tat`` (absent = now); a request
  costing ``c = min(cost, limit)`` passes iff ``max(tat, now) + c*T - now <= period``.
* concurrent: a count of live leases; a lease lives until settled or ``period`` seconds
  without renew.
* quota: ``committed`` (absent = ``bucket.seed``); passes iff ``committed + cost <= limit``;
  state expires ``period + 86400`` s after its last write.

``admit`` is all-or-nothing over the buckets of one call; ``settle`` applies
``actual - reserved`` deltas once per decision.

The arithmetic lives in small pure functions over plain numbers (no clock, no state) so every
store shares it and the tests' reference model can be written independently of it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["rate", "concurrent", "quota"]

EPSILON = 1e-9  # float slack: 10 requests of T = 6 s must fit a 60 s period exactly
QUOTA_GRACE = 86400.0  # quota state outlives its period by a day, then the seed applies
CONCURRENT_RETRY = 1.0  # when a lease frees is unknown; a hint for retry-after
_PRUNE_PER_CALL = 16  # expired entries dropped per admit at most: bounded work, keeps up


@dataclass(slots=True)  # treat as immutable; not frozen: frozen construction costs 3x
class Bucket:
    """One limit as the store sees it: a name (the store's key, never a secret) and numbers.

    ``unit`` is what the bucket counts, for the caller only (stores ignore it): "requests",
    "tokens", "cost", or "" (a concurrency count)."""

    name: str
    kind: Kind
    limit: float
    period: float
    cost: float = 1.0
    seed: float = 0.0
    unit: str = ""


@dataclass(slots=True)  # not frozen: made per bucket per request, and frozen costs 3x
class BucketState:
    """A bucket after an admission (or now, if the admission was refused)."""

    bucket: Bucket
    remaining: float
    reset: float


@dataclass(slots=True)
class Decision:
    """The answer of ``admit``; pass it back to ``settle`` when the request ends."""

    allowed: bool
    states: list[BucketState] = field(default_factory=list)
    refused: Bucket | None = None
    retry_after: float = 0.0
    ticket: object = None


# --------------------------------------------------------------------------- arithmetic


def whole(units: float) -> float:
    """Whole units in ``units``, tolerant of float error just below an integer, at least 0."""
    units += EPSILON
    return float(int(units)) if units > 0 else 0.0  # int() is floor for positives, and fast


def rate_admit(
    tat: float, now: float, limit: float, period: float, cost: float
) -> tuple[bool, float, float, float, float]:
    """GCRA admission of one rate bucket (``limit``, ``period`` > 0; pass ``tat = now`` when
    the bucket has no state). Returns ``(allowed, tat_after, remaining, reset, retry_after)``;
    when refused ``tat_after`` is ``tat`` and remaining/reset describe the bucket now."""
    step = period / limit
    start = tat if tat > now else now
    new = start + (cost if cost < limit else limit) * step
    if new - now <= period + EPSILON:
        # here the units left are > -1, so int() (truncation) is whole() without the calls
        return True, new, float(int((period - (new - now)) / step + EPSILON)), new - now, 0.0
    return False, tat, whole((period - (start - now)) / step), start - now, new - period - now


def rate_state(tat: float, now: float, limit: float, period: float) -> tuple[float, float]:
    """``(remaining, reset)`` of a rate bucket at ``now`` without charging it."""
    step = period / limit
    start = tat if tat > now else now
    return whole((period - (start - now)) / step), start - now


def rate_settle(tat: float, now: float, limit: float, period: float, delta: float) -> float:
    """The tat after charging ``delta`` more units (negative: a refund) at ``now``.

    A tat in the past means a full bucket, exactly like no state, so the delta applies from
    ``max(tat, now)``: a refund never makes a bucket fuller than full, and a full bucket
    does not swallow a late overcharge (pruning an expired tat changes nothing)."""
    new = (tat if tat > now else now) + delta * period / limit
    return new if new > now else now


def concurrent_admit(count: float, limit: float) -> tuple[bool, float]:
    """``(allowed, remaining)`` for one more lease over ``count`` live ones; remaining counts
    the new lease when allowed."""
    if count + 1 <= limit:
        return True, limit - count - 1
    return False, max(limit - count, 0.0)


def quota_admit(committed: float, limit: float, cost: float) -> tuple[bool, float, float]:
    """``(allowed, committed_after, remaining)``; refused leaves ``committed`` unchanged."""
    if committed + cost <= limit + EPSILON:
        after = committed + cost
        return True, after, max(limit - after, 0.0)
    return False, committed, max(limit - committed, 0.0)


def quota_settle(committed: float, delta: float) -> float:
    """Committed after correcting a reservation by ``delta``: never below zero."""
    after = committed + delta
    return after if after > 0 else 0.0


Outcome = tuple[bool, float, float, float, float]  # allowed, value after, remaining, reset, wait


def judge(b: Bucket, value: float, now: float) -> Outcome:
    """One bucket's admission given its state ``value`` (rate: tat, now when absent; quota:
    committed, seed when absent; concurrent: live leases). Returns ``(allowed, value_after,
    remaining, reset, retry_after)``; refused leaves the value unchanged."""
    if b.kind == "rate":
        return rate_admit(value, now, b.limit, b.period, b.cost)
    if b.kind == "quota":
        ok, after, remaining = quota_admit(value, b.limit, b.cost)
        return ok, after, remaining, b.period, 0.0 if ok else b.period
    ok, remaining = concurrent_admit(value, b.limit)
    return ok, value + 1 if ok else value, remaining, 0.0, 0.0 if ok else CONCURRENT_RETRY


def standing(b: Bucket, value: float, now: float) -> BucketState:
    """The state of a bucket at ``now`` without charging it (``value`` as for ``judge``)."""
    if b.kind == "rate":
        remaining, reset = rate_state(value, now, b.limit, b.period)
        return BucketState(b, remaining, reset)
    if b.kind == "quota":
        return BucketState(b, max(b.limit - value, 0.0), b.period)
    return BucketState(b, max(b.limit - value, 0.0), 0.0)


def decide(
    buckets: Sequence[Bucket], values: Sequence[float], now: float
) -> tuple[Decision, list[float]]:
    """The all-or-nothing decision over ``buckets`` whose states are ``values``, and the values
    to store if it is allowed (nothing to store if refused). The ticket is left to the store.

    Refused: ``refused`` is the first refusing bucket, ``retry_after`` the longest wait of the
    refusing ones, and every state describes its bucket as it is (nothing was charged)."""
    states = []
    after = []
    for b, value in zip(buckets, values, strict=False):
        ok, new, remaining, reset, _ = judge(b, value, now)
        if not ok:
            return _refusal(buckets, values, now), []
        states.append(BucketState(b, remaining, reset))
        after.append(new)
    return Decision(True, states), after


def _refusal(buckets: Sequence[Bucket], values: Sequence[float], now: float) -> Decision:
    refused = None
    wait = 0.0
    states = []
    for b, value in zip(buckets, values, strict=False):
        ok, _, remaining, reset, retry_after = judge(b, value, now)
        if ok:  # passed alone, but nothing is charged: report the bucket as it is
            states.append(standing(b, value, now))
            continue
        refused = refused or b
        wait = max(wait, retry_after)
        states.append(BucketState(b, remaining, reset))
    return Decision(False, states, refused, wait)


# --------------------------------------------------------------------------- local store

_RATE, _QUOTA, _CONCURRENT = 0, 1, 2


class LocalStore:
    """Limits counted in this process's memory (one worker, or the Redis store's fallback).

    ``admit``/``settle``/``renew`` follow the module's semantics; the clock is
    ``time.monotonic`` unless ``clock`` is given or a call passes ``now`` (which must not go
    backwards by more than the periods involved: expired state is pruned by the latest now).
    Expired state (rate: tat <= now; quota: past its expiry; concurrent: no live lease)
    reads as absent, and is dropped lazily by an expiry heap, at most ``_PRUNE_PER_CALL``
    entries per admit (amortised O(1), never a long sweep), so a flood of distinct buckets
    costs memory only while they are live. ``len(store)`` is the number of entries held:
    the live ones plus those that expired less than about one period ago. Bucket names
    within one call must be distinct.

    ``settle`` consumes a decision's ticket (sets it to None), which makes a second settle a
    no-op. Not thread-safe: one event loop per store.
    """

    is_async = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rate: dict[str, float] = {}  # name -> tat
        self._quota: dict[str, tuple[float, float]] = {}  # name -> (committed, expiry)
        # name -> {lease id: expiry}; insertion order is expiry order (renew re-inserts)
        self._leases: dict[str, dict[int, float]] = {}
        # One (when to look, kind, name, period) per entry held: the entry is only removed
        # when its item is popped, so no entry is ever forgotten by the heap or listed twice.
        # Reads treat expired state as absent, so the heap only bounds memory: a live entry
        # is looked at again a period later, and a dead one lingers at most a period.
        self._expiry: list[tuple[float, int, str, float]] = []
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._rate) + len(self._quota) + len(self._leases)

    def __repr__(self) -> str:
        return f"LocalStore({len(self)} entries)"

    def admit(self, buckets: Sequence[Bucket], now: float | None = None) -> Decision:
        """Check every bucket; if all pass, charge all of them, else change nothing."""
        if now is None:
            now = self._clock()
        expiry = self._expiry
        if expiry and expiry[0][0] <= now:
            self._prune(now)
        # the arithmetic of ``judge`` and ``_charge``, inlined: this runs for every request
        rates = self._rate
        quotas = self._quota
        states = []
        after = []
        for b in buckets:
            kind = b.kind
            if kind == "rate":  # rate_admit
                limit = b.limit
                period = b.period
                cost = b.cost
                step = period / limit
                tat = rates.get(b.name, now)
                start = tat if tat > now else now
                new = start + (cost if cost < limit else limit) * step
                if new - now > period + EPSILON:
                    break
                # the units left are > -1 here, so int() (truncation) is whole()
                remaining = float(int((period - (new - now)) / step + EPSILON))
                states.append(BucketState(b, remaining, new - now))
            elif kind == "quota":  # quota_admit over _committed
                entry = quotas.get(b.name)
                committed = entry[0] if entry is not None and entry[1] > now else b.seed
                new = committed + b.cost
                if new > b.limit + EPSILON:
                    break
                left = b.limit - new
                states.append(BucketState(b, left if left > 0.0 else 0.0, b.period))
            else:  # concurrent_admit over _live
                leases = self._leases.get(b.name)
                live = 0
                if leases:
                    live = len(leases)
                    # _live() only when a lease may have expired (the oldest comes first)
                    # or the count would refuse
                    if next(iter(leases.values())) <= now or live + 1 > b.limit:
                        live = self._live(b, now)
                if live + 1 > b.limit:
                    break
                new = live + 1
                states.append(BucketState(b, b.limit - new, 0.0))
            after.append(new)
        else:
            ticket = next(self._ids)
            for b, value in zip(buckets, after, strict=True):
                name = b.name
                kind = b.kind
                if kind == "rate":
                    if name not in rates:
                        heapq.heappush(expiry, (now + b.period, _RATE, name, b.period))
                    rates[name] = value
                elif kind == "quota":
                    ends = now + b.period + QUOTA_GRACE
                    if name not in quotas:
                        heapq.heappush(expiry, (ends, _QUOTA, name, b.period))
                    quotas[name] = (value, ends)
                else:
                    leases = self._leases.get(name)
                    if leases is None:
                        leases = self._leases[name] = {}
                        heapq.heappush(expiry, (now + b.period, _CONCURRENT, name, b.period))
                    leases[ticket] = now + b.period
            return Decision(True, states, None, 0.0, ticket)
        values = [self._value(b, now) for b in buckets]
        return decide(buckets, values, now)[0]

    def settle(self, decision: Decision, deltas: Sequence[float], now: float | None = None) -> None:
        """Apply ``deltas[i]`` (actual - reserved; missing ones count as 0) to
        ``decision.states[i]``'s bucket and release its leases. Once per decision; a refused
        decision holds nothing."""
        ticket = decision.ticket
        if not isinstance(ticket, int) or not decision.allowed:
            return
        decision.ticket = None
        if now is None:
            now = self._clock()
        count = len(deltas)
        for i, st in enumerate(decision.states):
            b = st.bucket
            kind = b.kind
            if kind == "concurrent":
                leases = self._leases.get(b.name)
                if leases:
                    leases.pop(ticket, None)
                continue
            delta = deltas[i] if i < count else 0.0
            if delta == 0:
                continue
            if kind == "rate":
                self._settle_rate(b, delta, now)
            else:
                self._settle_quota(b, delta, now)

    def renew(self, decisions: Sequence[Decision], now: float | None = None) -> None:
        """Push the expiry of the live leases of unsettled ``decisions`` to now + period."""
        if now is None:
            now = self._clock()
        for d in decisions:
            ticket = d.ticket
            if not isinstance(ticket, int):
                continue
            for st in d.states:
                b = st.bucket
                leases = self._leases.get(b.name) if b.kind == "concurrent" else None
                if leases and leases.get(ticket, now) > now:
                    del leases[ticket]  # re-insert at the end: keeps expiry order
                    leases[ticket] = now + b.period

    # ----------------------------------------------------------------- internals

    def _value(self, b: Bucket, now: float) -> float:
        if b.kind == "rate":
            return self._rate.get(b.name, now)
        if b.kind == "quota":
            return self._committed(b, now)
        return self._live(b, now)

    def _charge(self, b: Bucket, value: float, now: float, ticket: int) -> None:
        if b.kind == "rate":
            self._put_rate(b, value, now)
        elif b.kind == "quota":
            self._put_quota(b, value, now)
        else:
            leases = self._leases.get(b.name)
            if leases is None:
                leases = self._leases[b.name] = {}
                heapq.heappush(self._expiry, (now + b.period, _CONCURRENT, b.name, b.period))
            leases[ticket] = now + b.period

    def _put_rate(self, b: Bucket, tat: float, now: float) -> None:
        if b.name not in self._rate:
            heapq.heappush(self._expiry, (now + b.period, _RATE, b.name, b.period))
        self._rate[b.name] = tat

    def _put_quota(self, b: Bucket, committed: float, now: float) -> None:
        expiry = now + b.period + QUOTA_GRACE
        if b.name not in self._quota:
            heapq.heappush(self._expiry, (expiry, _QUOTA, b.name, b.period))
        self._quota[b.name] = (committed, expiry)

    def _settle_rate(self, b: Bucket, delta: float, now: float) -> None:
        tat = rate_settle(self._rate.get(b.name, now), now, b.limit, b.period, delta)
        if tat > now or b.name in self._rate:
            self._put_rate(b, tat, now)

    def _settle_quota(self, b: Bucket, delta: float, now: float) -> None:
        committed = quota_settle(self._committed(b, now), delta)
        self._put_quota(b, committed, now)

    def _committed(self, b: Bucket, now: float) -> float:
        entry = self._quota.get(b.name)
        return entry[0] if entry is not None and entry[1] > now else b.seed

    def _live(self, b: Bucket, now: float) -> int:
        """Live leases of a concurrent bucket, dropping expired ones (oldest first; all of
        them when the count would refuse, so a refusal is exact even after a renew)."""
        leases = self._leases.get(b.name)
        if not leases:
            return 0
        while leases:
            oldest = next(iter(leases))
            if leases[oldest] > now:
                break
            del leases[oldest]
        if len(leases) + 1 > b.limit:
            for lease in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[lease]
        return len(leases)

    def _prune(self, now: float) -> None:
        heap = self._expiry
        for _ in range(_PRUNE_PER_CALL):
            if not heap or heap[0][0] > now:
                return
            _, kind, name, period = heapq.heappop(heap)
            if kind == _RATE:
                expiry = self._rate[name]
            elif kind == _QUOTA:
                expiry = self._quota[name][1]
            else:
                expiry = max(self._leases[name].values(), default=now)
            if expiry > now:  # live: look again in a period, not at every request
                heapq.heappush(heap, (max(expiry, now + period), kind, name, period))
            elif kind == _RATE:
                del self._rate[name]
            elif kind == _QUOTA:
                del self._quota[name]
            else:
                del self._leases[name]


__all__ = [
    "CONCURRENT_RETRY",
    "EPSILON",
    "QUOTA_GRACE",
    "Bucket",
    "BucketState",
    "Decision",
    "Kind",
    "LocalStore",
    "Outcome",
    "concurrent_admit",
    "decide",
    "judge",
    "quota_admit",
    "quota_settle",
    "rate_admit",
    "rate_settle",
    "rate_state",
    "standing",
    "whole",
]
