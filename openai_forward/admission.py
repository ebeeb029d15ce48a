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

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .auth import client_key_digest, route_matches
from .errors import GatewayError
from .limitconfig import BUDGET_FIELDS, Budget, LimitRule, Limits, Price, price_for
from .limits import Bucket, BucketState, Decision, Kind
from .tokens import reserve_prompt

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
    digest = client_key_digest(req.headers)
    return "key:-" if digest is None else "client:" + digest[:16]


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


@dataclass(frozen=True, slots=True)
class _Reserved:
    """A bucket whose cost is the request's reservation: tokens per minute, or a budget."""

    name: str
    kind: Kind
    limit: float
    end: float | None  # a budget's period end (None: in total); unused for rates
    unit: str  # "tokens" or "cost"


@dataclass(slots=True)
class _Template:
    """The buckets of one kind of request (key, route, model, subject), built once: fixed
    buckets as they are, reserved ones filled in per request."""

    identity: ForwardKey | None
    slots: list[Bucket | _Reserved]
    counted: bool  # whether anything counts tokens or money: then the request reserves
    fixed: bool  # no reserved slot: the bucket list is the same for every request


_TEMPLATES_MAX = 8192  # distinct subjects kept; beyond, start over (a flood of client IPs)


class Admission:
    """The limit and budget policy of one worker: which buckets a request fills."""

    def __init__(self, config: Config) -> None:
        self.rules = config.limits
        self.prices = config.prices
        self.reserve_tokens = config.reserve_tokens
        self.seeds: dict[str, float] = {}  # bucket name -> spend recorded before this start
        # the UTC day whose budget bucket names the templates hold
        self._span = periods(time.time())
        self._templates: dict[tuple[object, ...], _Template] = {}
        self._prices: dict[str | None, Price | None] = {}
        self.token_rules = any(r.limits.tpm or r.models for r in self.rules)
        self._key_scope = any(r.scope == "key" for r in self.rules)
        self._ip_scope = any(r.scope == "ip" for r in self.rules)
        self._by_route = any(r.routes for r in self.rules)
        self._by_model = any(r.models for r in self.rules)

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
        self, req: Request, facts: RequestFacts | None, body: bytes | None = None
    ) -> tuple[list[Bucket], float, float, Price | None]:
        """The buckets this request fills (budgets first: their refusal is final) and what
        it reserves: (buckets, tokens, money, price). ``body`` is the raw body of ``facts``,
        when at hand (a cheaper prompt estimate)."""
        identity: ForwardKey | None = req.identity
        model = facts.model if facts is not None else None
        now = time.time()
        if not self._span.day_start <= now < self._span.day_end:
            self._span = periods(now)  # budget bucket names change with the day
            self._templates.clear()
        # who the per-key and per-IP buckets belong to, as the template's key (the bucket
        # names are made once, with the template)
        key = (
            identity.id if identity is not None else None,
            None if identity is not None or not self._key_scope else _subject_of_client(req, None),
            (req.client_ip or req.client.peer) if self._ip_scope else None,
            (id(req.ctx), req.path) if self._by_route else None,
            model if self._by_model else None,
        )
        template = self._templates.get(key)
        if template is None or template.identity is not identity:
            if len(self._templates) >= _TEMPLATES_MAX:
                self._templates.clear()
            subjects = self._subjects(req, identity)
            template = self._templates[key] = self._template(req, identity, model, subjects)
        if not template.counted:
            return template.slots, 0.0, 0.0, None  # type: ignore[return-value]
        tokens, cost, price = self.reservation(facts, req.path, body)
        if template.fixed:
            return template.slots, tokens, cost, price  # type: ignore[return-value]
        return self._fill(template.slots, tokens, cost, now), tokens, cost, price

    def _fill(
        self, slots: list[Bucket | _Reserved], tokens: float, cost: float, now: float
    ) -> list[Bucket]:
        out = []
        seeds = self.seeds
        for slot in slots:
            if isinstance(slot, Bucket):
                out.append(slot)
            elif slot.kind == "rate":
                if tokens > 0:
                    out.append(Bucket(slot.name, "rate", slot.limit, MINUTE, tokens, 0.0, "tokens"))
            else:
                end = slot.end
                period = _TOTAL_SECONDS if end is None else end - now
                charge = cost if slot.unit == "cost" else tokens
                seed = seeds.get(slot.name, 0.0)
                out.append(Bucket(slot.name, "quota", slot.limit, period, charge, seed, slot.unit))
        return out

    def _subjects(self, req: Request, identity: ForwardKey | None) -> dict[str, str]:
        subjects = {"global": "global"}
        if self._key_scope:
            subjects["key"] = _subject_of_client(req, identity)
        if self._ip_scope:
            subjects["ip"] = "ip:" + (req.client_ip or req.client.peer)
        return subjects

    def _template(
        self,
        req: Request,
        identity: ForwardKey | None,
        model: str | None,
        subjects: dict[str, str],
    ) -> _Template:
        names = [t.name for t in req.ctx.targets]
        paths = (req.ctx.prefix.rstrip("/") + req.path,)
        limits, budget = self.limits_of(identity)
        rules = [
            (i, rule)
            for i, rule in enumerate(self.rules)
            if (not rule.routes or route_matches(rule.routes, names, paths))
            and rule.matches_model(model)
        ]
        slots: list[Bucket | _Reserved] = []
        if budget and identity is not None:
            slots.extend(_budget_slots(identity.id, budget, self._span))
        for i, rule in rules:
            _add(slots, f"{subjects[rule.scope]}|r{i}", rule.limits)
        if limits and identity is not None:
            _add(slots, f"key:{identity.id}|own", limits)
        counted = any(type(s) is _Reserved for s in slots)
        return _Template(identity, slots, counted, not counted)

    def reservation(
        self, facts: RequestFacts | None, path: str, body: bytes | None = None
    ) -> tuple[float, float, Price | None]:
        """(tokens, money, price) a request reserves; nothing for bodies without tokens."""
        if facts is None:
            return 0.0, 0.0, None
        # an estimate, not tiktoken: a reservation is settled with the real usage later, and
        # an exact count would cost ~100 µs per KiB of prompt here
        prompt = reserve_prompt(body, facts.obj)
        if path == "/v1/embeddings":
            completion = 0
        else:
            most = facts.max_tokens if facts.max_tokens is not None else self.reserve_tokens
            completion = most * max(facts.n, 1)
        model = facts.model
        try:
            price = self._prices[model]
        except KeyError:
            if len(self._prices) >= _TEMPLATES_MAX:
                self._prices.clear()
            price = self._prices[model] = price_for(self.prices, model)
        money = price.cost(prompt, completion) if price is not None else 0.0
        return float(prompt + completion), money, price


