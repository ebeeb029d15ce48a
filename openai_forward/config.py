"""The gateway's configuration: one typed, frozen object built once at start.

Sources, later ones winning: defaults, then the environment, then command-line flags.
Every setting has an environment name: ``OPENAI_FORWARD_`` + the key in upper case
(``read_timeout`` -> ``OPENAI_FORWARD_READ_TIMEOUT``). The seed's two variables keep their
names: ``OPENAI_BASE_URL`` (the upstream) and ``OPENAI_API_KEY`` (the default key).
Nothing here runs at import time; :func:`load` reads the environment it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .limitconfig import Budget, LimitRule, Limits, Price

ENV_PREFIX = "OPENAI_FORWARD_"

# Settings whose environment name does not follow the prefix rule (the seed's contract).
ENV_ALIASES = {"base_url": "OPENAI_BASE_URL", "api_key": "OPENAI_API_KEY"}


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


AUTH_SCHEMES = ("bearer", "api-key", "x-api-key")
UPSTREAM_TYPES = ("openai", "general")


@dataclass(frozen=True)
class UpstreamConfig:
    """One entry of ``upstreams:``: where a route's requests go and with which key."""

    name: str
    base_url: str
    route: str = "/"
    type: str = "openai"
    api_key: str = field(default="", repr=False)
    keys: tuple[str, ...] = field(default=(), repr=False)
    auth: str = "bearer"
    models: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    proxy: str = field(default="", repr=False)
    stream_usage: bool = True

    @property
    def upstream(self) -> Upstream:
        return parse_base_url(self.base_url)

    @property
    def all_keys(self) -> tuple[str, ...]:
        return ((self.api_key,) if self.api_key else ()) + self.keys


@dataclass(frozen=True)
class ForwardKeyConfig:
    """A forward key written in the configuration (the key itself best as ${ENV})."""

    name: str
    key: str = field(repr=False)
    models: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    expires: str = ""
    limits: Limits | None = None
    budget: Budget | None = None


