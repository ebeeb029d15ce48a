"""Admission: rate limits, concurrency limits and budgets, decided before a request leaves.

For each request the applicable rules become buckets (see ``limits.Bucket``) that the state
store checks and charges in one atomic step: requests per minute and tokens per minute are
GCRA (token bucket) rates, ``concurrent`` is a count of live leases, budgets are quotas per
UTC day, UTC month or in total. Tokens are reserved up front (prompt estimate plus the
request's maximum output, or ``reserve_tokens``) and settled with the real usage when the
request ends, so concurrent requests cannot overshoot a limit by more than what one request
uses beyond its reservation.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .auth import client_token, route_matches
from .errors import GatewayError
from .limitconfig import BUDGET_FIELDS, Budget, LimitRule, Limits, Price, price_for
from .limits import Bucket, BucketState, Decision

if TYPE_CHECKING:
    from .body import RequestFacts
    from .config import Config
    from .http1 import Request
    from .keystore import ForwardKey
    from .usage import Usage

MINUTE = 60.0
LEASE_SECONDS = 300.0  # a concurrency lease not renewed for this long is forgotten (crashes)
_TOTAL_SECONDS = 10 * 365 * 86400.0


@dataclass(slots=True)
class Charge:
    """What one admitted request reserved, to settle when it ends."""

    decision: Decision
    tokens: float  # reserved tokens (prompt estimate + maximum output)
    cost: float  # reserved money
    price: Price | None


def _subject_of_client(req: Request, identity: ForwardKey | None) -> str:
    """Who a per-key bucket belongs to: the forward key, or a digest of the client's own key
    (never the key itself), or everyone without a key."""
    if identity is not None:
        return "key:" + identity.id
    token = client_token(req.headers)
    if token is None:
        return "key:-"
    return "client:" + hashlib.sha256(token).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month a moment falls in: ids for bucket names, and their bounds."""

    day: str
    day_start: float
    day_end: float
    month: str
    month_start: float
    month_end: float


def periods(now_epoch: float) -> Periods:
    now = datetime.fromtimestamp(now_epoch, timezone.utc)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    if month_start.month == 12:
        next_month = month_start.replace(year=month_start.year + 1, month=1)
    else:
        next_month = month_start.replace(month=month_start.month + 1)
    return Periods(
        day=now.strftime("%Y%m%d"),
        day_start=day_start.timestamp(),
        day_end=day_start.timestamp() + 86400,
        month=now.strftime("%Y%m"),
        month_start=month_start.timestamp(),
        month_end=next_month.timestamp(),
    )


