"""Which upstream serves a request: by path prefix, then by model. Pure, no I/O."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from typing import Any

from .config import UpstreamConfig, _route
from .errors import GatewayError


class Route:
    """The upstreams that share one path prefix."""

    __slots__ = ("by_model", "default", "openai", "prefix", "targets")

    def __init__(self, prefix: str, targets: Sequence[UpstreamConfig]) -> None:
        self.prefix = prefix
        self.targets = tuple(targets)
        no_models = [t for t in self.targets if not t.models]
        self.default = no_models[0] if no_models else self.targets[0]
        self.by_model = len(self.targets) > 1  # several upstreams: the request's model decides
        self.openai = any(t.type == "openai" for t in self.targets)  # /v1 aliases apply

    def pick(self, model: str | None) -> UpstreamConfig:
        """The upstream for ``model``: an exact name first, then the first matching glob,
        then the route's default. Raises 404 model_not_found when nothing serves it."""
        if model is None:
            return self.default
        for target in self.targets:
            if model in target.models:
                return target
        for target in self.targets:
            if any(fnmatch.fnmatchcase(model, pattern) for pattern in target.models):
                return target
        if not self.default.models:
            return self.default
        raise GatewayError(
            404,
            "model_not_found",
            f"The model '{model[:200]}' is not served by this gateway.",
            param="model",
        )

    def serves(self, target: UpstreamConfig, model_id: str) -> bool:
        """Whether ``target`` is where requests for ``model_id`` would go."""
        try:
            return self.pick(model_id) is target
        except GatewayError:
            return False


class Router:
    """Longest-prefix match of canonical paths onto routes, at segment boundaries."""

    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        groups: dict[str, list[UpstreamConfig]] = {}
        for up in upstreams:
            groups.setdefault(_route(up.route), []).append(up)
        self.routes = sorted(
            (Route(prefix, targets) for prefix, targets in groups.items()),
            key=lambda r: len(r.prefix),
            reverse=True,
        )

    def match(self, path: str) -> tuple[Route, str] | None:
        """The route for ``path`` and the path below its prefix (always starting with '/')."""
        for route in self.routes:
            prefix = route.prefix
            if prefix == "/":
                return route, path
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return route, path[len(prefix) :] or "/"
        return None


def _no_duplicate_model(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen and key in _INTERPRETED:
            raise ValueError(f"duplicate {key!r}")
        seen[key] = value
    return seen


# Fields the gateway reads: a duplicate would let two parsers disagree on what was asked.
_INTERPRETED = frozenset({"model", "stream", "stream_options", "n", "max_tokens"})
_INTERPRETED_QUOTED = tuple(f'"{name}"'.encode() for name in _INTERPRETED)


def read_model(body: bytes) -> str | None:
    """The ``model`` of a JSON request body, or None if it names none.

    Raises 400 invalid_json for a body that is not a JSON object or repeats a field the
    gateway interprets (Python keeps the last value, other parsers the first).
    """
    # The duplicate check costs a hook call per object; it is only needed when one of the
    # interpreted names appears twice at all, which a byte count tells cheaply.
    hook = None
    if any(body.count(name) > 1 for name in _INTERPRETED_QUOTED):
        hook = _no_duplicate_model
    try:
        data = json.loads(body, object_pairs_hook=hook)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(
            400, "invalid_json", f"The request body is not valid JSON ({str(exc)[:80]})."
        ) from None
    if not isinstance(data, dict):
        raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise GatewayError(400, "invalid_request", "'model' must be a string.", param="model")
    return model