CLIENT_KEY_MODES = ("auto", "allow", "deny")


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
    max_fallbacks: int = 1
    key_quarantine: float = 300.0
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    proxy: str = field(default="", repr=False)
    database: str = "openai-forward.db"
    client_keys: str = "auto"
    # usage accounting, limits and budgets
    usage: bool = True
    usage_flush_interval: float = 1.0
    state: str = field(default="", repr=False)
    state_timeout: float = 0.1
    state_slots: int = 65536
    reserve_tokens: int = 4096
    # logs and metrics
    access_log: str = "stdout"
    access_log_format: str = "auto"
    log_flush_interval: float = 0.5
    log_max_bytes: int = 100 * 1024 * 1024
    log_backups: int = 10
    log_retention_days: float = 0.0
    conversation_log: str = ""
    conversation_routes: tuple[str, ...] = ()
    conversation_keys: tuple[str, ...] = ()
    conversation_max_bytes: int = 1024 * 1024
    metrics: bool = False
    metrics_path: str = "/metrics"
    metrics_listen: str = ""
    admin_token: str = field(default="", repr=False)
    # response cache
    cache_mode: str = "off"
    cache_store: str = field(default="", repr=False)
    cache_ttl: float = 86400.0
    cache_max_bytes: int = 1024 * 1024 * 1024
    cache_max_entry_bytes: int = 8 * 1024 * 1024
    cache_routes: tuple[str, ...] = ()
    cache_models: tuple[str, ...] = ()
    cache_shared: bool = False
    cache_replay_pace: float = 0.0
    cache_memory_bytes: int = 64 * 1024 * 1024
    cache_memory_ttl: float = 5.0
    cache_prefix: str = "ofw:cache:"
    cache_timeout: float = 0.25
    upstreams: tuple[UpstreamConfig, ...] = ()
    forward_keys: tuple[ForwardKeyConfig, ...] = ()
    limits: tuple[LimitRule, ...] = ()
    prices: tuple[Price, ...] = ()

    @property
    def upstream(self) -> Upstream:
        return parse_base_url(self.base_url)

    @property
    def routes(self) -> tuple[UpstreamConfig, ...]:
        """The configured upstreams, or the one that OPENAI_BASE_URL/OPENAI_API_KEY describe."""
        if self.upstreams:
            return self.upstreams
        return (UpstreamConfig(name="default", base_url=self.base_url, api_key=self.api_key),)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every secret replaced by a fixed mask."""
        out = dataclasses.asdict(self)
        for entry in [out, *out["upstreams"], *out["forward_keys"]]:
            if entry.get("key"):
                entry["key"] = "***"
            for key in ("api_key", "proxy"):
                if entry.get(key):
                    entry[key] = mask_url(entry[key]) if key == "proxy" else "***"
            if entry.get("keys"):
                entry["keys"] = ["***"] * len(entry["keys"])
        out["state"] = mask_url(self.state)
        if out["admin_token"]:
            out["admin_token"] = "***"
        out["cache_store"] = mask_url(self.cache_store)
        return out


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``:
    the form in which a Redis, PostgreSQL or proxy URL may be shown or logged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        masked = userinfo.partition(":")[0] + ":***@" + hostport
        url = url.replace(parts.netloc, masked, 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


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
    if kind == "tuple[str, ...]":
        if isinstance(raw, str):
            raw = [item.strip() for item in raw.split(",") if item.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            raise ConfigError(f"{key}: {raw!r} is not a list of strings (or comma-separated text)")
        return tuple(raw)
    if isinstance(raw, bool):  # YAML 1.1 reads a bare on/off as a boolean
        return "on" if raw else "off"
    return str(raw)


_ZERO_OK = (
    "port",
    "max_fallbacks",
    "log_retention_days",
    "log_backups",
    "cache_replay_pace",
    "cache_memory_bytes",
)
ACCESS_LOG_FORMATS = ("auto", "json", "console")
CACHE_MODES = ("off", "request", "on")


def _validate(cfg: Config) -> None:
    cfg_dict = dataclasses.asdict(cfg)
    for f in fields(cfg):
        value = cfg_dict[f.name]
        if f.type in ("float", "int") and value <= 0 and f.name not in _ZERO_OK:
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
    if cfg.max_fallbacks < 0:
        raise ConfigError(f"max_fallbacks: {cfg.max_fallbacks!r} must be 0 or more")
    if cfg.proxy:
        from .outbound import parse_proxy_url

        parse_proxy_url(cfg.proxy, "proxy")
    access_rules(cfg)
    parse_base_url(cfg.base_url)
    _validate_state(cfg.state)
    _validate_logs(cfg)
    _validate_cache(cfg)


def _validate_cache(cfg: Config) -> None:
    if cfg.cache_mode not in CACHE_MODES:
        raise ConfigError(f"cache_mode: {cfg.cache_mode!r} is not one of off, request, on")
    if cfg.cache_replay_pace < 0:
        raise ConfigError("cache_replay_pace: must be 0 (as fast as the client reads) or more")
    if cfg.cache_store and urlsplit(cfg.cache_store).scheme in ("redis", "rediss", "unix"):
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ConfigError(
                "cache_store: a Redis URL needs the redis package: "
                "pip install 'openai-forward[redis]'"
            ) from None


def _validate_logs(cfg: Config) -> None:
    if cfg.access_log_format not in ACCESS_LOG_FORMATS:
        raise ConfigError(
            f"access_log_format: {cfg.access_log_format!r} is not one of auto, json, console"
        )
    if cfg.log_retention_days < 0:
        raise ConfigError("log_retention_days: must be 0 (keep every file) or more")
    if any(c in cfg.admin_token for c in "\r\n\0 "):
        raise ConfigError("admin_token: contains a space or a control character")
    if cfg.admin_token and len(cfg.admin_token) < 16:
        raise ConfigError("admin_token: use at least 16 characters")
    if not cfg.metrics_path.startswith("/") or "?" in cfg.metrics_path:
        raise ConfigError(f"metrics_path: {cfg.metrics_path!r} must be a path starting with '/'")
    if cfg.metrics_listen:
        listen_address(cfg.metrics_listen, "metrics_listen")
    elif cfg.metrics and not cfg.admin_token:
        raise ConfigError(
            "metrics: /metrics needs admin_token (scrapers send it as a bearer token) or "
            "metrics_listen (a separate address, e.g. 127.0.0.1:9464)"
        )


def listen_address(text: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as (host, port); ConfigError names ``key``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)


def _validate_state(url: str) -> None:
    if not url:
        return
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"state: {mask_url(url)!r} is not a redis://, rediss:// or unix:// URL "
            "(leave it empty for the embedded store)"
        )
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError(
            "state: a Redis URL needs the redis package: pip install 'openai-forward[redis]'"
        ) from None


def access_rules(cfg: Config) -> Any:
    """The IP rules of ``cfg`` (an AccessRules); ConfigError names the setting and index."""
    from .access import AccessRules

    try:
        return AccessRules(cfg.allow_ips, cfg.deny_ips, cfg.trusted_proxies, key="access")
    except ConfigError as exc:
        text = str(exc)
        for inner, outer in _ACCESS_NAMES:
            text = text.replace(inner, outer, 1) if text.startswith(inner) else text
        raise ConfigError(text) from None


_ACCESS_NAMES = (
    ("access.allow", "allow_ips"),
    ("access.deny", "deny_ips"),
    ("access.trusted_proxies", "trusted_proxies"),
)


def env_name(key: str) -> str:
    """The environment variable that sets ``key``."""
    return ENV_ALIASES.get(key, ENV_PREFIX + key.upper())


_LISTS = ("upstreams", "forward_keys", "limits", "prices")
_FLAT = {f.name: f.type for f in fields(Config) if f.name not in _LISTS}
_UPSTREAM_FIELDS = {f.name: f.type for f in fields(UpstreamConfig)}
_FORWARD_KEY_FIELDS = {f.name: f.type for f in fields(ForwardKeyConfig)}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_file(path: str) -> dict[str, Any]:
    """Parse a YAML configuration file into a mapping; ConfigError if it is not one."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of settings at the top")
    return data


