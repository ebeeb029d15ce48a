"""The contract every limit store keeps: scenarios run against LocalStore, SharedStore, RedisStore.

Not collected by itself (no ``test_`` prefix). A store's test module parametrises over
``SCENARIOS`` (and the optional lists below) and passes each scenario a ``Harness``: an object
with sync ``admit``/``settle``/``renew`` that always receive an explicit ``now`` (an injected
clock, base 1000.0 so that TTL arithmetic stays positive). The sync stores are their own
harness; an async store wraps its calls in one event loop.

Each scenario expects a store holding no state for the bucket names it uses (names are
prefixed by the scenario, so one fresh store per scenario, or one flushed between scenarios,
both work). Expected values are written out by hand from the semantics in
/work/spec/issue5-common.md, never computed by library code.

Lists:
    SCENARIOS               every store.
    LEASE_EXPIRY_SCENARIOS  stores whose concurrent leases expire after ``period`` seconds
                            without renew, by the injected clock (LocalStore, RedisStore;
                            SharedStore keeps per-worker counts cleaned on worker death).
    STATE_EXPIRY_SCENARIOS  stores that forget quota state ``period + 86400`` s after the last
                            write by the injected clock (LocalStore, SharedStore; Redis uses
                            PEXPIRE on its own clock).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from openai_forward.limits import Bucket, Decision

T0 = 1000.0
TOL = 1e-6


class Harness(Protocol):
    def admit(self, buckets: Sequence[Bucket], now: float) -> Decision: ...

    def settle(self, decision: Decision, deltas: Sequence[float], now: float) -> None: ...

    def renew(self, decisions: Sequence[Decision], now: float) -> None: ...


Scenario = Callable[[Harness], None]


class Recording:
    """A harness in front of a store that keeps every decision the scenario got, so a test
    can show the scenario really ran against the store (its own asserts judge the answers)."""

    def __init__(self, store: Harness) -> None:
        self.store = store
        self.decisions: list[Decision] = []

    def admit(self, buckets: Sequence[Bucket], now: float) -> Decision:
        decision = self.store.admit(buckets, now)
        self.decisions.append(decision)
        return decision

    def settle(self, decision: Decision, deltas: Sequence[float], now: float) -> None:
        self.store.settle(decision, deltas, now)

    def renew(self, decisions: Sequence[Decision], now: float) -> None:
        self.store.renew(decisions, now)


def run(scenario: Scenario, store: Harness) -> list[Decision]:
    """Run ``scenario`` against ``store``; the decisions it was given, in order."""
    recording = Recording(store)
    scenario(recording)
    return recording.decisions


def rate(name: str, limit: float, period: float = 60.0, cost: float = 1.0) -> Bucket:
    return Bucket(name, "rate", limit, period, cost)


def quota(
    name: str, limit: float, period: float = 3600.0, cost: float = 1.0, seed: float = 0.0
) -> Bucket:
    return Bucket(name, "quota", limit, period, cost, seed)


def conc(name: str, limit: float, period: float = 600.0) -> Bucket:
    return Bucket(name, "concurrent", limit, period)


def close(actual: float, expected: float, what: str = "") -> None:
    assert math.isclose(actual, expected, rel_tol=0, abs_tol=TOL), (
        f"{what}: expected {expected!r}, got {actual!r}"
    )


def allowed(h: Harness, buckets: Sequence[Bucket], now: float) -> Decision:
    d = h.admit(buckets, now)
    assert d.allowed, f"expected {[b.name for b in buckets]} allowed at {now}: {d}"
    assert d.refused is None
    close(d.retry_after, 0.0, "retry_after of an allowed decision")
    assert [s.bucket for s in d.states] == list(buckets)
    return d


def refused(h: Harness, buckets: Sequence[Bucket], now: float, by: Bucket) -> Decision:
    d = h.admit(buckets, now)
    assert not d.allowed, f"expected {[b.name for b in buckets]} refused at {now}: {d}"
    assert d.refused == by, f"expected refused by {by.name}, got {d.refused}"
    assert [s.bucket for s in d.states] == list(buckets)
    return d


def state(d: Decision, i: int, remaining: float, reset: float) -> None:
    close(d.states[i].remaining, remaining, f"{d.states[i].bucket.name} remaining")
    close(d.states[i].reset, reset, f"{d.states[i].bucket.name} reset")


# --------------------------------------------------------------------------- rate


def rate_rpm10_admits_exactly_10_of_50_at_one_instant(h: Harness) -> None:
    """rpm 10: of 50 requests at one instant exactly the first 10 pass; the 11th is told to
    retry after 6 s; nothing passes at +5.999 s, exactly one passes at +6 s."""
    b = rate("rate-exact|rpm", 10)
    results = [h.admit([b], T0).allowed for _ in range(50)]
    assert results == [True] * 10 + [False] * 40
    d = refused(h, [b], T0, by=b)
    close(d.retry_after, 6.0, "retry_after")
    refused(h, [b], T0 + 5.999, by=b)
    allowed(h, [b], T0 + 6.0)
    d = refused(h, [b], T0 + 6.0, by=b)
    close(d.retry_after, 6.0, "retry_after after the sixth second")


def rate_remaining_and_reset(h: Harness) -> None:
    """rate states: remaining = whole requests left, reset = seconds until the bucket is full;
    a refusal reports the current values without charging."""
    b = rate("rate-rr|rpm", 10)
    state(allowed(h, [b], T0), 0, remaining=9, reset=6)
    state(allowed(h, [b], T0), 0, remaining=8, reset=12)
    for _ in range(8):
        d = allowed(h, [b], T0)
    state(d, 0, remaining=0, reset=60)
    d = refused(h, [b], T0, by=b)
    state(d, 0, remaining=0, reset=60)
    close(d.retry_after, 6.0, "retry_after")
    # 30 s later five have leaked out: this one leaves 4.
    state(allowed(h, [b], T0 + 30), 0, remaining=4, reset=36)
    # A period that is not a multiple of the limit: T = 1/3 s.
    c = rate("rate-rr|rps3", 3, period=1.0)
    state(allowed(h, [c], T0), 0, remaining=2, reset=1 / 3)
    state(allowed(h, [c], T0), 0, remaining=1, reset=2 / 3)
    state(allowed(h, [c], T0), 0, remaining=0, reset=1.0)
    d = refused(h, [c], T0, by=c)
    close(d.retry_after, 1 / 3, "retry_after rps3")
    allowed(h, [c], T0 + 1 / 3)


def rate_weighted_reserve_refund_and_charge(h: Harness) -> None:
    """Token rate (tpm 1000): reserve 600, refund 400 at settle (delta -400), reserve 600
    again, then charge 300 more than reserved (delta +300): each changes what is left."""
    name = "rate-tpm|tpm"
    r600 = rate(name, 1000, cost=600)
    d1 = allowed(h, [r600], T0)
    state(d1, 0, remaining=400, reset=36)
    d = refused(h, [r600], T0, by=r600)
    state(d, 0, remaining=400, reset=36)
    close(d.retry_after, 12.0, "retry_after tpm")
    h.settle(d1, [-400.0], T0)  # actual usage 200
    d2 = allowed(h, [r600], T0)
    state(d2, 0, remaining=200, reset=48)
    h.settle(d2, [300.0], T0)  # actual usage 900 (tat now 1066)
    one = rate(name, 1000, cost=1)
    d = refused(h, [one], T0, by=one)
    state(d, 0, remaining=0, reset=66)
    close(d.retry_after, 6.06, "retry_after after the overcharge")
    allowed(h, [one], T0 + 6.06)


def rate_refund_never_fills_beyond_full(h: Harness) -> None:
    """A refund larger than what is still in the bucket leaves it exactly full, not fuller:
    a later overcharge then counts in full. A second settle of a decision does nothing."""
    name = "rate-full|tpm"
    d1 = allowed(h, [rate(name, 1000, cost=600)], T0)  # tat 1036
    d2 = allowed(h, [rate(name, 1000, cost=300)], T0 + 10)  # tat 1054
    h.settle(d1, [-500.0], T0 + 50)  # used 100: tat 1024, clamped to now (1050)
    h.settle(d2, [500.0], T0 + 50)  # used 800: tat 1080
    h.settle(d1, [-500.0], T0 + 50)  # second settle: nothing
    h.settle(d2, [500.0], T0 + 50)  # second settle: nothing
    one = rate(name, 1000, cost=1)
    state(allowed(h, [one], T0 + 50), 0, remaining=499, reset=30.06)
    many = rate(name, 1000, cost=500)
    d = refused(h, [many], T0 + 50, by=many)
    state(d, 0, remaining=499, reset=30.06)
    close(d.retry_after, 0.06, "retry_after")


def rate_late_overcharge_counts_from_now(h: Harness) -> None:
    """A tat in the past means a full bucket, exactly like no state (stores prune it), so a
    settle applies its delta from max(tat, now): an overcharge reported after the bucket
    refilled is charged now, not absorbed by the time that passed."""
    name = "rate-late|tpm"
    d = allowed(h, [rate(name, 1000, cost=100)], T0)  # tat 1006
    h.settle(d, [500.0], T0 + 50)  # used 600; tat = max(1006, 1050) + 30 = 1080
    one = rate(name, 1000, cost=1)
    state(allowed(h, [one], T0 + 50), 0, remaining=499, reset=30.06)
    absent = allowed(h, [rate("rate-late|absent", 1000, cost=100)], T0)
    h.settle(absent, [500.0], T0 + 100)  # state long expired: the same from now
    other = rate("rate-late|absent", 1000, cost=1)
    state(allowed(h, [other], T0 + 100), 0, remaining=499, reset=30.06)


def rate_cost_above_limit_waits_for_a_full_bucket(h: Harness) -> None:
    """A request costing more than the whole bucket is charged the whole bucket: it passes
    when the bucket is full and waits (not refused forever) otherwise."""
    big = rate("rate-big|tpm", 100, cost=500)
    state(allowed(h, [big], T0), 0, remaining=0, reset=60)
    d = refused(h, [big], T0 + 30, by=big)
    close(d.retry_after, 30.0, "retry_after oversized")
    refused(h, [big], T0 + 59.999, by=big)
    allowed(h, [big], T0 + 60)


def rate_window_edge_bound(h: Harness) -> None:
    """No boundary burst. GCRA bound: for admitted unit requests t_1 <= ... <= t_n inside any
    closed window of length W, tat_n >= t_1 + n*T and tat_n <= t_n + P, so
    n <= (W + P) / T = L * (1 + W / P). At one instant at most L pass (a fixed window lets 2L
    through around its edge), and the bound is reached under constant overload."""
    limit, period = 10, 60.0
    tick = period / limit
    b = rate("rate-edge|rpm", limit, period)
    rng = random.Random(5)
    times = [T0 + rng.uniform(0, 300) for _ in range(400)]
    for edge in (60.0, 120.0, 180.0, 240.0):  # bursts on both sides of each minute boundary
        times += [T0 + edge - 0.001] * 12 + [T0 + edge] * 12
    times.sort()
    passed = [t for t in times if h.admit([b], t).allowed]
    for width in (0.0, 0.002, 1.0, 6.0, 30.0, 60.0, 120.0):
        bound = math.floor(limit * (1 + width / period) + 1e-9)
        worst = max(sum(1 for t in passed if a <= t <= a + width + 1e-9) for a in passed)
        assert worst <= bound, f"{worst} admitted within {width} s, bound {bound}"
    assert len(passed) <= math.floor(limit * (1 + (passed[-1] - passed[0]) / period) + 1e-9)
    assert len(passed) >= 50, f"only {len(passed)} passed: the schedule does not stress"
    # Saturated (an arrival every T/2 for 177 s): the first 19 pass (the burst drains while
    # filling), then every second one; 39 = floor(L * (1 + 174 / P)) with 174 s between the
    # first and last pass, so the bound is reached, not just respected.
    c = rate("rate-edge|steady", limit, period)
    got = [h.admit([c], T0 + k * tick / 2).allowed for k in range(60)]
    assert got == [True] * 19 + [False, True] * 20 + [False], got


# --------------------------------------------------------------------------- concurrent


def concurrent_limit_release_and_double_settle(h: Harness) -> None:
    """concurrent 2: a third is refused (retry hint 1 s); settle releases one lease; settling
    the same decision again releases nothing; settling a refused decision does nothing."""
    c = conc("conc|inflight", 2)
    a = allowed(h, [c], T0)
    state(a, 0, remaining=1, reset=0)
    b = allowed(h, [c], T0)
    state(b, 0, remaining=0, reset=0)
    r = refused(h, [c], T0, by=c)
    state(r, 0, remaining=0, reset=0)
    close(r.retry_after, 1.0, "retry_after concurrent")
    h.settle(r, [0.0], T0)  # a refused decision holds no lease
    refused(h, [c], T0, by=c)
    h.settle(a, [0.0], T0 + 1)
    d = allowed(h, [c], T0 + 1)
    state(d, 0, remaining=0, reset=0)
    h.settle(a, [0.0], T0 + 2)  # already settled: must not free d's or b's lease
    refused(h, [c], T0 + 2, by=c)
    h.settle(b, [0.0], T0 + 3)
    h.settle(d, [0.0], T0 + 3)
    state(allowed(h, [c], T0 + 3), 0, remaining=1, reset=0)
    state(allowed(h, [c], T0 + 3), 0, remaining=0, reset=0)


def concurrent_renew_keeps_leases_live(h: Harness) -> None:
    """renew of live leases is accepted at any time and never frees or adds a lease."""
    c = conc("conc-renew|inflight", 1, period=600)
    d = allowed(h, [c], T0)
    h.renew([d], T0 + 100)
    h.renew([d, d], T0 + 200)
    refused(h, [c], T0 + 300, by=c)
    r = refused(h, [c], T0 + 300, by=c)
    h.renew([r], T0 + 300)  # a refused decision: nothing to renew
    h.settle(d, [0.0], T0 + 400)
    h.renew([d], T0 + 401)  # settled: renew must not bring the lease back
    allowed(h, [c], T0 + 402)


# --------------------------------------------------------------------------- quota


def quota_commit_refuse_and_settle_to_actual(h: Harness) -> None:
    """quota 100: a reservation commits its cost; what does not fit is refused with
    retry_after = period; settle corrects the commitment to the actual spend (over the limit
    if the spend was), never below 0; a second settle does nothing."""
    name = "quota|usd"
    q30 = quota(name, 100, cost=30)
    d1 = allowed(h, [q30], T0)
    state(d1, 0, remaining=70, reset=3600)
    q80 = quota(name, 100, cost=80)
    r = refused(h, [q80], T0, by=q80)
    state(r, 0, remaining=70, reset=3600)
    close(r.retry_after, 3600.0, "retry_after quota")
    h.settle(r, [-50.0], T0)  # refused: nothing
    h.settle(d1, [-10.0], T0)  # actual 20
    h.settle(d1, [-10.0], T0)  # twice: nothing
    d2 = allowed(h, [q80], T0 + 1)
    state(d2, 0, remaining=0, reset=3600)
    h.settle(d2, [5.0], T0 + 2)  # actual 85: committed 105, over the limit
    zero = quota(name, 100, cost=0)
    r = refused(h, [zero], T0 + 3, by=zero)
    state(r, 0, remaining=0, reset=3600)
    h.settle(d2, [-1000.0], T0 + 4)  # already settled: nothing
    refused(h, [zero], T0 + 5, by=zero)
    d3 = allowed(h, [quota(name, 1000, cost=0)], T0 + 6)  # the limit is the caller's
    state(d3, 0, remaining=895, reset=3600)
    h.settle(d3, [-1000.0], T0 + 7)  # refund beyond zero: committed stops at 0
    state(allowed(h, [quota(name, 100, cost=100)], T0 + 8), 0, remaining=0, reset=3600)


def quota_seed_applies_only_when_absent(h: Harness) -> None:
    """A quota with no state starts from its seed (spend already recorded elsewhere); once
    state exists the seed is ignored."""
    s90 = quota("quota-seed|usd", 100, cost=5, seed=90)
    state(allowed(h, [s90], T0), 0, remaining=5, reset=3600)
    s0 = quota("quota-seed|usd", 100, cost=5, seed=0)
    state(allowed(h, [s0], T0), 0, remaining=0, reset=3600)
    refused(h, [quota("quota-seed|usd", 100, cost=1)], T0, by=quota("quota-seed|usd", 100))
    over = quota("quota-seed|over", 100, cost=0, seed=150)
    d = refused(h, [over], T0, by=over)
    state(d, 0, remaining=0, reset=3600)
    fresh = quota("quota-seed|fresh", 100, cost=100, seed=0.5)
    refused(h, [fresh], T0, by=fresh)


# --------------------------------------------------------------------------- several buckets


def all_or_nothing(h: Harness) -> None:
    """One refusing bucket leaves every other bucket of the call unchanged; the states of a
    refused decision show the current values; `refused` is the first refusing bucket in the
    order given and retry_after the largest over the refusing ones."""
    r = rate("aon|rpm", 3)
    q = quota("aon|usd", 10, cost=1)
    c = conc("aon|inflight", 1)
    first = allowed(h, [r, q, c], T0)
    state(first, 0, remaining=2, reset=20)
    state(first, 1, remaining=9, reset=3600)
    state(first, 2, remaining=0, reset=0)
    for _ in range(4):
        d = refused(h, [r, q, c], T0, by=c)
        state(d, 0, remaining=2, reset=20)
        state(d, 1, remaining=9, reset=3600)
        state(d, 2, remaining=0, reset=0)
        close(d.retry_after, 1.0, "retry_after by the concurrent bucket")
    h.settle(first, [0.0, 0.0, 0.0], T0)
    state(allowed(h, [r, q], T0), 0, remaining=1, reset=40)
    state(allowed(h, [r, q], T0), 1, remaining=7, reset=3600)
    d = refused(h, [r, q], T0, by=r)
    state(d, 1, remaining=7, reset=3600)
    # Two refusing buckets: the first in order is named, the longest wait is given.
    q_full = quota("aon|usd", 10, cost=8)
    d = refused(h, [q_full, r], T0, by=q_full)
    close(d.retry_after, 3600.0, "retry_after = max over refusing")
    d = refused(h, [r, q_full], T0, by=r)
    close(d.retry_after, 3600.0, "retry_after = max over refusing")
    # Nothing above was charged: the quota still holds 7, the rate frees one at +20 s.
    state(allowed(h, [quota("aon|usd", 10, cost=7)], T0), 0, remaining=0, reset=3600)
    allowed(h, [r], T0 + 20)
    d = allowed(h, [], T0)
    assert d.states == []


def settle_applies_each_delta_to_its_bucket(h: Harness) -> None:
    """deltas[i] belongs to states[i]: a refund on the token rate and a charge on the quota
    of one decision land on the right buckets."""
    r = rate("deltas|tpm", 100, cost=50)
    q = quota("deltas|usd", 100, cost=50)
    d = allowed(h, [r, q], T0)
    h.settle(d, [-40.0, 30.0], T0)  # rate used 10, quota spent 80
    state(allowed(h, [rate("deltas|tpm", 100, cost=90)], T0), 0, remaining=0, reset=60)
    state(allowed(h, [quota("deltas|usd", 100, cost=20)], T0), 0, remaining=0, reset=3600)


def bucket_names_are_independent(h: Harness) -> None:
    """State belongs to the exact name: similar names (prefix, case, suffix) are distinct."""
    names = ["ind|rpm|*", "ind|rpm|*2", "IND|rpm|*", "ind|rpm", "ind|rpm|* ", "ind|rpm|é"]
    for n in names:
        allowed(h, [rate(n, 1)], T0)
    for n in names:
        refused(h, [rate(n, 1)], T0, by=rate(n, 1))
    allowed(h, [quota("ind|q", 1)], T0)
    allowed(h, [quota("ind|q2", 1)], T0)


def many_distinct_buckets(h: Harness) -> None:
    """A thousand distinct buckets (per-IP limits) each get their own state."""
    buckets = [rate(f"many|ip:10.0.{i // 256}.{i % 256}|rpm", 1) for i in range(1000)]
    for b in buckets:
        allowed(h, [b], T0)
    for b in buckets[::7]:
        refused(h, [b], T0 + 1, by=b)
    for b in buckets[::7]:
        allowed(h, [b], T0 + 60)


# --------------------------------------------------------------------------- expiry


def concurrent_lease_expires_without_renew(h: Harness) -> None:
    """A lease not renewed for `period` seconds is forgotten (a crashed request cannot hold
    its slot forever); renew pushes the expiry to now + period."""
    c = conc("lease|inflight", 1, period=10)
    d = allowed(h, [c], T0)
    refused(h, [c], T0 + 5, by=c)
    h.renew([d], T0 + 8)  # now live until T0 + 18
    refused(h, [c], T0 + 17, by=c)
    e = allowed(h, [c], T0 + 18.5)
    h.settle(d, [0.0], T0 + 19)  # d expired: settling it must not free e's lease
    refused(h, [c], T0 + 19, by=c)
    h.settle(e, [0.0], T0 + 20)
    allowed(h, [c], T0 + 20)


def quota_state_expires_after_period_and_a_day(h: Harness) -> None:
    """Quota state is forgotten `period + 86400` s after its last write; then the seed applies
    again (the caller passes the new period's spend)."""
    q = quota("qexp|usd", 100, period=100, cost=60, seed=10)
    allowed(h, [q], T0)
    refused(h, [q], T0 + 100 + 86400 - 1, by=q)
    state(allowed(h, [q], T0 + 100 + 86400 + 1), 0, remaining=30, reset=100)


SCENARIOS: list[Scenario] = [
    rate_rpm10_admits_exactly_10_of_50_at_one_instant,
    rate_remaining_and_reset,
    rate_weighted_reserve_refund_and_charge,
    rate_refund_never_fills_beyond_full,
    rate_late_overcharge_counts_from_now,
    rate_cost_above_limit_waits_for_a_full_bucket,
    rate_window_edge_bound,
    concurrent_limit_release_and_double_settle,
    concurrent_renew_keeps_leases_live,
    quota_commit_refuse_and_settle_to_actual,
    quota_seed_applies_only_when_absent,
    all_or_nothing,
    settle_applies_each_delta_to_its_bucket,
    bucket_names_are_independent,
    many_distinct_buckets,
]

LEASE_EXPIRY_SCENARIOS: list[Scenario] = [concurrent_lease_expires_without_renew]

STATE_EXPIRY_SCENARIOS: list[Scenario] = [quota_state_expires_after_period_and_a_day]
