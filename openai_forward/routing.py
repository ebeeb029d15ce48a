"""Which upstream serves a request: by path prefix, then by model. Pure, no I/O."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

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