def _expand(value: Any, key: str, environ: Mapping[str, str]) -> Any:
    """Replace ``${NAME}`` in strings with the environment's value (secrets stay out of files)."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"{key}: refers to ${{{name}}}, which is not set")
            return environ[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", environ) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k), environ) for k, v in value.items()}
    return value


def _unknown(key: str, known: Any, where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}{key}: unknown setting{hint}")


def _show(key: str, value: Any) -> str:
    """A value for an error message; secrets are never shown."""
    return "(value hidden)" if key.rsplit(".", 1)[-1] in _SECRET_FIELDS else repr(value)


_SECRET_FIELDS = frozenset({"api_key", "keys", "proxy"})


def _str_list(raw: Any, key: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [item.strip() for item in raw.split(",") if item.strip()]
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(f"{key}: {_show(key, raw)} is not a list of non-empty strings")
    return tuple(raw)


def _upstream(raw: Any, i: int) -> UpstreamConfig:
    where = f"upstreams[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with at least name and base_url")
    for key in raw:
        if key not in _UPSTREAM_FIELDS:
            raise _unknown(key, _UPSTREAM_FIELDS, where + ".")
    for key in ("name", "base_url"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: is required (a non-empty string)")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("keys", "models", "fallbacks"):
            values[key] = _str_list(value, f"{where}.{key}")
        elif key == "stream_usage":
            values[key] = _convert(f"{where}.{key}", value, bool)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: {_show(key, value)} is not a string")
        else:
            values[key] = value
    return UpstreamConfig(**values)


def _forward_key(raw: Any, i: int) -> ForwardKeyConfig:
    from .limitconfig import parse_budget, parse_limits

    where = f"forward_keys[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with at least name and key")
    for key in raw:
        if key not in _FORWARD_KEY_FIELDS:
            raise _unknown(key, _FORWARD_KEY_FIELDS, where + ".")
    for key in ("name", "key"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: is required (a non-empty string)")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("models", "routes"):
            values[key] = _str_list(value, f"{where}.{key}")
        elif key == "expires" and not isinstance(value, str):
            values[key] = str(value)  # YAML reads 2027-01-01 as a date
        elif key == "limits":
            values[key] = parse_limits(value, f"{where}.limits")
        elif key == "budget":
            values[key] = parse_budget(value, f"{where}.budget")
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: {_show(key, value)} is not a string")
        else:
            values[key] = value
    return ForwardKeyConfig(**values)


def parse_expiry(text: str, key: str) -> float:
    """An ISO date or date-time (UTC unless it says otherwise) as epoch seconds."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a date such as 2027-01-01") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _validate_forward_keys(cfg: Config) -> None:
    names: set[str] = set()
    for i, fk in enumerate(cfg.forward_keys):
        where = f"forward_keys[{i}]"
        if fk.name in names:
            raise ConfigError(f"{where}.name: {fk.name!r} is used twice")
        names.add(fk.name)
        if not fk.key.startswith("fk-") or len(fk.key) < 32 or any(c in fk.key for c in " \r\n\0"):
            raise ConfigError(
                f"{where}.key: must start with 'fk-' and be at least 32 characters "
                "(openai-forward keys create makes one)"
            )
        if fk.expires:
            parse_expiry(fk.expires, f"{where}.expires")
    if cfg.client_keys not in CLIENT_KEY_MODES:
        raise ConfigError(f"client_keys: {cfg.client_keys!r} is not one of auto, allow, deny")


