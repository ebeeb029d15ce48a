"""A pool of upstream API keys with failover: pure bookkeeping, no I/O and no clock.

Every method that needs the time takes ``now`` (monotonic seconds) from the caller, so the
whole life of a key (ready, cooling after a 429, quarantined after a 401/403 or an exhausted
quota) is tested by passing numbers. ``retry_after`` and ``error_code`` read the upstream's
answer into the two facts ``KeyPool.report`` needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

READY = "ready"
COOLING = "cooling"
QUARANTINED = "quarantined"

MAX_WAIT = 3600.0


def key_id(secret: bytes) -> str:
    """``"key-"`` + the first 8 hex digits of sha256(secret): safe to log, show and compare."""
    return "key-" + hashlib.sha256(secret).hexdigest()[:8]


@dataclass(eq=False, slots=True)
class Key:
    """One upstream key and its bookkeeping. Compared and hashed by identity.

    ``repr`` and ``str`` show only ``id``, never ``secret``.
    """

    secret: bytes
    id: str
    in_flight: int = 0
    cooling_until: float = 0.0
    quarantined_until: float = 0.0
    reason: str = ""

    def state(self, now: float) -> str:
        """``"quarantined"`` or ``"cooling"`` while that window is open at ``now``, else
        ``"ready"``. Quarantine wins when both are open."""
        if now < self.quarantined_until:
            return QUARANTINED
        if now < self.cooling_until:
            return COOLING
        return READY

    def until(self, now: float) -> float:
        """Seconds from ``now`` until this key is ready again; 0 when it is ready."""
        if self.state(now) == READY:
            return 0.0
        return max(self.quarantined_until, self.cooling_until) - now

    def __repr__(self) -> str:
        return f"<Key {self.id}>"


class KeyPool:
    """The keys of one upstream, handed out least-busy first and taken out of rotation on
    the upstream's say-so.

    Usage per attempt: ``key = pool.acquire(now)``; send; ``pool.report(key, status, now,
    ...)``; ``pool.release(key)`` (in ``finally``). A retry passes the keys already tried as
    ``exclude``. ``repr`` describes the pool as of the latest ``now`` any method was given.
    """

    __slots__ = ("_now", "_turn", "default_cooldown", "keys", "quarantine")

    def __init__(
        self, secrets: Sequence[str], quarantine: float = 300.0, default_cooldown: float = 1.0
    ) -> None:
        """Build one ``Key`` per distinct secret (UTF-8 encoded), in the order given.

        Raises ``ValueError`` when there is no secret or a duration is negative or not finite.
        """
        for name, value in (("quarantine", quarantine), ("default_cooldown", default_cooldown)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"KeyPool {name} must be a finite number >= 0, not {value!r}")
        seen: dict[bytes, Key] = {}
        for text in secrets:
            secret = text.encode()
            if secret not in seen:
                seen[secret] = Key(secret, key_id(secret))
        if not seen:
            raise ValueError("KeyPool needs at least one key")
        self.keys: tuple[Key, ...] = tuple(seen.values())
        self.quarantine = float(quarantine)
        self.default_cooldown = float(default_cooldown)
        self._turn = 0
        self._now = 0.0

    def acquire(self, now: float, exclude: Collection[Key] = ()) -> Key | None:
        """The ready key not in ``exclude`` with the fewest requests in flight, its
        ``in_flight`` incremented; ``None`` when there is none.

        Ties go to the first key at or after a start index that moves past each key handed
        out, so sequential requests take the keys in turn.
        """
        self._see(now)
        keys = self.keys
        n = len(keys)
        best = -1
        for step in range(n):
            i = (self._turn + step) % n
            key = keys[i]
            if key.state(now) != READY or key in exclude:
                continue
            if best < 0 or key.in_flight < keys[best].in_flight:
                best = i
        if best < 0:
            return None
        self._turn = (best + 1) % n
        chosen = keys[best]
        chosen.in_flight += 1
        return chosen

    def release(self, key: Key) -> None:
        """One request on ``key`` is over: ``in_flight`` goes down by one, never below 0."""
        if key.in_flight > 0:
            key.in_flight -= 1

    def report(
        self,
        key: Key,
        status: int,
        now: float,
        *,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        """Record the upstream's answer ``status`` to a request made with ``key``.

        401 and 403 quarantine the key for ``quarantine`` seconds (reason ``"401"``/``"403"``),
        as does a 429 whose error ``code`` is ``"insufficient_quota"``
        (reason ``"insufficient_quota"``). Any other 429 cools the key for ``retry_after``
        seconds, or ``default_cooldown`` when that is ``None`` (reason ``"429"``). A window
        is only ever lengthened, never shortened, by a later report; a quarantined key keeps
        its quarantine reason when it is also cooled. Every other status, 2xx included,
        changes nothing: a key comes back only when its time is up.
        """
        self._see(now)
        if status in (401, 403) or (status == 429 and code == "insufficient_quota"):
            reason = "insufficient_quota" if status == 429 else str(status)
            key.quarantined_until = max(key.quarantined_until, now + self.quarantine)
            key.reason = reason
        elif status == 429:
            wait = self.default_cooldown if retry_after is None else max(0.0, retry_after)
            key.cooling_until = max(key.cooling_until, now + wait)
            if key.state(now) != QUARANTINED:
                key.reason = "429"

    def ready_in(self, now: float) -> float:
        """Seconds from ``now`` until the first key is ready again; 0 when one is ready
        (whether or not it is busy)."""
        self._see(now)
        return min(key.until(now) for key in self.keys)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Per key, in pool order: ``id``, ``state``, ``in_flight``, ``until`` (seconds left
        before it is ready, 0 when ready) and ``reason`` (the last reason it went out, "" if
        never). Holds no secret."""
        self._see(now)
        return [
            {
                "id": key.id,
                "state": key.state(now),
                "in_flight": key.in_flight,
                "until": key.until(now),
                "reason": key.reason,
            }
            for key in self.keys
        ]

    def __repr__(self) -> str:
        now = self._now
        parts = []
        for key in self.keys:
            state = key.state(now)
            if state == READY:
                parts.append(f"{key.id} ready {key.in_flight}")
            else:
                until = key.until(now)
                parts.append(f"{key.id} {state} {until:.1f}s ({key.reason}) {key.in_flight}")
        n = len(self.keys)
        return f"<KeyPool {n} key{'' if n == 1 else 's'}: {', '.join(parts)}>"

    def _see(self, now: float) -> None:
        if now > self._now:
            self._now = now


