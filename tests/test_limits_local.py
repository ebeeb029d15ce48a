"""LocalStore: the contract suite, a reference model under random interleavings, bounded memory.

Time is a number the test passes; no sockets, no sleeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from limits_contract import (
    LEASE_EXPIRY_SCENARIOS,
    SCENARIOS,
    STATE_EXPIRY_SCENARIOS,
    Scenario,
    run,
)

from openai_forward.limits import Bucket, Decision, LocalStore

ALL = SCENARIOS + LEASE_EXPIRY_SCENARIOS + STATE_EXPIRY_SCENARIOS


@pytest.mark.parametrize("scenario", ALL, ids=[s.__name__ for s in ALL])
def test_contract(scenario: Scenario) -> None:
    decisions = run(scenario, LocalStore())
    assert decisions, "the scenario never asked the store"


def test_clock_is_injectable_and_now_wins() -> None:
    clock = [1000.0]
    store = LocalStore(clock=lambda: clock[0])
    rpm = Bucket("clock|rpm", "rate", 1, 60)
    assert store.admit([rpm]).allowed
    assert not store.admit([rpm]).allowed
    clock[0] += 60
    assert store.admit([rpm]).allowed
    assert store.admit([rpm], now=1300.0).allowed  # an explicit now is used instead


def test_default_clock_is_monotonic_seconds() -> None:
    store = LocalStore()
    d = store.admit([Bucket("mono|rpm", "rate", 2, 60)])
    assert d.allowed
    assert d.states[0].reset == pytest.approx(30.0, abs=0.5)
    assert LocalStore.is_async is False


def test_settle_and_renew_of_foreign_or_empty_decisions_do_nothing() -> None:
    store = LocalStore()
    b = Bucket("foreign|cc", "concurrent", 1, 60)
    held = store.admit([b], now=1000.0)
    store.settle(Decision(True, held.states, ticket="not ours"), [0.0], now=1000.0)
    store.settle(Decision(False), [], now=1000.0)
    store.renew([Decision(True, held.states, ticket=None)], now=1000.0)
    assert not store.admit([b], now=1000.0).allowed  # the real lease is still held
    store.settle(held, [], now=1000.0)  # missing deltas count as 0; the lease is released
    assert held.ticket is None
    assert store.admit([b], now=1000.0).allowed


# --------------------------------------------------------------------------- memory


def test_memory_stays_bounded_under_a_flood_of_distinct_buckets() -> None:
    """1e5 per-IP buckets over 1000 s (100 new per second, each live for at most 60 s): the
    store holds about what is live (~6 000 plus one period of lag), never everything."""
    store = LocalStore()
    peak = 0
    now = 1000.0
    for i in range(100_000):
        now = 1000.0 + i * 0.01
        ip = f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        d = store.admit(
            [
                Bucket(ip + "|rpm", "rate", 10, 60),
                Bucket(ip + "|cc", "concurrent", 4, 60),
            ],
            now,
        )
        assert d.allowed
        if i % 2:
            store.settle(d, [0.0, 0.0], now)  # half never settle: their leases must expire
        peak = max(peak, len(store))
    assert peak <= 2 * (2 * 6000 + 100), peak  # two buckets per IP, live <= 60 s, +1 period
    assert len(store._expiry) == len(store)  # one heap item per entry held
    for step in range(1, 2000):  # later traffic on one bucket prunes the rest
        store.admit([Bucket("later|rpm", "rate", 1e9, 60)], now + 120 + step * 0.01)
    assert len(store) <= 1 + 16, len(store)


def test_quota_state_is_pruned_after_period_and_grace() -> None:
    store = LocalStore()
    for i in range(1000):
        assert store.admit([Bucket(f"q{i}|usd", "quota", 10, 100, 1)], 1000.0).allowed
    assert len(store) == 1000
    for step in range(200):
        store.admit([], 1000.0 + 100 + 86400 + 1 + step)
    assert len(store) == 0


# --------------------------------------------------------------------------- reference model

# Numbers chosen so that float arithmetic is exact in both formulations (periods of 64 s,
# power-of-two limits, times in quarter seconds): boundaries are then compared exactly.
POOL = [
    Bucket("m|rpm", "rate", 8, 64),
    Bucket("m|tpm", "rate", 256, 64),
    Bucket("m|cc", "concurrent", 1, 64),
    Bucket("m|usd", "quota", 100, 640, seed=10),
]
GRACE = 86400.0


@dataclass
class Model:
    """The semantics of issue5-common.md, written as a leaky bucket (a level of units in
    use that drains at limit/period per second) instead of a theoretical arrival time."""

    level: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (level, at)
    leases: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> id -> expiry
    committed: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (c, t)

    def rate_level(self, b: Bucket, now: float) -> float:
        level, at = self.level.get(b.name, (0.0, now))
        return max(0.0, level - (now - at) * b.limit / b.period)

    def live(self, b: Bucket, now: float) -> int:
        return sum(1 for expiry in self.leases.get(b.name, {}).values() if expiry > now)

    def spent(self, b: Bucket, now: float) -> float:
        c, written = self.committed.get(b.name, (b.seed, -math.inf))
        return c if now < written + b.period + GRACE else b.seed

    def check(self, b: Bucket, now: float) -> tuple[bool, float, float, float]:
        """(allowed, remaining, reset, retry_after) of this bucket alone."""
        if b.kind == "rate":
            level = self.rate_level(b, now)
            need = level + min(b.cost, b.limit)
            per_unit = b.period / b.limit
            if need <= b.limit:
                return True, max(0, math.floor(b.limit - need + 1e-9)), need * per_unit, 0.0
            wait = (need - b.limit) * per_unit
            return False, max(0, math.floor(b.limit - level + 1e-9)), level * per_unit, wait
        if b.kind == "concurrent":
            n = self.live(b, now)
            return (True, b.limit - n - 1, 0.0, 0.0) if n < b.limit else (False, 0, 0.0, 1.0)
        c = self.spent(b, now)
        if c + b.cost <= b.limit:
            return True, b.limit - c - b.cost, b.period, 0.0
        return False, max(0.0, b.limit - c), b.period, b.period

    def admit(self, buckets: list[Bucket], now: float, lease: int) -> Decision:
        checks = [self.check(b, now) for b in buckets]
        if not all(c[0] for c in checks):
            states = []
            for b, c in zip(buckets, checks, strict=True):
                if c[0]:
                    c = self.as_is(b, now)
                states.append((b, c[1], c[2]))
            refused = next(b for b, c in zip(buckets, checks, strict=True) if not c[0])
            wait = max(c[3] for c in checks if not c[0])
            return _decision(False, states, refused, wait)
        for b in buckets:
            if b.kind == "rate":
                self.level[b.name] = (self.rate_level(b, now) + min(b.cost, b.limit), now)
            elif b.kind == "concurrent":
                self.leases.setdefault(b.name, {})[lease] = now + b.period
            else:
                self.committed[b.name] = (self.spent(b, now) + b.cost, now)
        return _decision(True, [(b, c[1], c[2]) for b, c in zip(buckets, checks, strict=True)])

    def as_is(self, b: Bucket, now: float) -> tuple[bool, float, float, float]:
        if b.kind == "rate":
            level = self.rate_level(b, now)
            per_unit = b.period / b.limit
            return True, max(0, math.floor(b.limit - level + 1e-9)), level * per_unit, 0.0
        if b.kind == "concurrent":
            return True, b.limit - self.live(b, now), 0.0, 0.0
        return True, max(0.0, b.limit - self.spent(b, now)), b.period, 0.0

    def settle(self, buckets: list[Bucket], deltas: list[float], now: float, lease: int) -> None:
        for b, delta in zip(buckets, deltas, strict=True):
            if b.kind == "rate":
                self.level[b.name] = (max(0.0, self.rate_level(b, now) + delta), now)
            elif b.kind == "concurrent":
                self.leases.get(b.name, {}).pop(lease, None)
            elif delta:
                self.committed[b.name] = (max(0.0, self.spent(b, now) + delta), now)

    def renew(self, buckets: list[Bucket], now: float, lease: int) -> None:
        for b in buckets:
            leases = self.leases.get(b.name, {})
            if b.kind == "concurrent" and leases.get(lease, now) > now:
                leases[lease] = now + b.period


def _decision(
    allowed: bool,
    states: list[tuple[Bucket, float, float]],
    refused: Bucket | None = None,
    wait: float = 0.0,
) -> Decision:
    from openai_forward.limits import BucketState

    return Decision(allowed, [BucketState(b, r, s) for b, r, s in states], refused, wait)


def same(got: Decision, want: Decision) -> None:
    assert got.allowed == want.allowed, (got, want)
    assert got.refused == want.refused, (got, want)
    assert got.retry_after == pytest.approx(want.retry_after, abs=1e-9), (got, want)
    assert [s.bucket for s in got.states] == [s.bucket for s in want.states]
    for g, w in zip(got.states, want.states, strict=True):
        assert g.remaining == pytest.approx(w.remaining, abs=1e-9), (got, want)
        assert g.reset == pytest.approx(w.reset, abs=1e-9), (got, want)


@dataclass
class Held:
    decision: Decision
    buckets: list[Bucket]
    lease: int
    settled: bool = False


def _with_cost(b: Bucket, draw: Callable[[st.SearchStrategy[int]], int]) -> Bucket:
    if b.name == "m|tpm":
        return Bucket(b.name, b.kind, b.limit, b.period, float(draw(st.integers(1, 300))))
    if b.kind == "quota":
        return Bucket(b.name, b.kind, b.limit, b.period, float(draw(st.integers(0, 60))), b.seed)
    return b


class LocalStoreMachine(RuleBasedStateMachine):
    """LocalStore and the model see the same admits, settles, renews and clock steps."""

    @initialize()
    def start(self) -> None:
        self.store = LocalStore(clock=lambda: self.now)
        self.model = Model()
        self.now = 1000.0
        self.held: list[Held] = []

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 8.0, 16.0, 32.0, 48.0, 64.0, 640.0, GRACE + 640.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(data=st.data(), picks=st.lists(st.sampled_from(range(len(POOL))), unique=True))
    def admit(self, data: st.DataObject, picks: list[int]) -> None:
        buckets = [_with_cost(POOL[i], data.draw) for i in picks]
        lease = len(self.held) + 1
        got = self.store.admit(buckets)
        same(got, self.model.admit(buckets, self.now, lease))
        if got.allowed:
            self.held.append(Held(got, buckets, lease))

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        if not self.held:
            return
        h = data.draw(st.sampled_from(self.held))
        deltas = [float(data.draw(st.integers(-int(b.cost) - 80, 40))) for b in h.buckets]
        self.store.settle(h.decision, deltas)
        if not h.settled:
            self.model.settle(h.buckets, deltas, self.now, h.lease)
            h.settled = True

    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        if not self.held:
            return
        chosen = data.draw(st.lists(st.sampled_from(self.held), max_size=3))
        self.store.renew([h.decision for h in chosen])
        for h in chosen:
            if not h.settled:
                self.model.renew(h.buckets, self.now, h.lease)

    @invariant()
    def every_bucket_reads_the_same(self) -> None:
        if not hasattr(self, "store"):
            return
        probe = self.model.as_is
        for b in POOL:
            expected = probe(b, self.now)
            got = self.store._value(b, self.now)
            if b.kind == "concurrent":
                assert got == self.model.live(b, self.now)
            elif b.kind == "quota":
                assert got == pytest.approx(self.model.spent(b, self.now), abs=1e-9)
            else:
                assert max(got, self.now) - self.now == pytest.approx(expected[2], abs=1e-9)


LocalStoreMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_local_store_matches_reference_model = LocalStoreMachine.TestCase
