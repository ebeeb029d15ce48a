"""The gateway's configuration: one typed, frozen object built once at start.

Sources, later ones winning: defaults, then the environment, then command-line flags.
Every setting has an environment name: ``OPENAI_FORWARD_`` + the key in upper case
(``read_timeout`` -> ``OPENAI_FORWARD_READ_TIMEOUT``). The seed's two variables keep their
names: ``OPENAI_BASE_URL`` (the upstream) and ``OPENAI_API_KEY`` (the default key).
Nothing here runs at import time; :func:`load` reads the environment it is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "OPENAI_FORWARD_"

# Settings whose environment name does not follow the prefix rule (the seed's contract).
ENV_ALIASES = {"base_url": "OPENAI_BASE_URL", "api_key": "OPENAI_API_KEY"}

SECRET_KEYS = frozenset({"api_key"})


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use; the message names the key."""


@dataclass(frozen=True)
class Upstream:
    """Where requests go: scheme, host, port and a path prefix (no trailing slash)."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("ascii")


@dataclass(frozen=True)
class Config:
    """Every setting of a running gateway. Sizes are bytes, times are seconds."""

    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    base_url: str = "https://api.openai.com"
    api_key: str = field(default="", repr=False)
    # upstream side
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    idle_timeout: float = 300.0
    pool_size: int = 1024
    pool_idle_timeout: float = 30.0
    forwarded_for: bool = False
    # client side
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 60.0
    max_request_line: int = 8192
    max_header_size: int = 16384
    max_headers: int = 100
    max_body_size: int = 64 * 1024 * 1024
    max_upload_size: int = 1024 * 1024 * 1024
    health_path: str = "/healthz"
    shutdown_timeout: float = 30.0
    log_level: str = "info"

    @property
    def upstream(self) -> Upstream:
        return parse_base_url(self.base_url)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every secret replaced by a fixed mask."""
        out = dataclasses.asdict(self)
        for key in SECRET_KEYS:
            if out[key]:
                out[key] = "***"
        return out


def parse_base_url(url: str, key: str = "base_url") -> Upstream:
    """Split an upstream base URL; raise ConfigError naming ``key`` when it is unusable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {url!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{key}: {url!r} must not carry credentials, a query or a fragment")
    base_path = parts.path.rstrip("/")
    if any(seg in (".", "..") for seg in base_path.split("/")) or "%" in base_path:
        raise ConfigError(f"{key}: {url!r} has a path that is not plain")
    default = 443 if parts.scheme == "https" else 80
    return Upstream(parts.scheme, parts.hostname, port or default, base_path)


def _convert(key: str, raw: Any, kind: Any) -> Any:
    if kind in ("bool", bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{key}: {raw!r} is not a boolean (expected true or false)")
    if kind in ("int", int):
        try:
            return int(str(raw).strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a whole number") from None
    if kind in ("float", float):
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a number of seconds") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {raw!r} is not a finite number")
        return value
    return str(raw)


def _validate(cfg: Config) -> None:
    cfg_dict = dataclasses.asdict(cfg)
    for f in fields(cfg):
        value = cfg_dict[f.name]
        if f.type in ("float", "int") and value <= 0 and f.name != "port":
            raise ConfigError(f"{f.name}: {value!r} must be greater than zero")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port: {cfg.port!r} is not a TCP port (0-65535)")
    if not 1 <= cfg.workers <= 256:
        raise ConfigError(f"workers: {cfg.workers!r} must be between 1 and 256")
    if not cfg.health_path.startswith("/") or "?" in cfg.health_path:
        raise ConfigError(f"health_path: {cfg.health_path!r} must be a path starting with '/'")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {cfg.log_level!r} is not one of debug, info, warning, error")
    if any(c in cfg.api_key for c in "\r\n\0"):
        raise ConfigError("api_key: contains a control character")
    parse_base_url(cfg.base_url)


def env_name(key: str) -> str:
    """The environment variable that sets ``key``."""
    return ENV_ALIASES.get(key, ENV_PREFIX + key.upper())


def load(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the configuration from ``environ`` and explicit ``overrides`` (CLI flags).

    Raises ConfigError with a message naming the key, the value and what was expected.
    """
    values: dict[str, Any] = {}
    for f in fields(Config):
        name = env_name(f.name)
        if name in environ:
            values[f.name] = _convert(name, environ[name], f.type)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            kind = next(f.type for f in fields(Config) if f.name == key)
            values[key] = _convert(f"--{key.replace('_', '-')}", raw, kind)
    values.setdefault("log_level", "info")
    values["log_level"] = str(values["log_level"]).lower()
    cfg = Config(**values)
    _validate(cfg)
    return cfg