# OpenAI's x-ratelimit-reset-* values are Go durations: "1s", "6m0s", "20ms", "1h2m3.5s".
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"([+-]?)((?:{_NUMBER}(?:h|ms|m|s|us|µs|μs|ns))+)")
_PART = re.compile(rf"({_NUMBER})(h|ms|m|s|us|µs|μs|ns)")
_UNIT = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}


def retry_after(
    headers: Sequence[tuple[bytes, bytes]], now_epoch: float | None = None
) -> float | None:
    """Seconds to wait before using a key again, read from an upstream response's headers.

    Sources, first usable one wins (names case-insensitive, first occurrence of each name):
    ``retry-after-ms`` (milliseconds); ``retry-after`` (seconds, or an HTTP-date counted from
    ``now_epoch``, the caller's ``time.time()``; a date without ``now_epoch`` is unusable);
    else the longer of ``x-ratelimit-reset-requests`` and ``x-ratelimit-reset-tokens``
    (Go durations such as ``"6m0s"``). A value that does not parse is skipped. Returns
    ``None`` when no source is usable, else a number in [0, 3600]. Never raises.
    """
    found: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").strip().lower()
        if name not in found:
            found[name] = raw_value.decode("latin-1").strip()
    value = _seconds(found.get("retry-after-ms"), 1e-3)
    if value is None:
        value = _seconds(found.get("retry-after"), 1.0)
    if value is None:
        value = _http_date(found.get("retry-after"), now_epoch)
    if value is None:
        resets = [
            v
            for v in (
                _duration(found.get("x-ratelimit-reset-requests")),
                _duration(found.get("x-ratelimit-reset-tokens")),
            )
            if v is not None
        ]
        value = max(resets) if resets else None
    if value is None:
        return None
    return min(max(value, 0.0), MAX_WAIT)


def _seconds(text: str | None, scale: float) -> float | None:
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number * scale if math.isfinite(number) else None


def _http_date(text: str | None, now_epoch: float | None) -> float | None:
    if not text or now_epoch is None:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now_epoch


def _duration(text: str | None) -> float | None:
    if not text:
        return None
    if text in ("0", "+0", "-0"):
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    total = sum(float(n) * _UNIT[unit] for n, unit in _PART.findall(match.group(2)))
    if not math.isfinite(total):
        return None
    return -total if match.group(1) == "-" else total


def error_code(body: bytes) -> str | None:
    """The ``code`` of an OpenAI error body ``{"error": {...}}``, or its ``type`` when the
    code is null or missing; ``None`` for any other body. Never raises."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if not isinstance(error, dict):
        return None
    for field in ("code", "type"):
        value = error.get(field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None
