"""Fine-tuning data from the conversation log: ``openai-forward logs export``.

The conversation log holds one JSON object per line (written by the gateway): the request's
access-log fields (``time``, ``request_id``, ``key_id``, ``key_name``, ``path``, ``model``,
``status``, ``error_code``, the token counts...), then ``request`` (the request's JSON body)
and ``reply`` (``ReplyAssembler.result()``, or the answer as it came). Lines of earlier
versions, with ``ts`` (Unix seconds) and ``error`` instead, are read too.

:func:`export` reads such files, filters the records and writes them out as OpenAI's chat
fine-tuning JSONL (one training example per successful chat completion) or as the records
themselves. Each line is read once; nothing is held beyond one record.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, cast

import orjson

from .logfile import rotated_paths
from .records import parse_since

FORMATS = ("openai-chat", "jsonl")
CHAT = "/v1/chat/completions"

# Fine-tuning accepts these fields per role and rejects others (audio, reasoning, ...).
# "developer" messages are sent as "system": the supervised format has no developer role.
_FIELDS = {
    "system": ("content", "name"),
    "user": ("content", "name"),
    "assistant": ("content", "refusal", "name", "tool_calls", "function_call"),
    "tool": ("content", "tool_call_id"),
    "function": ("content", "name"),
}
_ROLE = {"developer": "system"}
# input content the supervised method takes: text and images (not audio or files)
_PARTS = frozenset({"text", "image_url", "refusal"})
# answers not to learn from: cut short (by the client leaving, max_tokens, a filter, a fault)
_UNFINISHED = frozenset({None, "length", "content_filter", "error"})


@dataclass
class ExportStats:
    """What an export read: ``bad`` lines that are not a JSON object (a truncated last
    line, say), ``filtered`` records outside the filters, ``unusable`` records the format
    cannot take (failed, truncated, not a chat completion, audio input...)."""

    read: int = 0
    written: int = 0
    bad: int = 0
    filtered: int = 0
    unusable: int = 0


def export(
    paths: list[str],
    out: IO[str],
    fmt: str,
    since: float | None,
    until: float | None,
    key: str | None,
    model: str | None,
    *,
    stats: ExportStats | None = None,
) -> int:
    """Write the records of the log files ``paths`` to ``out`` in format ``fmt``; return how
    many were written.

    Each path stands for its rotated files too (``path.N`` ... ``path.1``, ``path``, oldest
    first); a file named twice, directly or so, is read once. Files ending in ``.gz`` are
    read gzip-compressed. All files are opened before any is read, so a rotation meanwhile
    neither skips nor repeats records.

    Filters: ``since <= ts < until``; ``key`` equal to the record's ``key_id`` or
    ``key_name``; ``model`` equal to the reply's or the request's model.

    ``fmt``: ``"openai-chat"`` or ``"jsonl"`` (the records as logged). ``openai-chat`` is
    OpenAI's chat fine-tuning format: a chat completion with status 200, no ``error``, an
    untruncated reply whose first choice finished (not ``length``, ``content_filter``, or
    cut off) becomes ``{"messages": [...the request's messages..., that choice's message],
    "tools"?, "parallel_tool_calls"?, "functions"?}``. Messages keep only the fields the
    format takes; ``developer`` messages become ``system``; a record with audio or file
    input is left out (fine-tuning takes text and images only).

    Raises ValueError for another format and OSError for a file that cannot be opened; bad
    lines are skipped and counted in ``stats``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else ExportStats()
    with ExitStack() as stack:
        files = [stack.enter_context(_open(name)) for name in _expand(paths)]
        for file in files:
            for raw in _lines(file, stats):
                stats.read += 1
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    record = None
                if type(record) is not dict:
                    stats.bad += 1
                elif not _selected(record, since, until, key, model):
                    stats.filtered += 1
                elif (text := _render(fmt, record, raw)) is None:
                    stats.unusable += 1
                else:
                    out.write(text)
                    stats.written += 1
    return stats.written


