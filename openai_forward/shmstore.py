"""Limits shared exactly by the forked workers of one machine: a hash table in shared memory.

The supervisor builds one ``SharedStore`` before it forks; every worker calls
``attach(index)`` and then uses the ``LocalStore`` API (``admit``, ``settle``, ``renew``) with
the same semantics (see ``limits.py``). Like nginx's ``limit_req`` zones, the state is an
anonymous shared ``mmap`` (inherited across fork) guarded by one lock: a POSIX record lock
(``fcntl.lockf``) on an unlinked temporary file. The kernel drops a record lock when its
holder dies, so a worker killed inside ``admit`` cannot deadlock the others (``flock`` would
not even exclude the workers: they share the inherited open file description). The lock is
held only for the table arithmetic: no I/O, no logging, no hashing.

Memory layout (little-endian)::

    header, 64 bytes:  magic "OFWSHM01" | slots u64 | workers u64 | slot size u64
                       | full events u64 | padding
    slot i at 64 + i * size, size = 16 + max(16, 4 * workers rounded up to 8):
        0   key  u64   8-byte blake2b of "kind\\0name"; 0 = never used (a digest of 0 is 1)
        8   kind u8    1 rate, 2 quota, 3 concurrent; then 7 bytes of padding
        16  rate:       tat f64                         (expired when tat <= now)
            quota:      committed f64, expiry f64       (expired when expiry <= now)
            concurrent: live leases u32 x workers, one column per worker (free when all 0)

Expired and all-zero slots are reusable by any key; expired state reads as absent (rate:
tat = now, quota: the bucket's seed), exactly as in ``LocalStore``. A worker's concurrent
leases live in its own column, so when the supervisor replaces a dead worker it calls
``reset_worker(index)`` and the leases the dead one held are freed; leases do not expire by
time here (``renew`` is a no-op).

Table full (no reusable slot within ``MAX_PROBE`` of a new bucket's home): the bucket is
judged as if it had no state (so the request passes unless an empty bucket would refuse it),
nothing is stored for it, ``full_events`` counts it, and settling it does nothing. This fails
open on purpose: a full table must not refuse traffic; size ``slots`` to a few times the
number of live buckets (64 K slots of 32 bytes = 2 MiB for up to 4 workers).

A worker killed between two slot writes of one admit leaves that admission half charged:
each slot write is a single ``pack_into`` (one copy), so no slot is ever torn, and the
over-charge is bounded by one request's cost.

Not available on Windows (no fork): importing works there, constructing raises OSError.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from .limits import QUOTA_GRACE, Bucket, Decision, decide, quota_settle, rate_settle

if sys.platform != "win32":
    import fcntl

MAX_PROBE = 32  # slots examined per lookup at most: bounds the time the lock is held
_MAGIC = b"OFWSHM01"
_HEADER = struct.Struct("<8sQQQQ")
_HEADER_SIZE = 64
_FULL_EVENTS = 32  # offset of the full-events counter in the header
_DATA = 16  # offset of a slot's data
_KEY = struct.Struct("<Q")
_KEY_KIND = struct.Struct("<QB")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_RATE_SLOT = struct.Struct("<QB7xd")
_QUOTA_SLOT = struct.Struct("<QB7xdd")
_RATE, _QUOTA, _CONCURRENT = 1, 2, 3
_KIND_CODES = {"rate": _RATE, "quota": _QUOTA, "concurrent": _CONCURRENT}
_CHUNK = 1024  # slots per lock hold in reset_worker: never stall the workers long


def bucket_key(kind: str, name: str) -> int:
    """The table key of a bucket: an 8-byte digest of kind and name, never 0."""
    digest = hashlib.blake2b(f"{kind}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class SharedStore:
    """Exact limits across the forked workers of one machine (see the module docstring).

    ``SharedStore(slots, workers)`` must be built before fork; each child calls
    ``attach(worker_index)`` before use (a process that never attaches acts as worker 0).
    The clock is ``time.monotonic`` (CLOCK_MONOTONIC: one clock for every process on the
    machine) unless ``clock`` is given or a call passes ``now``.
    """

    is_async = False

    def __init__(
        self,
        slots: int = 65536,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sys.platform == "win32":
            raise OSError("SharedStore needs fork and fcntl, which Windows lacks")
        if slots < 1 or workers < 1:
            raise ValueError(f"SharedStore: slots ({slots}) and workers ({workers}) must be >= 1")
        self._slots = slots
        self._workers = workers
        self._size = _DATA + max(16, (4 * workers + 7) // 8 * 8)
        self._probe = min(MAX_PROBE, slots)
        self._mm = mmap.mmap(-1, _HEADER_SIZE + slots * self._size)  # shared, anonymous
        _HEADER.pack_into(self._mm, 0, _MAGIC, slots, workers, self._size, 0)
        fd, path = tempfile.mkstemp(prefix="openai-forward-limits-", suffix=".lock")
        os.unlink(path)  # nothing to clean up; the open descriptor is all the lock needs
        self._fd = fd
        self._counts = struct.Struct(f"<{workers}I")
        self._concurrent_slot = struct.Struct(f"<QB7x{workers}I")
        self._clock = clock
        self._worker = 0
        self._thread_lock = threading.Lock()  # record locks do not exclude threads
        self._keys: dict[str, dict[str, int]] = {kind: {} for kind in _KIND_CODES}

    def attach(self, worker_index: int) -> None:
        """Use this process as worker ``worker_index`` (0 <= index < workers); call it in the
        child right after fork."""
        if not 0 <= worker_index < self._workers:
            raise ValueError(f"worker index {worker_index} not in 0..{self._workers - 1}")
        self._worker = worker_index
        self._thread_lock = threading.Lock()  # a lock held by another thread at fork stays held

    @property
    def full_events(self) -> int:
        """How many times, over all workers, a bucket found no slot and was not counted."""
        return int(_KEY.unpack_from(self._mm, _FULL_EVENTS)[0])

    def __len__(self) -> int:
        return self.live()

    def live(self, now: float | None = None) -> int:
        """Slots holding live state at ``now`` (a full scan: for tests and metrics)."""
        if now is None:
            now = self._clock()
        self._acquire()
        try:
            return sum(
                1
                for off in map(self._offset, range(self._slots))
                if _KEY.unpack_from(self._mm, off)[0] and not self._reusable(off, now)
            )
        finally:
            self._release()

    def __repr__(self) -> str:
        return f"SharedStore(slots={self._slots}, workers={self._workers})"

    def close(self) -> None:
        """Unmap the table and close the lock file (in every process that is done with it)."""
        self._mm.close()
        os.close(self._fd)

    # ----------------------------------------------------------------- the store API

    def admit(self, buckets: Sequence[Bucket], now: float | None = None) -> Decision:
        """Check every bucket; if all pass, charge all of them, else change nothing: one
        atomic step for every worker."""
        if now is None:
            now = self._clock()
        keys = [self._key(b) for b in buckets]
        found = []
        values = []
        self._acquire()
        try:
            for b, key in zip(buckets, keys, strict=False):
                where = self._find(key, now)
                found.append(where)
                values.append(self._read(b, where, now))
            decision, after = decide(buckets, values, now)
            if decision.allowed:
                ticket = []
                for i, b in enumerate(buckets):
                    ticket.append(self._charge(b, keys[i], found[i], after[i], now))
                # the ticket: where each bucket's state went (-1: nowhere, the table was full)
                decision.ticket = ticket
        finally:
            self._release()
        return decision

    def settle(self, decision: Decision, deltas: Sequence[float], now: float | None = None) -> None:
        """Apply ``deltas[i]`` (actual - reserved; missing ones count as 0) to
        ``decision.states[i]``'s bucket and release this worker's leases. Once per decision;
        a refused decision holds nothing."""
        ticket = decision.ticket
        if not isinstance(ticket, list) or not decision.allowed:
            return
        decision.ticket = None
        work = []
        for i, (st, off) in enumerate(zip(decision.states, ticket, strict=True)):
            delta = deltas[i] if i < len(deltas) else 0.0
            if off >= 0 and (delta or st.bucket.kind == "concurrent"):
                work.append((st.bucket, off, delta))
        if not work:  # e.g. a request rate with nothing to correct: no lock needed
            return
        if now is None:
            now = self._clock()
        self._acquire()
        try:
            for b, off, delta in work:
                self._settle_one(b, off, delta, now)
        finally:
            self._release()

    def renew(self, decisions: Sequence[Decision], now: float | None = None) -> None:
        """Nothing to do: leases are per-worker counts, freed by settle or reset_worker."""

    def reset_worker(self, index: int) -> None:
        """Zero worker ``index``'s lease counts everywhere (the supervisor calls it when that
        worker died, before starting its replacement)."""
        if not 0 <= index < self._workers:
            raise ValueError(f"worker index {index} not in 0..{self._workers - 1}")
        column = _DATA + 4 * index
        for start in range(0, self._slots, _CHUNK):
            self._acquire()
            try:
                for i in range(start, min(start + _CHUNK, self._slots)):
                    off = self._offset(i)
                    key, kind = _KEY_KIND.unpack_from(self._mm, off)
                    if key and kind == _CONCURRENT:
                        _U32.pack_into(self._mm, off + column, 0)
            finally:
                self._release()

    # ----------------------------------------------------------------- the table
    #
    # Invariant: a key sits within the MAX_PROBE slots from its home (key % slots), and every
    # slot between its home and its own slot holds a key (is not 0). It holds because a key
    # is written only into the first reusable slot of that window, after the whole window
    # (up to the first never-used slot) was scanned without finding the key, and a slot's
    # key is never set back to 0, only replaced. Hence a lookup from the home that stops at
    # the key, at a never-used slot, or after MAX_PROBE slots finds the key if present, and a
    # key is never in two slots: no lookup can return a stale duplicate. Replacing a
    # reusable slot's key drops the old key's state, which had expired (reads as absent).

    def _offset(self, index: int) -> int:
        return _HEADER_SIZE + index * self._size

    def _find(self, key: int, now: float) -> tuple[int, bool]:
        """``(offset, True)`` where ``key`` is, else ``(offset of the first reusable slot,
        False)``; offset -1 when there is none (the table is full around the key's home)."""
        mm = self._mm
        slots = self._slots
        index = key % slots
        free = -1
        for _ in range(self._probe):
            off = _HEADER_SIZE + index * self._size
            held = _KEY.unpack_from(mm, off)[0]
            if held == key:
                return off, True
            if held == 0:
                return (off if free < 0 else free), False
            if free < 0 and self._reusable(off, now):
                free = off
            index = index + 1 if index + 1 < slots else 0
        return free, False

    def _reusable(self, off: int, now: float) -> bool:
        kind = self._mm[off + 8]
        if kind == _RATE:
            return bool(_F64.unpack_from(self._mm, off + _DATA)[0] <= now)
        if kind == _QUOTA:
            return bool(_F64.unpack_from(self._mm, off + _DATA + 8)[0] <= now)
        return not any(self._counts.unpack_from(self._mm, off + _DATA))

    def _read(self, b: Bucket, found: tuple[int, bool], now: float) -> float:
        """The bucket's state value as ``limits.judge`` takes it (absent: now / seed / 0)."""
        off, present = found
        if b.kind == "rate":
            return float(_F64.unpack_from(self._mm, off + _DATA)[0]) if present else now
        if b.kind == "quota":
            return self._committed(b, off, present, now)
        return float(sum(self._counts.unpack_from(self._mm, off + _DATA))) if present else 0.0

    def _committed(self, b: Bucket, off: int, present: bool, now: float) -> float:
        if not present:
            return b.seed
        committed, expiry = _QUOTA_SLOT.unpack_from(self._mm, off)[2:]
        return float(committed) if expiry > now else b.seed

    def _charge(
        self, b: Bucket, key: int, found: tuple[int, bool], value: float, now: float
    ) -> int:
        """Store an admitted bucket's new value; returns its slot, or -1 if the table is full."""
        off, present = found
        if not present:  # look again: an earlier bucket of this call may have taken the slot
            off, present = self._find(key, now)
            if off < 0:
                self._count_full()
                return -1
        mm = self._mm
        if b.kind == "rate":
            _RATE_SLOT.pack_into(mm, off, key, _RATE, value)
        elif b.kind == "quota":
            _QUOTA_SLOT.pack_into(mm, off, key, _QUOTA, value, now + b.period + QUOTA_GRACE)
        elif present:
            column = off + _DATA + 4 * self._worker
            _U32.pack_into(mm, column, _U32.unpack_from(mm, column)[0] + 1)
        else:
            counts = [0] * self._workers
            counts[self._worker] = 1
            self._concurrent_slot.pack_into(mm, off, key, _CONCURRENT, *counts)
        return off

    def _settle_one(self, b: Bucket, off: int, delta: float, now: float) -> None:
        """Settle one bucket whose state was stored at ``off`` at admission; the slot still
        holds it if it holds the key (a key is in one slot at most), else look it up."""
        mm = self._mm
        key = self._key(b)
        present = _KEY.unpack_from(mm, off)[0] == key
        if not present:
            off, present = self._find(key, now)
        if b.kind == "concurrent":
            column = off + _DATA + 4 * self._worker
            held = _U32.unpack_from(mm, column)[0] if present else 0
            if held:  # 0: reset_worker already freed it
                _U32.pack_into(mm, column, held - 1)
        elif b.kind == "rate":
            tat = _F64.unpack_from(mm, off + _DATA)[0] if present else now
            tat = rate_settle(tat, now, b.limit, b.period, delta)
            if present or (tat > now and off >= 0):
                _RATE_SLOT.pack_into(mm, off, key, _RATE, tat)
        elif off >= 0:
            committed = quota_settle(self._committed(b, off, present, now), delta)
            _QUOTA_SLOT.pack_into(mm, off, key, _QUOTA, committed, now + b.period + QUOTA_GRACE)

    def _count_full(self) -> None:
        _KEY.pack_into(self._mm, _FULL_EVENTS, _KEY.unpack_from(self._mm, _FULL_EVENTS)[0] + 1)

    def _key(self, b: Bucket) -> int:
        cache = self._keys[b.kind]
        key = cache.get(b.name)
        if key is None:
            if len(cache) >= 4 * self._slots:  # a flood of names: bound the cache
                cache.clear()
            key = cache[b.name] = bucket_key(b.kind, b.name)
        return key

    # ----------------------------------------------------------------- the lock

    def _acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


__all__ = ["MAX_PROBE", "SharedStore", "bucket_key"]
