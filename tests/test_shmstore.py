"""SharedStore: the contract suite, exact limits across real forked processes, worker death,
a full table, and the table's no-duplicate invariant.

Processes are forked (as the supervisor does); every wait is bounded and every child is
killed by its PID in cleanup.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess as Process
from multiprocessing.synchronize import Barrier

import pytest
from limits_contract import SCENARIOS, STATE_EXPIRY_SCENARIOS, Scenario, run

from openai_forward.limits import Bucket, Decision, LocalStore
from openai_forward.shmstore import MAX_PROBE, SharedStore, bucket_key

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")

ALL = SCENARIOS + STATE_EXPIRY_SCENARIOS
T0 = 1000.0
JOIN = 20.0  # seconds any child may take


@pytest.fixture
def store() -> Iterator[SharedStore]:
    s = SharedStore(slots=4096, workers=4)
    yield s
    s.close()


@pytest.mark.parametrize("scenario", ALL, ids=[s.__name__ for s in ALL])
def test_contract(scenario: Scenario, store: SharedStore) -> None:
    assert run(scenario, store), "the scenario never asked the store"


@pytest.mark.parametrize("scenario", ALL, ids=[s.__name__ for s in ALL])
def test_contract_as_another_worker(scenario: Scenario, store: SharedStore) -> None:
    store.attach(3)  # the last column: offsets of every column are right
    assert run(scenario, store), "the scenario never asked the store"


# --------------------------------------------------------------------------- processes


def _fork_context() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


class Children:
    """Forked workers, each running ``target(index)``; killed by PID if still alive."""

    def __init__(self) -> None:
        self.procs: list[Process] = []

    def start(
        self, target: Callable[[int], None], index: int
    ) -> multiprocessing.process.BaseProcess:
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a process with threads; the gateway's
            # supervisor forks too, and these children only touch the store.
            warnings.simplefilter("ignore", DeprecationWarning)
            proc = _fork_context().Process(target=target, args=(index,), daemon=True)
            proc.start()
        self.procs.append(proc)
        return proc

    def join(self) -> list[int | None]:
        for proc in self.procs:
            proc.join(JOIN)
        return [proc.exitcode for proc in self.procs]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(JOIN)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.kill_all()


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize(("limit", "each"), [(10, 50), (1000, 2000)])
def test_workers_released_together_admit_exactly_the_limit(
    workers: int, limit: int, each: int, children: Children
) -> None:
    """rpm 10 (and 1000, with enough traffic that the workers' calls truly interleave),
    each worker sending at one instant after a barrier: exactly the limit passes in total."""
    shared = SharedStore(slots=1024, workers=workers)
    ctx = _fork_context()
    barrier: Barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    rpm = Bucket("proc|rpm", "rate", limit, 60)
    tpm = Bucket("proc|tpm", "rate", 1e9, 60, cost=7)

    def work(index: int) -> None:
        shared.attach(index)
        barrier.wait(JOIN)
        results.put(sum(shared.admit([tpm, rpm], T0).allowed for _ in range(each)))

    for i in range(workers):
        children.start(work, i)
    counts = [results.get(timeout=JOIN) for _ in range(workers)]
    assert children.join() == [0] * workers
    assert sum(counts) == limit, counts
    tick = 60 / limit
    assert not shared.admit([rpm], T0 + tick - 0.001).allowed
    assert shared.admit([rpm], T0 + tick).allowed
    # the token bucket was charged exactly once per admitted request (all or nothing)
    state = shared.admit([Bucket("proc|tpm", "rate", 1e9, 60, cost=0)], T0).states[0]
    assert state.reset == pytest.approx(limit * 7 * 60 / 1e9, rel=1e-6)
    shared.close()


def test_workers_share_the_machine_clock(children: Children) -> None:
    """With no injected time every process reads CLOCK_MONOTONIC: 3 per hour is 3 in total
    across processes, and the parent sees the children's charges."""
    shared = SharedStore(slots=1024, workers=3)
    ctx = _fork_context()
    barrier: Barrier = ctx.Barrier(2)
    results = ctx.Queue()
    rph = Bucket("clock|rph", "rate", 3, 3600)

    def work(index: int) -> None:
        shared.attach(index)
        barrier.wait(JOIN)
        results.put(sum(shared.admit([rph]).allowed for _ in range(5)))

    children.start(work, 1)
    children.start(work, 2)
    counts = [results.get(timeout=JOIN), results.get(timeout=JOIN)]
    assert children.join() == [0, 0]
    assert sum(counts) == 3
    d = shared.admit([rph])
    assert not d.allowed
    assert 1200 - 60 < d.retry_after <= 1200  # T = 1200 s; the first passed moments ago
    shared.close()


def test_dead_worker_leases_are_freed_by_reset_worker(children: Children) -> None:
    """A worker killed (SIGKILL) while holding leases keeps them counted until the
    supervisor calls reset_worker(index); then they are free, and the others' stay."""
    shared = SharedStore(slots=1024, workers=3)
    ctx = _fork_context()
    held = ctx.Event()
    never = ctx.Event()
    cc = Bucket("dead|cc", "concurrent", 3, 600)

    def work(index: int) -> None:
        shared.attach(index)
        assert all(shared.admit([cc], T0).allowed for _ in range(2))
        held.set()
        never.wait(JOIN)  # holds its leases until killed

    shared.attach(0)
    mine = shared.admit([cc], T0)
    assert mine.allowed
    proc = children.start(work, 2)
    assert held.wait(JOIN)
    assert not shared.admit([cc], T0).allowed
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(JOIN)
    assert proc.exitcode == -signal.SIGKILL
    assert not shared.admit([cc], T0).allowed  # dead, but not yet cleaned up
    shared.reset_worker(2)
    a = shared.admit([cc], T0)
    b = shared.admit([cc], T0)
    assert a.allowed and b.allowed
    assert a.states[0].remaining == 1 and b.states[0].remaining == 0
    assert not shared.admit([cc], T0).allowed  # worker 0's own lease survived the reset
    shared.settle(mine, [0.0], T0)
    assert shared.admit([cc], T0).allowed
    shared.close()


def test_lock_holder_killed_does_not_deadlock_the_others(children: Children) -> None:
    """The lock is a POSIX record lock: the kernel drops it when its holder dies, so a
    worker killed inside admit does not stop the others."""
    shared = SharedStore(slots=1024, workers=2)
    ctx = _fork_context()
    locked = ctx.Event()
    never = ctx.Event()

    def hold_the_lock(index: int) -> None:
        shared.attach(index)
        shared._acquire()
        locked.set()
        never.wait(JOIN)

    proc = children.start(hold_the_lock, 1)
    assert locked.wait(JOIN)
    done = threading.Event()
    answers = []

    def admit() -> None:
        answers.append(shared.admit([Bucket("lock|rpm", "rate", 1, 60)], T0).allowed)
        done.set()

    waiter = threading.Thread(target=admit, daemon=True)
    waiter.start()
    assert not done.wait(0.3), "admit did not wait for the lock holder"
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    assert done.wait(JOIN), "admit still blocked after the lock holder died"
    waiter.join(JOIN)
    assert answers == [True]
    shared.close()


# --------------------------------------------------------------------------- the table


def test_full_table_fails_open_and_counts_it() -> None:
    """No reusable slot for a new bucket: the request is judged as if the bucket were empty
    and passes, nothing is stored, full_events counts it, settle ignores it; buckets already
    in the table keep exact counts, and expired slots are reused."""
    shared = SharedStore(slots=8, workers=1)
    held = [Bucket(f"full|{i}|rpm", "rate", 1, 60) for i in range(7)]
    usd = Bucket("full|usd", "quota", 100, 3600)
    for b in [*held, usd]:
        assert shared.admit([b], T0).allowed
    assert shared.live(T0) == 8
    extra = Bucket("full|extra|rpm", "rate", 1, 60)
    for n in range(1, 4):
        d = shared.admit([extra], T0)
        assert d.allowed
        assert d.states[0].remaining == 0
        assert shared.full_events == n
        shared.settle(d, [5.0], T0)
    assert all(not shared.admit([b], T0).allowed for b in held)
    cc = Bucket("full|cc", "concurrent", 1, 60)
    a = shared.admit([cc, usd], T0 + 1)  # no slot for cc; usd is in the table: charged
    assert a.allowed
    assert shared.full_events == 4
    assert a.states[1].remaining == 98
    shared.settle(a, [0.0, -1.0], T0 + 1)  # cc: nothing to settle; usd: refund applies
    assert shared.admit([usd], T0 + 2).states[0].remaining == 98
    assert shared.live(T0) == 8
    # The rate buckets expired at T0 + 60: their slots are reused, exact again.
    assert shared.admit([extra], T0 + 61).allowed
    assert not shared.admit([extra], T0 + 61).allowed
    assert shared.full_events == 4
    shared.close()


def test_full_table_does_not_pass_what_an_empty_bucket_refuses() -> None:
    shared = SharedStore(slots=1, workers=1)
    assert shared.admit([Bucket("one|rpm", "rate", 1, 60)], T0).allowed
    spent = Bucket("over|usd", "quota", 10, 3600, cost=1, seed=10)
    assert not shared.admit([spent], T0).allowed  # the seed alone is over the limit
    shared.close()


def _table(shared: SharedStore) -> list[tuple[int, int]]:
    """(slot index, key) of every used slot, read from the shared memory."""
    header = struct.unpack_from("<8sQQQQ", shared._mm, 0)
    slots, size = header[1], header[3]
    keys = [struct.unpack_from("<Q", shared._mm, 64 + i * size)[0] for i in range(slots)]
    return [(i, k) for i, k in enumerate(keys) if k]


def _check_invariant(shared: SharedStore, slots: int) -> None:
    used = _table(shared)
    keys = [k for _, k in used]
    assert len(keys) == len(set(keys)), "a key is in two slots"
    taken = {i for i, _ in used}
    for i, key in used:
        home = key % slots
        distance = (i - home) % slots
        assert distance < MAX_PROBE
        assert all((home + d) % slots in taken for d in range(distance))


def test_slot_reuse_never_leaves_a_stale_duplicate() -> None:
    """A small table with many colliding names, expiring and coming back in random order:
    every key is in at most one slot, within MAX_PROBE of its home with no hole before it,
    and every answer equals LocalStore's (the table never fills: at most 27 keys live in
    32 slots, and the probe window covers the table)."""
    rng = random.Random(7)
    slots = 32
    shared = SharedStore(slots=slots, workers=2)
    local = LocalStore()
    now = T0
    pending: list[tuple[Decision, Decision]] = []  # unsettled leases, settled a step later
    for step in range(3000):
        now += rng.choice([0.0, 0.5, 2.0, 7.0])
        for got, want in pending:
            shared.settle(got, [0.0], now)
            local.settle(want, [0.0], now)
        pending.clear()
        i = rng.randrange(12)
        kind = (
            rng.choice(["rate", "quota", "concurrent"])
            if i < 3
            else rng.choice(["rate", "concurrent"])
        )
        if kind == "rate":
            b = Bucket(f"dup|{i}", "rate", 2, 8)
        elif kind == "quota":
            b = Bucket(f"dup|{i}|q", "quota", 50, 1, cost=1)
        else:
            b = Bucket(f"dup|{i}|c", "concurrent", 2, 10)
        got = shared.admit([b], now)
        want = local.admit([b], now)
        assert (got.allowed, got.states) == (want.allowed, want.states), (step, b)
        if kind == "concurrent" and rng.random() < 0.5:
            pending.append((got, want))
        else:
            shared.settle(got, [-1.0], now)
            local.settle(want, [-1.0], now)
        _check_invariant(shared, slots)
    assert shared.full_events == 0
    shared.close()


def test_bucket_keys_are_never_zero_and_depend_on_kind() -> None:
    assert bucket_key("rate", "a") != bucket_key("quota", "a")
    assert all(bucket_key("rate", str(i)) != 0 for i in range(1000))


def test_attach_and_reset_worker_check_the_index(store: SharedStore) -> None:
    with pytest.raises(ValueError, match="worker index 4"):
        store.attach(4)
    with pytest.raises(ValueError, match="worker index -1"):
        store.reset_worker(-1)
    with pytest.raises(ValueError, match="slots"):
        SharedStore(slots=0)
    assert SharedStore.is_async is False
    store.renew([store.admit([Bucket("r|cc", "concurrent", 1, 60)], T0)], T0)  # a no-op


def test_importing_on_windows_works_and_building_says_why_not() -> None:
    code = (
        "import sys; sys.platform = 'win32'; sys.modules['fcntl'] = None\n"
        "from openai_forward.shmstore import SharedStore\n"
        "try:\n    SharedStore()\nexcept OSError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=JOIN, check=True
    )
    assert out.stdout.startswith("refused: SharedStore needs fork"), out
