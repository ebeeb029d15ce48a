"""Command line: parse flags, build the configuration, hand it to the server or the key store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import Config, ConfigError, load, parse_expiry, read_file

_POLICY_FLAGS = (
    ("rpm", "requests per minute for this key"),
    ("tpm", "tokens per minute for this key"),
    ("concurrent", "requests in flight at once for this key"),
    ("tokens_per_day", "token budget per UTC day"),
    ("tokens_per_month", "token budget per UTC month"),
    ("tokens_total", "token budget in total"),
    ("cost_per_day", "spending budget per UTC day (the prices table's money)"),
    ("cost_per_month", "spending budget per UTC month"),
    ("cost_total", "spending budget in total"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-forward",
        description="A fast, transparent forwarding gateway for the OpenAI API.",
    )
    parser.add_argument("--version", action="version", version=f"openai-forward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="start the gateway")
    check = sub.add_parser("check", help="validate the configuration and print it, secrets masked")
    for command in (run, check):
        command.add_argument("--config", help="YAML configuration file (or OPENAI_FORWARD_CONFIG)")
        command.add_argument("--host", help="address to listen on (default 0.0.0.0)")
        command.add_argument("--port", help="port to listen on (default 8000)")
        command.add_argument("--workers", help="worker processes serving the port (default 1)")
        command.add_argument(
            "--base-url", help="upstream base URL (default https://api.openai.com)"
        )
        command.add_argument("--log-level", help="debug, info, warning or error (default info)")
    keys = sub.add_parser("keys", help="create, list and revoke forward keys")
    keys.add_argument("--config", help="YAML configuration file (or OPENAI_FORWARD_CONFIG)")
    keys.add_argument("--database", help="key store file (default openai-forward.db)")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once, never again")
    create.add_argument("--name", required=True, help="who the key is for (unique)")
    create.add_argument("--models", default="", help="allowed model globs, comma-separated")
    create.add_argument(
        "--routes", default="", help="allowed path prefixes or upstream names, comma-separated"
    )
    create.add_argument("--expires", help="expiry date, e.g. 2027-01-01 (UTC)")
    for flag, text in _POLICY_FLAGS:
        create.add_argument("--" + flag.replace("_", "-"), dest=flag, help=text)
    listing = actions.add_parser("list", help="names, ids, prefixes, scopes and expiry")
    listing.add_argument("--json", action="store_true", help="JSON for machines")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = actions.add_parser("revoke", help="refuse a key from now on (every worker, < 1 s)")
    revoke.add_argument("key", metavar="NAME|ID")
    for action in (create, listing, revoke):  # also accepted after the action
        action.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        action.add_argument("--database", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    from . import cachestore, logexport, report

    report.add_parser(sub)
    logexport.add_parser(sub)
    cachestore.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    skip = (
        *("command", "config", "action", "name", "models", "routes", "expires", "json", "all"),
        *("by", "since", "until", "logs_action", "file", "format", "model", "output", "cache"),
        *(flag for flag, _ in _POLICY_FLAGS),
    )
    overrides = {k: v for k, v in vars(args).items() if k not in (*skip, "key")}
    path = args.config or os.environ.get("OPENAI_FORWARD_CONFIG")
    try:
        config = load(os.environ, overrides, read_file(path) if path else None)
    except ConfigError as exc:
        print(f"openai-forward: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        shown = config.masked()
        shown["key_pools"] = _key_pools(config)
        print(json.dumps(shown, indent=2))
        return 0
    if args.command == "keys":
        return _keys(args, config)
    if args.command == "usage":
        from . import report

        return report.run(args, config)
    if args.command == "cache":
        from .cachestore import command
        from .caching import cache_location

        return command(
            args.action,
            args.cache or cache_location(config),
            as_json=args.json,
            max_bytes=config.cache_max_bytes,
            prefix=config.cache_prefix,
        )
    if args.command == "logs":
        from . import logexport

        return logexport.run(args, config.conversation_log)
    from .server import serve

    return serve(config)


def _key_pools(config: Config) -> dict[str, str]:
    """Each upstream's key pool as a worker starts it (ids only, never keys)."""
    from .keypool import KeyPool

    return {
        up.name: repr(KeyPool(up.all_keys, quarantine=config.key_quarantine))
        for up in config.routes
        if up.all_keys
    }


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _keys(args: argparse.Namespace, config: Config) -> int:
    from .keystore import KeyStore, KeyStoreError

    try:
        store = KeyStore(config.database)
        try:
            return _key_action(args, store)
        finally:
            store.close()
    except (KeyStoreError, ConfigError) as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 1


def _key_action(args: argparse.Namespace, store: Any) -> int:
    if args.action == "create":
        expires = parse_expiry(args.expires, "--expires") if args.expires else None
        limits, budget = _policy(args)
        record, key = store.create(
            args.name,
            models=_split(args.models),
            routes=_split(args.routes),
            expires_at=expires,
            limits=limits,
            budget=budget,
        )
        print(key)
        print(
            f"created {record.name} ({record.id}); this is the only time the key is shown",
            file=sys.stderr,
        )
        return 0
    if args.action == "revoke":
        record = store.revoke(args.key)
        print(f"revoked {record.name} ({record.id})")
        return 0
    rows = [_row(k) for k in store.list(include_revoked=args.all)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("name", "id", "prefix", "models", "routes", "limits", "budget", "expires", "state")
    table = [columns, *[tuple(str(r[c]) for c in columns) for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _row(key: Any) -> dict[str, Any]:
    now = time.time()
    state = "revoked" if key.revoked_at else ("active" if key.active(now) else "expired")
    expires = (
        time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.expires_at)) if key.expires_at else "-"
    )
    return {
        "name": key.name,
        "id": key.id,
        "prefix": key.prefix,
        "models": ",".join(key.models) or "*",
        "routes": ",".join(key.routes) or "*",
        "limits": _numbers(key.limits),
        "budget": _numbers(key.budget),
        "expires": expires,
        "state": state,
    }


def _policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The limits and budget asked for with ``keys create`` flags (None where none)."""
    from .limitconfig import BUDGET_FIELDS, parse_budget, parse_limits

    given = {flag: getattr(args, flag) for flag, _ in _POLICY_FLAGS if getattr(args, flag, None)}
    limit_part = {k: v for k, v in given.items() if k not in BUDGET_FIELDS}
    budget_part = {k: v for k, v in given.items() if k in BUDGET_FIELDS}
    limits = parse_limits(limit_part, "--limits") if limit_part else None
    budget = parse_budget(budget_part, "--budget") if budget_part else None
    return limits, budget


def _numbers(policy: Any) -> str:
    """``rpm=10,concurrent=2``: the non-zero numbers of a Limits or Budget, or ``-``."""
    if not policy:
        return "-"
    values = dataclasses.asdict(policy)
    return ",".join(f"{k}={v:g}" for k, v in values.items() if v)
