"""Command line: parse flags, build the configuration, hand it to the server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, load, read_file


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    path = args.config or os.environ.get("OPENAI_FORWARD_CONFIG")
    try:
        config = load(os.environ, overrides, read_file(path) if path else None)
    except ConfigError as exc:
        print(f"openai-forward: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(json.dumps(config.masked(), indent=2))
        return 0
    from .server import serve

    return serve(config)