def _budget_slots(key_id: str, budget: Budget, span: Periods) -> list[_Reserved]:
    """One reserved slot per budget set: its bucket name, limit and period end."""
    slots = []
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
        slots.append(_Reserved(name, "quota", float(limit), end, what))
    return slots


def _add(out: list[Bucket | _Reserved], prefix: str, limits: Limits) -> None:
    if limits.rpm:
        out.append(Bucket(prefix + "|rpm", "rate", float(limits.rpm), MINUTE, 1.0, 0.0, "requests"))
    if limits.tpm:
        out.append(_Reserved(prefix + "|tpm", "rate", float(limits.tpm), None, "tokens"))
    if limits.concurrent:
        cc = float(limits.concurrent)
        out.append(Bucket(prefix + "|cc", "concurrent", cc, LEASE_SECONDS))


def settle_deltas(
    charge: Charge, tokens: float, cost: float, seeds: dict[str, float] | None = None
) -> list[float]:
    """Per bucket of ``charge``: what to add (actual minus reserved) when the request ends.
    A rate bucket charged at most its whole limit (a larger request waits for a full bucket,
    it is not charged more), so that is what it reserved. ``seeds``, if given, also gets
    each budget's actual spend added: what a store that lost its state restarts from."""
    deltas = []
    for state in charge.decision.states:
        bucket = state.bucket
        unit = bucket.unit
        if unit == "tokens":
            if bucket.kind == "quota":
                deltas.append(tokens - bucket.cost)
                if seeds is not None:
                    seeds[bucket.name] = seeds.get(bucket.name, 0.0) + tokens
            else:
                reserved = bucket.cost
                deltas.append(tokens - (reserved if reserved < bucket.limit else bucket.limit))
        elif unit == "cost":
            deltas.append(cost - bucket.cost)
            if seeds is not None:
                seeds[bucket.name] = seeds.get(bucket.name, 0.0) + cost
        else:  # requests, or a concurrency lease
            deltas.append(0.0)
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
    requests: BucketState | None = None
    tokens: BucketState | None = None
    for state in states:
        bucket = state.bucket
        if bucket.kind != "rate":
            continue
        if bucket.unit == "requests":
            if requests is None or state.remaining < requests.remaining:
                requests = state
        elif tokens is None or state.remaining < tokens.remaining:
            tokens = state
    lines: list[bytes] = []
    if requests is not None:
        lines.append(_rate_lines(b"requests", requests))
    if tokens is not None:
        lines.append(_rate_lines(b"tokens", tokens))
    return lines


_RATE_LINES = {
    suffix: b"x-ratelimit-limit-%b: %%d\r\nx-ratelimit-remaining-%b: %%d\r\nx-ratelimit-reset-%b: "
    % (suffix, suffix, suffix)
    for suffix in (b"requests", b"tokens")
}
# the usual case, a bucket with room that refills within the second: one format, no call
_RATE_LINES_MS = {suffix: lines + b"%dms" for suffix, lines in _RATE_LINES.items()}
_RATE_LINES_TEXT = {suffix: lines + b"%b" for suffix, lines in _RATE_LINES.items()}


def _rate_lines(suffix: bytes, tight: BucketState) -> bytes:
    reset = tight.reset
    # %d writes a float's integer part, as int() would
    if 0 <= reset < 1:
        return _RATE_LINES_MS[suffix] % (
            tight.bucket.limit,
            tight.remaining,
            math.ceil(reset * 1000),
        )
    text = format_reset(reset).encode()
    return _RATE_LINES_TEXT[suffix] % (tight.bucket.limit, tight.remaining, text)


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
