"""Configured upstreams at run time, and the union of what a shared route's upstreams serve."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote_from_bytes

from .config import UpstreamConfig
from .keypool import KeyPool
from .routing import Route
from .upstream import Pool


class Target:
    """A configured upstream at run time: its pool, and how requests to it are written."""

    __slots__ = (
        "auth",
        "base",
        "config",
        "fallbacks",
        "header_name",
        "host_line",
        "keys",
        "name",
        "pool",
        "query_key",
    )

    def __init__(self, config: UpstreamConfig, pool: Pool, quarantine: float = 300.0) -> None:
        up = config.upstream
        self.config = config
        self.name = config.name
        self.pool = pool
        self.base = up.base_path.encode()
        self.host_line = b"host: " + up.host_header
        self.auth = config.auth
        # how a client's own key looks in this scheme, besides Authorization
        auth = config.auth
        self.header_name = auth.encode() if auth in ("api-key", "x-api-key") else None
        self.query_key = auth[6:].encode() + b"=" if auth.startswith("query:") else None
        self.keys = KeyPool(config.all_keys, quarantine=quarantine) if config.all_keys else None
        self.fallbacks: tuple[Target, ...] = ()

    def any_key(self, now: float) -> bytes | None:
        """A ready key for the gateway's own small requests (no in-flight accounting)."""
        if self.keys is None:
            return None
        key = self.keys.acquire(now)
        if key is None:
            return None
        self.keys.release(key)
        return key.secret

    def credential(self, key: bytes) -> tuple[bytes | None, bytes | None]:
        """(header line, query parameter) that carries ``key`` in this upstream's scheme."""
        auth = self.auth
        if auth == "bearer":
            return b"authorization: Bearer " + key, None
        if auth == "api-key" or auth == "x-api-key":
            return auth.encode() + b": " + key, None
        return None, auth[6:].encode() + b"=" + quote_from_bytes(key, safe="").encode()


def model_list(result: object) -> list[Any] | None:
    """The ``data`` of a successful /v1/models answer (``(status, body)``), or None."""
    if not isinstance(result, tuple) or result[0] != 200:
        return None
    try:
        data = json.loads(result[1]).get("data")
    except (ValueError, AttributeError):
        return None
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None


def union_models(route: Route, targets: Sequence[Target], results: Sequence[object]) -> list[Any]:
    """Each upstream's models where the route would send them, first listing wins. An
    upstream that did not answer contributes the exact names its configuration lists."""
    models: list[Any] = []
    seen: set[str] = set()
    for target, result in zip(targets, results, strict=True):
        listed = model_list(result)
        if listed is None:
            listed = [
                {"id": m, "object": "model", "created": 0, "owned_by": target.name}
                for m in target.config.models
                if not any(c in m for c in "*?[")
            ]
        for item in listed:
            model_id = item.get("id")
            fresh = isinstance(model_id, str) and model_id not in seen
            if fresh and route.serves(target.config, model_id):
                seen.add(model_id)
                models.append(item)
    return models
