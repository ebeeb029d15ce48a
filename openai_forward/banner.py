"""The startup banner: what this gateway will do, as one structured record, secrets masked.

Logged once at start (``startup {...}``) so an operator, or a log pipeline, can see the
effective routes, upstreams, keys by id and backends without reading the configuration.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .config import Config, mask_url
from .eventlog import access_targets, log_target
from .keypool import key_id


def banner(config: Config, host: str, port: int) -> dict[str, Any]:
    """The banner's record. Keys appear by id only; URLs lose their credentials."""
    routes = []
    for up in config.routes:
        routes.append(
            {
                "route": up.route,
                "upstream": up.name,
                "type": up.type,
                "base_url": mask_url(up.base_url),
                "models": list(up.models),
                "keys": [key_id(k.encode()) for k in dict.fromkeys(up.all_keys)],
                "fallbacks": list(up.fallbacks),
                "via_proxy": bool(up.proxy or config.proxy),
            }
        )
    return {
        "version": __version__,
        "listen": http_url(host, port),
        "workers": config.workers,
        "routes": routes,
        "forward_keys": {
            "in_config": [f"cfg_{k.name}" for k in config.forward_keys],
            "store": config.database,
            "client_keys": config.client_keys,
        },
        "limits": {"rules": len(config.limits), "state": _state(config)},
        "usage": {"recording": config.usage, "database": config.database},
        "logs": {
            "access": access_targets(config) or None,
            "format": config.access_log_format,
            "conversations": log_target(config.conversation_log),
        },
        "metrics": _metrics(config),
        "cache": _cache(config),
    }


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _state(config: Config) -> str:
    if config.state:
        return mask_url(config.state)
    return "shared memory" if config.workers > 1 else "memory"


def _metrics(config: Config) -> str | None:
    if not config.metrics:
        return None
    if config.metrics_listen:
        return f"http://{config.metrics_listen}{config.metrics_path}"
    return f"{config.metrics_path} (admin token)"


def _cache(config: Config) -> dict[str, Any] | None:
    if config.cache_mode == "off":
        return None
    from .caching import cache_location

    return {
        "mode": config.cache_mode,
        "store": mask_url(cache_location(config)),
        "ttl": config.cache_ttl,
        "shared": config.cache_shared,
    }
