"""The configuration of limits, budgets and prices: typed, frozen, validated with key paths.

```yaml
limits:                      # each rule gives every subject of its scope its own buckets
  - scope: key               # key (per forward key), ip (per client address) or global
    rpm: 60                  # requests per minute
    tpm: 200000              # tokens per minute (reserved at admission, settled at the end)
    concurrent: 4            # requests in flight (a stream counts until it ends)
    routes: [openai]         # optional: upstream names or path prefixes
    models: ["gpt-4o*"]      # optional: model globs
prices:                      # money per 1M tokens, for budgets and the usage report
  gpt-4o: {input: 2.5, output: 10, cached_input: 1.25}
forward_keys:
  - name: alice
    key: ${ALICE_KEY}
    limits: {rpm: 10, tpm: 20000, concurrent: 2}
    budget: {tokens_per_day: 1000000, cost_per_month: 50}
```
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .config import ConfigError, _str_list, _unknown

SCOPES = ("key", "ip", "global")
BUDGET_FIELDS = (
    "tokens_per_day",
    "tokens_per_month",
    "tokens_total",
    "cost_per_day",
    "cost_per_month",
    "cost_total",
)


@dataclass(frozen=True)
class Limits:
    """Numbers of one limit: 0 means no limit of that kind."""

    rpm: int = 0
    tpm: int = 0
    concurrent: int = 0

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrent)


@dataclass(frozen=True)
class LimitRule:
    """One entry of ``limits:``."""

    scope: str
    limits: Limits
    routes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def matches_model(self, model: str | None) -> bool:
        if not self.models:
            return True
        return model is not None and any(fnmatch.fnmatchcase(model, g) for g in self.models)


@dataclass(frozen=True)
class Budget:
    """A forward key's spending limits per UTC day, UTC month and in total; 0 = none."""

    tokens_per_day: float = 0
    tokens_per_month: float = 0
    tokens_total: float = 0
    cost_per_day: float = 0
    cost_per_month: float = 0
    cost_total: float = 0

    def __post_init__(self) -> None:
        # asked on every request of the key: worked out once
        object.__setattr__(self, "_set", any(getattr(self, name) for name in BUDGET_FIELDS))

    def __bool__(self) -> bool:
        return self._set  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True)
class Price:
    """Money per 1M tokens for models matching ``model`` (a glob)."""

    model: str
    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt: int, completion: int, cached: int = 0) -> float:
        cached = min(max(cached, 0), prompt) if self.cached_input is not None else 0
        rate_cached = self.cached_input if self.cached_input is not None else self.input
        return (
            (prompt - cached) * self.input + cached * rate_cached + completion * self.output
        ) / 1e6


def price_for(prices: tuple[Price, ...], model: str | None) -> Price | None:
    """The first price whose glob matches ``model``: exact names first, then globs in order."""
    if model is None:
        return None
    for price in prices:
        if price.model == model:
            return price
    for price in prices:
        if fnmatch.fnmatchcase(model, price.model):
            return price
    return None


def _number(raw: Any, where: str, whole: bool) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{where}: {raw!r} is not a number")
    try:
        value = float(str(raw).strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: {raw!r} must be a finite number, 0 or more")
    if whole and value != int(value):
        raise ConfigError(f"{where}: {raw!r} must be a whole number")
    return value


def _mapping(raw: Any, where: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for key in raw:
        if key not in known:
            raise _unknown(key, known, where + ".")
    return raw


_LIMIT_NUMBERS = tuple(f.name for f in fields(Limits))


def parse_limits(raw: Any, where: str) -> Limits:
    """``{rpm, tpm, concurrent}``: whole numbers, at least one of them."""
    data = _mapping(raw, where, _LIMIT_NUMBERS)
    values = {k: int(_number(v, f"{where}.{k}", whole=True)) for k, v in data.items()}
    limits = Limits(**values)
    if not limits:
        raise ConfigError(f"{where}: set at least one of rpm, tpm, concurrent (above 0)")
    return limits


def parse_rules(raw: Any) -> tuple[LimitRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("limits: expected a list of rules")
    rules = []
    for i, entry in enumerate(raw):
        where = f"limits[{i}]"
        data = _mapping(entry, where, ("scope", *_LIMIT_NUMBERS, "routes", "models"))
        scope = data.get("scope")
        if scope not in SCOPES:
            raise ConfigError(f"{where}.scope: {scope!r} is not one of key, ip, global")
        numbers = {k: v for k, v in data.items() if k in _LIMIT_NUMBERS}
        rules.append(
            LimitRule(
                scope=scope,
                limits=parse_limits(numbers, where),
                routes=_str_list(data["routes"], f"{where}.routes") if "routes" in data else (),
                models=_str_list(data["models"], f"{where}.models") if "models" in data else (),
            )
        )
    return tuple(rules)


def parse_budget(raw: Any, where: str) -> Budget:
    data = _mapping(raw, where, BUDGET_FIELDS)
    budget = Budget(**{k: _number(v, f"{where}.{k}", whole=False) for k, v in data.items()})
    if not budget:
        raise ConfigError(f"{where}: set at least one of {', '.join(BUDGET_FIELDS)} (above 0)")
    return budget


def parse_prices(raw: Any) -> tuple[Price, ...]:
    if not isinstance(raw, dict):
        raise ConfigError("prices: expected a mapping of model (or glob) to prices")
    out = []
    for model, entry in raw.items():
        where = f"prices.{model}"
        if not isinstance(model, str) or not model:
            raise ConfigError(f"prices: {model!r} is not a model name")
        data = _mapping(entry, where, ("input", "output", "cached_input"))
        for need in ("input", "output"):
            if need not in data:
                raise ConfigError(f"{where}.{need}: is required (money per 1M tokens)")
        cached = data.get("cached_input")
        out.append(
            Price(
                model=model,
                input=_number(data["input"], f"{where}.input", whole=False),
                output=_number(data["output"], f"{where}.output", whole=False),
                cached_input=None
                if cached is None
                else _number(cached, f"{where}.cached_input", whole=False),
            )
        )
    return tuple(out)