def _validate_upstreams(cfg: Config) -> None:
    names: dict[str, int] = {}
    defaults: dict[str, str] = {}
    for i, up in enumerate(cfg.upstreams):
        where = f"upstreams[{i}]"
        if not _NAME.fullmatch(up.name):
            raise ConfigError(f"{where}.name: {up.name!r} may hold only letters, digits, . _ -")
        if up.name in names:
            first = names[up.name]
            raise ConfigError(f"{where}.name: {up.name!r} is also upstreams[{first}]'s name")
        names[up.name] = i
        parse_base_url(up.base_url, f"{where}.base_url")
        normal = _route(up.route) if up.route.startswith("/") else ""
        plain = normal == (up.route.rstrip("/") or "/") and not any(c in up.route for c in "?#%")
        if not normal or not plain:
            raise ConfigError(
                f"{where}.route: {up.route!r} must be a plain path such as / or /deepseek"
            )
        if up.type not in UPSTREAM_TYPES:
            raise ConfigError(f"{where}.type: {up.type!r} is not one of openai, general")
        if up.auth not in AUTH_SCHEMES and not _QUERY_AUTH.fullmatch(up.auth):
            raise ConfigError(
                f"{where}.auth: {up.auth!r} is not one of bearer, api-key, x-api-key, query:NAME"
            )
        if up.models and up.type != "openai":
            raise ConfigError(f"{where}.models: only type openai upstreams can route by model")
        if any(c in k for k in up.all_keys for c in "\r\n\0"):
            raise ConfigError(f"{where}.api_key: contains a control character")
        if up.proxy:
            from .outbound import parse_proxy_url

            parse_proxy_url(up.proxy, f"{where}.proxy")
        route = _route(up.route)
        if not up.models:
            if route in defaults:
                raise ConfigError(
                    f"{where}.route: {route!r} is served by {defaults[route]!r} and {up.name!r}, "
                    "and neither lists models: which one gets a request would be ambiguous"
                )
            defaults[route] = up.name
    for i, up in enumerate(cfg.upstreams):
        for name in up.fallbacks:
            if name not in names or name == up.name:
                raise ConfigError(
                    f"upstreams[{i}].fallbacks: {name!r} is not the name of another upstream"
                )


_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_QUERY_AUTH = re.compile(r"query:[A-Za-z0-9_.-]+")


def _route(route: str) -> str:
    """A route prefix without its trailing slash ("/" stays "/")."""
    from .paths import PathError, canonicalize

    try:
        canonical = canonicalize(route)
    except PathError:
        return ""
    return canonical.rstrip("/") or "/"


def _yaml_value(name: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: is not valid YAML or JSON") from None


def _parse_lists(lists: Mapping[str, Any]) -> dict[str, Any]:
    """The structured settings (upstreams, forward_keys, limits, prices), parsed."""
    from .limitconfig import parse_prices, parse_rules

    out: dict[str, Any] = {}
    for key, raw in lists.items():
        if raw is None:
            continue
        if key == "limits":
            out[key] = parse_rules(raw)
        elif key == "prices":
            out[key] = parse_prices(raw)
        elif not isinstance(raw, list):
            what = "upstreams" if key == "upstreams" else "keys"
            raise ConfigError(f"{key}: expected a list of {what}")
        elif key == "upstreams":
            out[key] = tuple(_upstream(entry, i) for i, entry in enumerate(raw))
        else:
            out[key] = tuple(_forward_key(entry, i) for i, entry in enumerate(raw))
    return out


def load(
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    file: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: ``file`` (parsed YAML) < ``environ`` < ``overrides`` (flags).

    Raises ConfigError with a message naming the key, the value and what was expected.
    """
    values: dict[str, Any] = {}
    lists: dict[str, Any] = {}
    data = _expand(dict(file or {}), "", environ)
    for key, raw in data.items():
        if key in _LISTS:
            lists[key] = raw
        elif key in _FLAT:
            values[key] = _convert(str(key), raw, _FLAT[key])
        else:
            raise _unknown(key, [*_FLAT, *_LISTS], "")
    for key, kind in _FLAT.items():
        name = env_name(key)
        if name in environ:
            values[key] = _convert(name, environ[name], kind)
    for key in _LISTS:
        name = env_name(key)
        if name in environ:
            lists[key] = _yaml_value(name, environ[name])
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _convert(f"--{key.replace('_', '-')}", raw, _FLAT[key])
    values.update(_parse_lists(lists))
    values["log_level"] = str(values.get("log_level", "info")).lower()
    cfg = Config(**values)
    _validate(cfg)
    _validate_upstreams(cfg)
    _validate_forward_keys(cfg)
    return cfg