class Admission:
    """The limit and budget policy of one worker: which buckets a request fills."""

    def __init__(self, config: Config) -> None:
        self.rules = config.limits
        self.prices = config.prices
        self.reserve_tokens = config.reserve_tokens
        self.seeds: dict[str, float] = {}  # bucket name -> spend recorded before this start
        # budget bucket names and period ends per key, for the current UTC day
        self._span = periods(time.time())
        self._plans: dict[str, list[tuple[str, float, float | None, bool]]] = {}
        self.token_rules = any(r.limits.tpm or r.models for r in self.rules)
        self.by_scope = {s: any(r.scope == s for r in self.rules) for s in ("key", "ip")}

    def applies(self, identity: ForwardKey | None) -> bool:
        """Whether any limit or budget can apply to a request of ``identity``."""
        return bool(self.rules) or (
            identity is not None and bool(identity.limits or identity.budget)
        )

    @staticmethod
    def limits_of(identity: ForwardKey | None) -> tuple[Limits | None, Budget | None]:
        if identity is None:
            return None, None
        return identity.limits, identity.budget

    def needs_body(self, identity: ForwardKey | None) -> bool:
        """Whether admission must see the body (a model to match, tokens to reserve)."""
        if self.token_rules:
            return True
        limits, budget = self.limits_of(identity)
        return bool(budget) or bool(limits and limits.tpm)

    def buckets(
        self, req: Request, names: list[str], paths: tuple[str, ...], facts: RequestFacts | None
    ) -> tuple[list[Bucket], float, float, Price | None]:
        """The buckets this request fills (budgets first: their refusal is final) and what
        it reserves: (buckets, tokens, money, price)."""
        identity: ForwardKey | None = req.identity
        model = facts.model if facts is not None else None
        limits, budget = self.limits_of(identity)
        rules = [
            (i, rule)
            for i, rule in enumerate(self.rules)
            if (not rule.routes or route_matches(rule.routes, names, paths))
            and rule.matches_model(model)
        ]
        counted = bool(budget) or bool(limits and limits.tpm) or any(r.limits.tpm for _, r in rules)
        tokens, cost, price = self.reservation(facts, req.path) if counted else (0.0, 0.0, None)
        out: list[Bucket] = []
        if budget and identity is not None:
            out.extend(self._budget_buckets(identity.id, budget, tokens, cost))
        subjects: dict[str, str] = {"global": "global"}
        if self.by_scope["key"]:
            subjects["key"] = _subject_of_client(req, identity)
        if self.by_scope["ip"]:
            subjects["ip"] = "ip:" + (req.client_ip or req.client.peer)
        for i, rule in rules:
            _add(out, f"{subjects[rule.scope]}|r{i}", rule.limits, tokens)
        if limits and identity is not None:
            _add(out, f"key:{identity.id}|own", limits, tokens)
        return out, tokens, cost, price

    def _budget_buckets(
        self, key_id: str, budget: Budget, reserve: float, cost: float
    ) -> list[Bucket]:
        now = time.time()
        span = self._span
        if not span.day_start <= now < span.day_end:
            span = self._span = periods(now)
            self._plans.clear()
        plan = self._plans.get(key_id)
        if plan is None:
            plan = self._plans[key_id] = _budget_plan(key_id, budget, span)
        seeds = self.seeds
        return [
            Bucket(
                name,
                "quota",
                limit,
                _TOTAL_SECONDS if end is None else end - now,
                cost if money else reserve,
                seeds.get(name, 0.0),
            )
            for name, limit, end, money in plan
        ]

    def reservation(
        self, facts: RequestFacts | None, path: str
    ) -> tuple[float, float, Price | None]:
        """(tokens, money, price) a request reserves; nothing for bodies without tokens."""
        if facts is None:
            return 0.0, 0.0, None
        from .tokens import estimate_prompt

        # the heuristic, not tiktoken (model None): a reservation is settled with the real
        # usage later, and an exact count would cost ~100 µs per KiB of prompt here
        prompt = estimate_prompt(facts.obj, None)
        if path == "/v1/embeddings":
            completion = 0
        else:
            most = facts.max_tokens if facts.max_tokens is not None else self.reserve_tokens
            completion = most * max(facts.n, 1)
        price = price_for(self.prices, facts.model)
        money = price.cost(prompt, completion) if price is not None else 0.0
        return float(prompt + completion), money, price


def _budget_plan(
    key_id: str, budget: Budget, span: Periods
) -> list[tuple[str, float, float | None, bool]]:
    """(bucket name, limit, period end or None for total, counts money) per budget set."""
    plan = []
    for field_name in BUDGET_FIELDS:
        limit = getattr(budget, field_name)
        if not limit:
            continue
        what, _, per = field_name.partition("_per_")
        what = what.removesuffix("_total")
        if field_name.endswith("_total"):
            period_id, end = "total", None
        elif per == "day":
            period_id, end = "d" + span.day, span.day_end
        else:
            period_id, end = "m" + span.month, span.month_end
        name = f"key:{key_id}|budget|{what}|{period_id}"
        plan.append((name, float(limit), end, what == "cost"))
    return plan


def _add(out: list[Bucket], prefix: str, limits: Limits, reserve: float) -> None:
    if limits.rpm:
        out.append(Bucket(prefix + "|rpm", "rate", float(limits.rpm), MINUTE))
    if limits.tpm and reserve > 0:
        out.append(Bucket(prefix + "|tpm", "rate", float(limits.tpm), MINUTE, reserve))
    if limits.concurrent:
        out.append(Bucket(prefix + "|cc", "concurrent", float(limits.concurrent), LEASE_SECONDS))