def _lines(file: IO[bytes], stats: ExportStats) -> Iterator[bytes]:
    try:
        yield from file
    except (EOFError, OSError, zlib.error):  # a compressed file cut short or corrupt
        stats.bad += 1


def _render(fmt: str, record: dict[str, Any], raw: bytes) -> str | None:
    if fmt == "jsonl":
        return raw.decode("utf-8", "replace").rstrip("\r\n") + "\n"
    example = _chat_example(record)
    return None if example is None else orjson.dumps(example).decode() + "\n"


def _expand(paths: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for path in paths:
        names = rotated_paths(path) or [path]  # nothing there: open() raises OSError
        for name in names:
            real = os.path.realpath(name)
            if real not in seen:
                seen.add(real)
                out.append(name)
    return out


def _open(name: str) -> IO[bytes]:
    if name.endswith(".gz"):
        return cast(IO[bytes], gzip.GzipFile(name, "rb"))
    return open(name, "rb")


def _selected(
    record: dict[str, Any],
    since: float | None,
    until: float | None,
    key: str | None,
    model: str | None,
) -> bool:
    if since is not None or until is not None:
        ts = _record_time(record)
        if ts is None:
            return False
        if (since is not None and ts < since) or (until is not None and ts >= until):
            return False
    if key is not None and key not in (record.get("key_id"), record.get("key_name")):
        return False
    if model is not None:
        request = record.get("request")
        asked = request.get("model") if type(request) is dict else None
        if model not in (record.get("model"), asked):
            return False
    return True


def _record_time(record: dict[str, Any]) -> float | None:
    """When the request started, in Unix seconds: its ``time`` (ISO 8601, as the access log
    writes it), or the ``ts`` of an earlier version's line; None if neither is readable."""
    ts = record.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return float(ts)
    text = record.get("time")
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def _chat_example(record: dict[str, Any]) -> dict[str, Any] | None:
    """The fine-tuning example of one logged chat completion, or None if it is not one."""
    request, reply = record.get("request"), record.get("reply")
    failed = record.get("error_code") or record.get("error")  # "error": an earlier version's
    if record.get("path") != CHAT or record.get("status") != 200 or failed:
        return None
    if type(request) is not dict or type(reply) is not dict or reply.get("truncated"):
        return None
    messages = request.get("messages")
    choices = reply.get("choices")
    if type(messages) is not list or type(choices) is not list or not choices:
        return None
    first = next((c for c in choices if type(c) is dict and c.get("index") == 0), choices[0])
    if type(first) is not dict or first.get("finish_reason") in _UNFINISHED:
        return None
    answer = _message(first.get("message"), assistant=True)
    if answer is None or not any(k in answer for k in ("content", "tool_calls", "function_call")):
        return None
    converted = [_message(message) for message in messages]
    if any(message is None for message in converted):
        return None
    example: dict[str, Any] = {"messages": [*converted, answer]}
    for name in ("tools", "functions"):
        value = request.get(name)
        if type(value) is list and value:
            example[name] = value
    if "tools" in example and type(request.get("parallel_tool_calls")) is bool:
        example["parallel_tool_calls"] = request["parallel_tool_calls"]
    return example


def _message(message: object, assistant: bool = False) -> dict[str, Any] | None:
    """A request or reply message in the fine-tuning shape; None if it cannot be one."""
    if type(message) is not dict:
        return None
    role = message.get("role", "assistant" if assistant else None)
    role = _ROLE.get(role, role) if type(role) is str else None
    fields = _FIELDS.get(role) if role is not None else None
    if fields is None or (assistant and role != "assistant"):
        return None
    out: dict[str, Any] = {"role": role}
    for name in fields:
        value = message.get(name)
        if value is None or (name == "content" and value == "" and role == "assistant"):
            continue
        if name == "content" and type(value) is list and not _plain_parts(value):
            return None
        out[name] = _calls(value) if name == "tool_calls" else value
    return out


def _plain_parts(parts: list[Any]) -> bool:
    return all(type(part) is dict and part.get("type") in _PARTS for part in parts)


def _calls(calls: object) -> list[dict[str, Any]]:
    # only what the schema has: id, type, function {name, arguments}
    out = []
    for call in calls if type(calls) is list else ():
        if type(call) is dict:
            function = call.get("function")
            function = function if type(function) is dict else {}
            out.append(
                {
                    "id": call.get("id"),
                    "type": call.get("type") or "function",
                    "function": {
                        "name": function.get("name"),
                        "arguments": function.get("arguments"),
                    },
                }
            )
    return out


def parse_time(text: str, now: float) -> float:
    """A point in time for ``--since``/``--until``: unix seconds (``1760000000``), or what
    ``usage --since`` takes (``records.parse_since``): an ISO 8601 date or date-time
    (``2026-01-31``, ``2026-01-31T08:00``, ``...Z``; UTC unless it has an offset), or an
    age before ``now`` (``90s``, ``30m``, ``12h``, ``7d``, ``2w``). Raises ValueError naming
    the text otherwise; eight digits (``20260131``, a date without its dashes, or a unix
    second of 1970) are refused as ambiguous."""
    value = text.strip()
    if value.replace(".", "", 1).isdigit():
        if len(value.partition(".")[0]) == 8:
            raise ValueError(f"{text!r} is not a time: for a date write 2026-01-31")
        return float(value)
    if value:
        try:
            return parse_since(value, now)
        except ValueError:
            pass
    raise ValueError(f"{text!r} is not a time: use 2026-01-31, 2026-01-31T08:00, 7d or 12h")


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``logs export`` to ``subparsers`` (what ``add_subparsers()`` returned)."""
    logs = subparsers.add_parser("logs", help="export the conversation log")
    actions = logs.add_subparsers(dest="logs_action", metavar="ACTION", required=True)
    export_cmd = actions.add_parser(
        "export", help="conversations as fine-tuning JSONL (or the raw records)"
    )
    export_cmd.add_argument("--config", help="YAML configuration file (or OPENAI_FORWARD_CONFIG)")
    export_cmd.add_argument(
        "--file",
        action="append",
        metavar="PATH",
        help="conversation log file (default: conversation_log); its rotations are read too",
    )
    export_cmd.add_argument(
        "--format", choices=list(FORMATS), default="openai-chat", help="default openai-chat"
    )
    export_cmd.add_argument("--since", help="start: unix seconds, a UTC date/time, or 30m, 7d")
    export_cmd.add_argument("--until", help="end (exclusive), same forms as --since")
    export_cmd.add_argument("--key", metavar="NAME|ID", help="only this forward key")
    export_cmd.add_argument("--model", help="only this model")
    export_cmd.add_argument("--output", default="-", help="file to write (default: stdout)")
    return logs


def run(args: argparse.Namespace, conversation_log: str) -> int:
    """``logs export``: 0 on success, 1 when a file cannot be read or written, 2 for bad
    arguments. A summary goes to stderr."""
    paths = args.file or ([conversation_log] if conversation_log else [])
    if not paths:
        print(
            "openai-forward: no conversation log: set conversation_log or pass --file",
            file=sys.stderr,
        )
        return 2
    now = time.time()
    try:
        since = parse_time(args.since, now) if args.since is not None else None
        until = parse_time(args.until, now) if args.until is not None else None
    except ValueError as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 2
    stats = ExportStats()
    try:
        if args.output == "-":
            export(paths, sys.stdout, args.format, since, until, args.key, args.model, stats=stats)
        else:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file too: it holds conversations
            with open(fd, "w", encoding="utf-8") as out:
                export(paths, out, args.format, since, until, args.key, args.model, stats=stats)
    except OSError as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {stats.written} of {stats.read} records ({stats.filtered} filtered, "
        f"{stats.unusable} not usable, {stats.bad} bad lines)",
        file=sys.stderr,
    )
    return 0
