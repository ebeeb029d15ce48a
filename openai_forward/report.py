"""``openai-forward usage``: what was used, per key, model, upstream, day, route or status.

Reads the ``usage`` table of the gateway's database read only (never creates or changes the
file) and prints an aligned table or, with ``--json``, a list of objects whose keys are those
of ``RecordStore.summary``. Without ``--since`` the report covers every row recorded: a
report that hid older rows by default would mislead more than a long one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import Config
from .records import GROUPS, RecordStore, RecordStoreError, parse_since

# (title, summary field) of the numeric columns, in order
_NUMBERS = (
    ("requests", "requests"),
    ("errors", "errors"),
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("cached", "cached_tokens"),
    ("reasoning", "reasoning_tokens"),
    ("total", "total_tokens"),
    ("cost", "cost"),
    ("estimated", "estimated"),
    ("closed", "client_closed"),
    ("avg ms", "avg_duration_ms"),
)
_SUMMED = [field for _, field in _NUMBERS if field != "avg_duration_ms"]


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``usage`` command to ``subparsers`` (what ``add_subparsers()`` returned)."""
    usage = subparsers.add_parser("usage", help="tokens, cost and requests recorded, grouped")
    usage.add_argument(
        "--by", choices=list(GROUPS), default="key", help="how to group the rows (default key)"
    )
    usage.add_argument("--since", help="start: 30m, 24h, 7d or a date such as 2026-11-01 (UTC)")
    usage.add_argument("--until", help="end (exclusive), same forms as --since (default now)")
    usage.add_argument("--key", metavar="NAME|ID", help="only this forward key")
    usage.add_argument("--json", action="store_true", help="JSON for machines")
    usage.add_argument("--config", help="YAML configuration file (or OPENAI_FORWARD_CONFIG)")
    usage.add_argument("--database", help="database file (default openai-forward.db)")
    return usage


def run(args: argparse.Namespace, config: Config) -> int:
    """Print the report; 0 on success (an absent database is an empty report), 1 when the
    database cannot be read, 2 for a malformed ``--since``/``--until``."""
    database = getattr(args, "database", None) or config.database
    now = time.time()
    try:
        since = _point("--since", args.since, now)
        until = _point("--until", args.until, now)
    except ValueError as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 2
    if not os.path.exists(database):
        message = f"no usage recorded yet (database {database} does not exist)"
        if args.json:
            print("[]")
            print(message, file=sys.stderr)
        else:
            print(message)
        return 0
    try:
        with RecordStore(database, readonly=True) as store:
            rows = store.summary(args.by, since, until, args.key)
    except RecordStoreError as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_window(args.by, since, until, args.key))
    for line in table(args.by, rows):
        print(line)
    return 0


def _point(flag: str, text: str | None, now: float) -> float | None:
    if not text:
        return None
    try:
        return parse_since(text, now)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _window(by: str, since: float | None, until: float | None, key: str | None) -> str:
    start = f"since {_when(since)}" if since is not None else "all time"
    end = f" until {_when(until)}" if until is not None else ""
    only = f", key {key}" if key else ""
    return f"usage by {by}, {start}{end}{only} (UTC)"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def table(by: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report as aligned lines: a header, one line per group, a total line. Text is
    left-aligned, numbers right-aligned with thousands separators; the cost column (4
    decimals) appears only when some row has a price."""
    if not rows:
        return ["no usage recorded in this period"]
    labels = ["key", "name"] if by == "key" else [by]
    numbers = [
        (t, f) for t, f in _NUMBERS if f != "cost" or any(r["cost"] is not None for r in rows)
    ]
    lines = [[*labels, *(title for title, _ in numbers)]]
    for row in rows:
        lines.append([*_labels(by, row), *(_number(field, row[field]) for _, field in numbers)])
    total = _total(rows)
    lines.append(["total", *[""] * (len(labels) - 1), *(_number(f, total[f]) for _, f in numbers)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [_align(line, widths, len(labels)) for line in lines]


def _labels(by: str, row: dict[str, Any]) -> list[str]:
    value = row[by]
    if by != "key":
        return ["-" if value is None else str(value)]
    if value is None:
        return ["-", "(no forward key)"]
    return [str(value), row["key_name"] or "-"]


def _number(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if field == "cost":
        return f"{value:,.4f}"
    if field == "avg_duration_ms":
        return f"{value:,.1f}"
    return f"{value:,}"


def _total(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {f: sum(r[f] or 0 for r in rows) for f in _SUMMED}
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    out["cost"] = sum(costs) if costs else None
    weighted = sum(r["avg_duration_ms"] * r["requests"] for r in rows)
    out["avg_duration_ms"] = weighted / out["requests"] if out["requests"] else None
    return out


def _align(cells: list[str], widths: list[int], texts: int) -> str:
    parts = [
        cell.ljust(width) if i < texts else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()
