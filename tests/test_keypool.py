"""The key pool as pure state: time is a number the test passes, no sockets, no sleeps."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from openai_forward.keypool import Key, KeyPool, error_code, retry_after

SECRETS = [
    "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "sk-proj-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    "sk-proj-CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
]


def pool(**kwargs: float) -> KeyPool:
    return KeyPool(SECRETS, **kwargs)


def no_secret_in(text: str, secrets: list[str] = SECRETS) -> None:
    """No secret, nor any 8-character run of one, appears in ``text``."""
    for secret in secrets:
        for i in range(len(secret) - 7):
            assert secret[i : i + 8] not in text, secret[i : i + 8]


# --- keys -------------------------------------------------------------------------------------


def test_key_ids_are_sha256_prefixes_in_order() -> None:
    p = pool()
    assert [k.id for k in p.keys] == [
        "key-" + hashlib.sha256(s.encode()).hexdigest()[:8] for s in SECRETS
    ]
    assert [k.secret for k in p.keys] == [s.encode() for s in SECRETS]


def test_duplicate_secrets_make_one_key() -> None:
    p = KeyPool([SECRETS[0], SECRETS[1], SECRETS[0]])
    assert [k.secret for k in p.keys] == [SECRETS[0].encode(), SECRETS[1].encode()]


@pytest.mark.parametrize(
    "kwargs",
    [{"quarantine": -1.0}, {"default_cooldown": float("nan")}, {"quarantine": float("inf")}],
)
def test_bad_durations_are_refused_by_name(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KeyPool(SECRETS, **kwargs)


def test_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        KeyPool([])


def test_key_repr_and_str_show_only_the_id() -> None:
    key = pool().keys[0]
    assert repr(key) == f"<Key {key.id}>"
    assert str(key) == repr(key)
    no_secret_in(repr(key))


# --- spreading --------------------------------------------------------------------------------


def test_sequential_requests_take_every_key_in_turn() -> None:
    p = pool()
    hits: Counter[str] = Counter()
    order = []
    for _ in range(30):
        key = p.acquire(0.0)
        assert key is not None
        hits[key.id] += 1
        order.append(key.id)
        p.release(key)
    assert set(hits.values()) == {10}
    assert order[:3] == [k.id for k in p.keys]


def test_concurrent_requests_prefer_the_least_busy_key() -> None:
    p = pool()
    first = [p.acquire(0.0) for _ in range(3)]
    assert set(map(id, first)) == {id(k) for k in p.keys}  # one each
    p.release(p.keys[1])
    assert p.acquire(0.0) is p.keys[1]  # the only one with 0 in flight
    held = [p.acquire(0.0) for _ in range(6)]
    assert [k.in_flight for k in p.keys] == [3, 3, 3]
    assert all(k is not None for k in held)


def test_busy_keys_are_still_handed_out_when_nothing_better_is_ready() -> None:
    p = KeyPool(SECRETS[:1])
    keys = [p.acquire(0.0) for _ in range(5)]
    assert keys == [p.keys[0]] * 5
    assert p.keys[0].in_flight == 5


def test_release_never_goes_below_zero() -> None:
    p = pool()
    key = p.acquire(0.0)
    assert key is not None
    p.release(key)
    p.release(key)
    p.release(p.keys[2])
    assert [k.in_flight for k in p.keys] == [0, 0, 0]


# --- exclude ----------------------------------------------------------------------------------


def test_exclude_skips_the_keys_already_tried() -> None:
    p = pool()
    tried: list[Key] = []
    for _ in range(3):
        key = p.acquire(0.0, exclude=tried)
        assert key is not None and key not in tried
        tried.append(key)
    assert p.acquire(0.0, exclude=tried) is None
    assert p.ready_in(0.0) == 0.0  # keys are ready; the caller excluded them all


def test_exclude_beats_least_in_flight() -> None:
    p = pool()
    for key in p.keys[1:]:
        for _ in range(4):
            key.in_flight += 1
    assert p.acquire(0.0, exclude={p.keys[0]}) in p.keys[1:]


# --- quarantine -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [(401, None, "401"), (403, None, "403"), (429, "insufficient_quota", "insufficient_quota")],
)
def test_quarantine_takes_a_key_out_until_its_time_is_up(
    status: int, code: str | None, reason: str
) -> None:
    p = pool(quarantine=300.0)
    bad = p.keys[0]
    p.report(bad, status, 10.0, code=code, retry_after=1.0)
    assert bad.state(10.0) == "quarantined"
    assert bad.reason == reason
    assert bad.quarantined_until == 310.0
    for _ in range(20):
        key = p.acquire(100.0)
        assert key is not bad
        assert key is not None
        p.release(key)
    p.report(bad, 200, 200.0)  # a late success does not bring it back early
    assert bad.state(309.9) == "quarantined"
    assert bad.state(310.0) == "ready"
    assert bad in {p.acquire(310.0) for _ in range(3)}


def test_a_later_report_never_shortens_a_window() -> None:
    p = pool(quarantine=300.0)
    key = p.keys[0]
    p.report(key, 429, 0.0, retry_after=60.0)
    p.report(key, 429, 1.0, retry_after=2.0)
    assert key.cooling_until == 60.0
    p.report(key, 401, 5.0)
    p.report(key, 429, 6.0, retry_after=1.0)
    assert key.reason == "401"  # still quarantined, so the 429 does not rename why
    assert key.state(6.0) == "quarantined"


@pytest.mark.parametrize("status", [200, 204, 400, 404, 408, 500, 502, 503])
def test_other_statuses_change_nothing(status: int) -> None:
    p = pool()
    key = p.keys[0]
    p.report(key, status, 1.0, retry_after=30.0, code="insufficient_quota")
    assert (key.state(1.0), key.reason, key.cooling_until, key.quarantined_until) == (
        "ready",
        "",
        0.0,
        0.0,
    )


# --- cooldown ---------------------------------------------------------------------------------


def test_429_cools_for_retry_after() -> None:
    p = pool(default_cooldown=1.0)
    key = p.keys[1]
    p.report(key, 429, 50.0, retry_after=7.5, code="rate_limit_exceeded")
    assert (key.state(50.0), key.reason) == ("cooling", "429")
    assert key.state(57.4) == "cooling"
    assert key.state(57.5) == "ready"


def test_429_without_retry_after_cools_for_the_default() -> None:
    p = pool(default_cooldown=2.0)
    key = p.keys[1]
    p.report(key, 429, 50.0)
    assert key.state(51.9) == "cooling"
    assert key.state(52.0) == "ready"


def test_cooling_key_is_skipped_then_returns() -> None:
    p = KeyPool(SECRETS[:2])
    p.report(p.keys[0], 429, 0.0, retry_after=5.0)
    assert [p.acquire(1.0) for _ in range(3)] == [p.keys[1]] * 3
    assert p.acquire(5.0) is p.keys[0]


# --- all out ----------------------------------------------------------------------------------


def test_all_keys_out_gives_none_and_the_wait_for_the_first_back() -> None:
    p = pool(quarantine=300.0)
    p.report(p.keys[0], 401, 0.0)
    p.report(p.keys[1], 429, 0.0, retry_after=20.0)
    p.report(p.keys[2], 429, 0.0, retry_after=12.0)
    assert p.acquire(2.0) is None
    assert p.ready_in(2.0) == 10.0
    assert p.acquire(14.0) is p.keys[2]
    assert p.ready_in(14.0) == 0.0


def test_ready_in_covers_a_key_both_quarantined_and_cooling() -> None:
    p = KeyPool(SECRETS[:1], quarantine=10.0)
    key = p.keys[0]
    p.report(key, 429, 0.0, retry_after=30.0)
    p.report(key, 403, 0.0)
    assert p.ready_in(5.0) == 25.0
    assert key.state(15.0) == "cooling"


# --- snapshot and repr ------------------------------------------------------------------------


def test_snapshot_reports_each_key() -> None:
    p = pool(quarantine=300.0)
    a, b, c = p.keys
    held = p.acquire(0.0)
    assert held is a
    p.report(b, 429, 0.0, retry_after=2.0)
    p.report(c, 429, 0.0, code="insufficient_quota")
    assert p.snapshot(0.5) == [
        {"id": a.id, "state": "ready", "in_flight": 1, "until": 0.0, "reason": ""},
        {"id": b.id, "state": "cooling", "in_flight": 0, "until": 1.5, "reason": "429"},
        {
            "id": c.id,
            "state": "quarantined",
            "in_flight": 0,
            "until": 299.5,
            "reason": "insufficient_quota",
        },
    ]
    no_secret_in(repr(p.snapshot(0.5)))


def test_repr_describes_the_pool_as_of_the_latest_time_seen() -> None:
    p = pool(quarantine=300.0)
    a, b, c = p.keys
    p.acquire(0.0)
    p.report(b, 429, 0.0, retry_after=2.0)
    p.report(c, 401, 0.0)
    assert repr(p) == (
        f"<KeyPool 3 keys: {a.id} ready 1, {b.id} cooling 2.0s (429) 0,"
        f" {c.id} quarantined 300.0s (401) 0>"
    )
    p.ready_in(1.0)
    assert f"{b.id} cooling 1.0s (429) 0" in repr(p)
    p.ready_in(0.5)  # time does not run backwards in the picture
    assert f"{b.id} cooling 1.0s (429) 0" in repr(p)
    no_secret_in(repr(p))
    no_secret_in(str(p))
    assert repr(KeyPool(SECRETS[:1])) == f"<KeyPool 1 key: {a.id} ready 0>"


# --- retry_after ------------------------------------------------------------------------------

NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"content-type", b"application/json")], None),
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"Retry-After-Ms", b"20.5")], 0.0205),
        ([(b"retry-after", b"3")], 3.0),
        ([(b"RETRY-AFTER", b" 7 ")], 7.0),
        ([(b"retry-after", b"0.25")], 0.25),
        ([(b"retry-after-ms", b"250"), (b"retry-after", b"9")], 0.25),  # ms wins
        ([(b"retry-after-ms", b"soon"), (b"retry-after", b"9")], 9.0),  # bad one skipped
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:30 GMT")], 30.0),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:30 -0000")], 30.0),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:27:00 GMT")], 0.0),  # in the past
        ([(b"retry-after", b"Wed, 21 Oct 2015 09:28:00 GMT")], 3600.0),  # capped
        ([(b"retry-after", b"not a date")], None),
        ([(b"retry-after", b"")], None),
        ([(b"retry-after", b"nan")], None),
        ([(b"retry-after", b"inf")], None),
        ([(b"retry-after", b"-5")], 0.0),
        ([(b"retry-after", b"99999999")], 3600.0),
        ([(b"retry-after", b"1e400")], None),
        ([(b"retry-after", b"\xff\xfe")], None),
        ([(b"x-ratelimit-reset-requests", b"1s")], 1.0),
        ([(b"x-ratelimit-reset-requests", b"6m0s")], 360.0),
        ([(b"x-ratelimit-reset-tokens", b"20ms")], 0.02),
        ([(b"x-ratelimit-reset-tokens", b"1h2m3.5s")], 3600.0),  # 3723.5, capped
        ([(b"x-ratelimit-reset-tokens", b"2m3.5s")], 123.5),
        ([(b"x-ratelimit-reset-tokens", b"0.5s")], 0.5),
        ([(b"x-ratelimit-reset-tokens", b"0")], 0.0),
        ([(b"x-ratelimit-reset-tokens", b"1m30s500ms")], 90.5),
        ([(b"x-ratelimit-reset-tokens", b"-3s")], 0.0),
        (
            [(b"x-ratelimit-reset-requests", b"2s"), (b"X-RateLimit-Reset-Tokens", b"6m0s")],
            360.0,
        ),
        (
            [(b"x-ratelimit-reset-requests", b"8.64s"), (b"x-ratelimit-reset-tokens", b"1ms")],
            8.64,
        ),
        ([(b"x-ratelimit-reset-requests", b"bad"), (b"x-ratelimit-reset-tokens", b"2s")], 2.0),
        ([(b"x-ratelimit-reset-requests", b"")], None),
        ([(b"x-ratelimit-reset-requests", b"5")], None),
        ([(b"x-ratelimit-reset-requests", b"s")], None),
        ([(b"x-ratelimit-reset-requests", b"1x")], None),
        ([(b"x-ratelimit-reset-requests", b"1s "), (b"retry-after", b"4")], 4.0),
        ([(b"retry-after", b"4"), (b"retry-after", b"8")], 4.0),  # first occurrence
    ],
)
def test_retry_after_reads_the_upstream_headers(
    headers: list[tuple[bytes, bytes]], expected: float | None
) -> None:
    got = retry_after(headers, now_epoch=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_retry_after_http_date_needs_the_callers_clock() -> None:
    assert retry_after([(b"retry-after", b"Wed, 21 Oct 2015 07:28:30 GMT")]) is None
    assert retry_after([(b"retry-after", b"5")]) == 5.0


# --- error_code -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "You exceeded your current quota", '
            b'"type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}',
            "insufficient_quota",
        ),
        (
            b'{"error": {"message": "Rate limit", "type": "requests", '
            b'"code": "rate_limit_exceeded"}}',
            "rate_limit_exceeded",
        ),
        (b'{"error": {"type": "invalid_request_error", "code": null}}', "invalid_request_error"),
        (b'{"error": {"type": "server_error"}}', "server_error"),
        (b'{"error": {"code": 429, "message": "x"}}', "429"),
        (b'{"error": {"code": null, "type": null}}', None),
        (b'{"error": {"code": true}}', None),
        (b'{"error": "a string"}', None),
        (b'{"error": null}', None),
        (b'{"detail": "nope"}', None),
        (b'[{"error": {"code": "insufficient_quota"}}]', None),
        (b'"insufficient_quota"', None),
        (b"null", None),
        (b"", None),
        (b"<html>Too Many Requests</html>", None),
        (b'{"error": {"code": "x"', None),
        (b'{"error": {"code": "\xff\xfe"}}', None),
        (b"\xff\xfe\xfd", None),
        (b"[" * 100_000 + b"]" * 100_000, None),
    ],
)
def test_error_code_reads_openai_error_bodies(body: bytes, expected: str | None) -> None:
    assert error_code(body) == expected


# --- the pool against a reference model -------------------------------------------------------


@dataclass
class ModelKey:
    in_flight: int = 0
    back_at: float = 0.0  # ready when now >= back_at
    quarantined_at: float = 0.0


@dataclass
class Model:
    quarantine: float
    cooldown: float
    keys: list[ModelKey] = field(default_factory=list)

    def ready(self, i: int, now: float) -> bool:
        return now >= self.keys[i].back_at

    def quarantined(self, i: int, now: float) -> bool:
        return now < self.keys[i].quarantined_at


class KeyPoolMachine(RuleBasedStateMachine):
    """Random acquire / release / report / time steps; the pool must agree with ``Model``."""

    held = Bundle("held")

    @initialize(
        n=st.integers(1, 3),
        quarantine=st.sampled_from([0.0, 5.0, 30.0]),
        cooldown=st.sampled_from([0.0, 1.0, 3.0]),
    )
    def start(self, n: int, quarantine: float, cooldown: float) -> None:
        self.now = 0.0
        self.secrets = [f"sk-model-{chr(ord('P') + i) * 32}" for i in range(n)]
        self.pool = KeyPool(self.secrets, quarantine, cooldown)
        self.model = Model(quarantine, cooldown, [ModelKey() for _ in range(n)])

    @rule(target=held, exclude=st.sets(st.integers(0, 2), max_size=3))
    def acquire(self, exclude: set[int]) -> int:
        excluded = [self.pool.keys[i] for i in exclude if i < len(self.pool.keys)]
        candidates = [
            i
            for i in range(len(self.model.keys))
            if self.model.ready(i, self.now) and i not in exclude
        ]
        key = self.pool.acquire(self.now, exclude=excluded)
        if key is None:
            assert candidates == []
            return -1
        i = self.pool.keys.index(key)
        assert i in candidates
        assert key.state(self.now) == "ready"
        least = min(self.model.keys[j].in_flight for j in candidates)
        assert self.model.keys[i].in_flight == least
        self.model.keys[i].in_flight += 1
        return i

    @rule(i=held)
    def release(self, i: int) -> None:
        if i < 0:
            return
        self.pool.release(self.pool.keys[i])
        mk = self.model.keys[i]
        mk.in_flight = max(0, mk.in_flight - 1)

    @rule(i=st.integers(0, 2))
    def stray_release(self, i: int) -> None:
        if i < len(self.pool.keys):
            self.pool.release(self.pool.keys[i])
            mk = self.model.keys[i]
            mk.in_flight = max(0, mk.in_flight - 1)

    @rule(
        i=st.integers(0, 2),
        status=st.sampled_from([200, 401, 403, 429, 429, 429, 500]),
        wait=st.one_of(st.none(), st.sampled_from([0.0, 0.5, 2.0, 60.0])),
        code=st.sampled_from([None, "insufficient_quota", "rate_limit_exceeded"]),
    )
    def report(self, i: int, status: int, wait: float | None, code: str | None) -> None:
        if i >= len(self.pool.keys):
            return
        self.pool.report(self.pool.keys[i], status, self.now, retry_after=wait, code=code)
        mk = self.model.keys[i]
        if status in (401, 403) or (status == 429 and code == "insufficient_quota"):
            until = self.now + self.model.quarantine
            mk.quarantined_at = max(mk.quarantined_at, until)
            mk.back_at = max(mk.back_at, until)
        elif status == 429:
            mk.back_at = max(mk.back_at, self.now + (self.model.cooldown if wait is None else wait))

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 2.0, 10.0, 100.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: hasattr(self, "pool"))
    @invariant()
    def in_flight_matches(self) -> None:
        got = [k.in_flight for k in self.pool.keys]
        assert got == [mk.in_flight for mk in self.model.keys]
        assert min(got) >= 0

    @precondition(lambda self: hasattr(self, "pool"))
    @invariant()
    def states_and_waits_match(self) -> None:
        now = self.now
        for i, key in enumerate(self.pool.keys):
            expected = (
                "quarantined"
                if self.model.quarantined(i, now)
                else ("ready" if self.model.ready(i, now) else "cooling")
            )
            assert key.state(now) == expected
        waits = [max(0.0, mk.back_at - now) for mk in self.model.keys]
        assert self.pool.ready_in(now) == min(waits)
        no_secret_in(repr(self.pool), self.secrets)


KeyPoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_key_pool_matches_reference_model = KeyPoolMachine.TestCase