def settle_deltas(charge: Charge, tokens: float, cost: float) -> list[float]:
    """Per bucket of ``charge``: what to add (actual minus reserved) when the request ends.
    A rate bucket charged at most its whole limit (a larger request waits for a full bucket,
    it is not charged more), so that is what it reserved."""
    deltas = []
    for state in charge.decision.states:
        bucket = state.bucket
        if bucket.kind == "concurrent" or bucket.name.endswith("|rpm"):
            deltas.append(0.0)
        elif bucket.kind == "quota":
            spent = cost if "|budget|cost|" in bucket.name else tokens
            deltas.append(spent - bucket.cost)
        else:
            deltas.append(tokens - min(bucket.cost, bucket.limit))
    return deltas


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: 20ms, 6s, 1m30s, 2h5m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(states: list[BucketState]) -> list[bytes]:
    """x-ratelimit-* header lines for the tightest request and token rate of a decision."""
    lines: list[bytes] = []
    for suffix, tag in ((b"requests", "|rpm"), (b"tokens", "|tpm")):
        tight: BucketState | None = None
        for state in states:
            if state.bucket.name.endswith(tag) and (
                tight is None or state.remaining < tight.remaining
            ):
                tight = state
        if tight is not None:
            lines.append(b"x-ratelimit-limit-%b: %d" % (suffix, int(tight.bucket.limit)))
            lines.append(b"x-ratelimit-remaining-%b: %d" % (suffix, int(tight.remaining)))
            reset = format_reset(tight.reset).encode()
            lines.append(b"x-ratelimit-reset-%b: %b" % (suffix, reset))
    return lines


def refusal(decision: Decision) -> GatewayError:
    """The 429 for a refused decision, shaped like OpenAI's."""
    bucket = decision.refused
    assert bucket is not None
    wait = decision.retry_after
    state = next((s for s in decision.states if s.bucket is bucket), None)
    if bucket.kind == "quota":
        what = "token" if "|budget|tokens|" in bucket.name else "spending"
        span = bucket.name.rsplit("|", 1)[-1]
        when = {"d": "day", "m": "month"}.get(span[:1], "total")
        message = (
            f"This API key's {what} budget ({'in total' if when == 'total' else 'per ' + when}) "
            f"is used up: limit {_number(bucket.limit)}."
        )
        if when != "total":
            message += f" It renews in {format_reset(wait)}."
        return GatewayError(
            429,
            "insufficient_quota",
            message,
            type="insufficient_quota",
            should_retry=False,
            headers=((b"retry-after", b"%d" % max(1, math.ceil(wait))),),
        )
    kind = "tokens" if bucket.name.endswith("|tpm") else "requests"
    if bucket.kind == "concurrent":
        message = (
            f"Too many requests in flight: limit {_number(bucket.limit)} at a time. "
            "Try again when one finishes."
        )
    else:
        unit = "tokens per minute (tpm)" if kind == "tokens" else "requests per minute (rpm)"
        message = (
            f"Rate limit reached for {unit}: limit {_number(bucket.limit)}, "
            f"requested {_number(bucket.cost)}. Please try again in {format_reset(wait)}."
        )
    headers = [
        (b"retry-after", b"%d" % max(1, math.ceil(wait))),
        (b"retry-after-ms", b"%d" % max(1, math.ceil(wait * 1000))),
    ]
    if state is not None and bucket.kind == "rate":
        headers.append((b"x-ratelimit-limit-" + kind.encode(), b"%d" % int(bucket.limit)))
        headers.append((b"x-ratelimit-remaining-" + kind.encode(), b"%d" % int(state.remaining)))
        headers.append((b"x-ratelimit-reset-" + kind.encode(), format_reset(state.reset).encode()))
    return GatewayError(429, "rate_limit_exceeded", message, type=kind, headers=tuple(headers))


def _number(value: float) -> str:
    return f"{int(value):,}" if value == int(value) else f"{value:,.2f}"


def usage_cost(price: Price | None, usage: Usage) -> float | None:
    if price is None:
        return None
    return price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


__all__ = ["Admission", "Charge", "LimitRule", "rate_headers", "refusal", "settle_deltas"]
