"""The access log and the conversation log, fed from the event the usage records get.

When a request ends, the worker's :class:`EventLog` receives its usage row (the same dict
the usage records get, in the access line's order already) and, for a request whose
conversation is logged, its finished account: the raw request body, and the response bytes
as the upstream sent them, kept by its usage observer (or a :class:`Capture`). ``add`` makes
the request's lines there and then, on the event loop, while what they are made of is still
in the CPU's cache; only an answer longer than ``INLINE_ANSWER`` is left for the writer
thread to assemble. Every ``log_flush_interval`` seconds (or every ``BATCH`` requests) the
thread appends the lines to standard output or to rotating files.

Why the loop formats: in CPython a thread runs Python only while it holds the GIL, so a
writer thread that formats never runs beside the loop, it takes turns with it, and every
turn costs a GIL hand-over, a context switch and cold caches. Measured (docs/performance.md),
logging cost twice as much CPU per request with the formatting on the thread as on the loop.
The thread keeps what can block: the writes, which release the GIL. (The metrics are fed
from the same moment, in ``Meter.finish``.)

A line never holds a secret: keys appear by id and name only, and the conversation log holds
bodies, never headers. ``orjson`` escapes every control character in strings, and the
console format writes strings with Python's escapes, so a client cannot forge a line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson

from .conversation import CHAT, ReplyAssembler
from .plainreply import plain_chat_reply
from .records import UsageRow

if TYPE_CHECKING:
    from .config import Config
    from .usage import JsonUsage, StreamUsage

log = logging.getLogger("openai_forward")

MAX_PENDING = 100_000  # lines of one log waiting for the writer thread, at most
BATCH = 256  # requests that wake the writer thread before its interval is up
INLINE_ANSWER = 64 * 1024  # answers up to this size get their line made on the loop
MAX_PENDING_BYTES = 256 * 1024 * 1024  # conversation lines waiting for the writer, at most


class Sink(Protocol):
    def write(self, lines: list[bytes]) -> None: ...
    def close(self) -> None: ...


class Capture:
    """A logged answer's bytes as relayed, up to ``cap``, when its usage observer does not
    keep them itself (an encoded answer, or one without an observer)."""

    __slots__ = ("cap", "pieces", "seen_bytes", "truncated")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.pieces: list[bytes] = []
        self.seen_bytes = 0  # bytes kept (named as the observers' count, which add() reads)
        self.truncated = False

    def keep(self, data: bytes) -> None:
        size = self.seen_bytes + len(data)
        if size > self.cap:
            self.truncated = True
            self.cap = -1  # nothing more fits
            return
        self.pieces.append(data)
        self.seen_bytes = size


class Conversation(Protocol):
    """What the writer thread reads of a logged request: its account
    (``accounting.Account``), which nothing changes once the request has ended."""

    @property
    def log_body(self) -> bytes | None: ...  # the request body as the client sent it
    @property
    def body(self) -> bytes | None: ...  # the body the loop parsed ``facts`` from, if it did
    @property
    def facts(self) -> object | None: ...
    @property
    def observer(self) -> JsonUsage | StreamUsage | None: ...  # keeps the answer's pieces ...
    @property
    def capture(self) -> Capture | None: ...  # ... when it can; else this does
    @property
    def sse(self) -> bool: ...  # the answer is text/event-stream
    @property
    def encoding(self) -> bytes | None: ...  # its content-encoding


# One finished request as the logs see it: its usage row (the one the usage records get,
# see records.UsageRow) and, when its conversation is logged, the request's account.
Event = tuple[UsageRow, Conversation | None]
# A pending conversation line: made, or left to the writer thread (row, account, access line).
Talk = bytes | tuple[UsageRow, Conversation, bytes]


def json_line(row: UsageRow) -> bytes:
    """The access log's JSON line: the row as it is (its keys are in the line's order
    already), with the time in ISO 8601, the method as text and the flags as booleans.
    (The row's flags are ints: the sqlite3 module binds an int at once, a bool only after
    looking for an adapter, about 3,000 instructions each.)"""
    line = row.copy()
    line["time"] = _iso(row["time"])
    line["method"] = row["method"].decode("latin-1")
    line["stream"] = _BOOL[row["stream"]]
    line["estimated"] = _BOOL[row["estimated"]]
    line["client_closed"] = _BOOL[row["client_closed"]]
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


_BOOL = (False, True)  # a row's 0/1 flag as JSON's false/true


def console_line(row: UsageRow) -> bytes:
    """A line for a person at a terminal: time, status, method, path, who, where, how long."""
    parts = [
        _iso(row["time"])[11:23],
        str(row["status"]),
        _safe(row["method"].decode("latin-1")),
        _safe(row["path"]),
        f"key={_safe(row['key_name'] or row['key_id'] or '-')}",
        f"ip={_safe(row['client_ip'])}",
    ]
    if row["upstream"]:
        parts.append(f"-> {_safe(row['upstream'])}")
    if row["model"]:
        parts.append(f"model={_safe(row['model'])}")
    if row["prompt_tokens"] or row["completion_tokens"]:
        mark = "~" if row["estimated"] else ""
        parts.append(f"tokens={mark}{row['prompt_tokens']}+{row['completion_tokens']}")
    if row["cache"] is not None:
        parts.append(f"cache={row['cache']}")
    if row["ttfb_ms"] is not None:
        parts.append(f"ttfb={row['ttfb_ms']:.1f}ms")
    parts.append(f"{row['duration_ms']:.1f}ms")
    if row["error_code"]:
        parts.append(f"error={_safe(row['error_code'])}")
    parts.append(f"id={row['request_id']}")
    return " ".join(parts).encode() + b"\n"


def _safe(text: str) -> str:
    """``text`` with control characters, quotes and non-ASCII escaped (one line, always)."""
    if text.isascii() and text.isprintable():
        return text
    return ascii(text)[1:-1]  # (repr would leave printable non-ASCII as it is)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _iso(ts: float) -> str:
    """``ts`` (>= 0) as UTC ISO 8601 with milliseconds: 2026-11-25T06:37:58.663Z."""
    whole = int(ts)
    if _second[0] != whole:  # one datetime per second of log, not per line
        stamp = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0], _second[1] = whole, stamp
    second: str = _second[1]
    return second + _MILLIS[int((ts - whole) * 1000)]


def conversation_line(row: UsageRow, conv: Conversation, cap: int, head: bytes) -> bytes | None:
    """The conversation log's line of a request: its access line's fields (``head``, the
    JSON line of ``row``), then ``request`` and ``reply``; None if the body is not a JSON
    object. The body, and an answer already read as one JSON object, go into the line as
    they came, not serialised again."""
    body = conv.log_body
    assert body is not None
    if conv.facts is None or conv.body is not body:  # else the loop read it as an object
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(request) is not dict:
            return None
    if 10 in body or 13 in body:  # LF, CR (ints: a bytes operand costs a raised TypeError)
        body = _one_line(body)
    return b"".join(
        (
            head[:-2],  # without its closing brace and line break
            b',"request":',
            body,
            b',"reply":',
            _reply(row["path"], conv, cap) if row["status"] < 300 else b"null",
            b"}\n",
        )
    )


def _reply(path: str, conv: Conversation, cap: int) -> bytes:
    """The record's reply: the answer's own JSON bytes when they can go in as they came,
    else what it serialises to (see the conversation log's docs)."""
    capture = conv.capture
    observer = conv.observer
    if capture is not None:
        pieces = capture.pieces
        truncated = capture.truncated
        valid = False
    elif observer is not None and observer.kept is not None:
        pieces = observer.kept
        truncated = observer.seen_bytes > cap
        if truncated:
            pieces = fitting(pieces, cap)
        valid = observer.whole_object
    else:
        return b"null"
    if not pieces and not truncated:
        return b"null"
    encoding = conv.encoding
    plain = encoding in _PLAIN
    if valid and not truncated:  # (valid: a plain answer the observer read as one object)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return _one_line(data) if 10 in data or 13 in data else data
    reply: Any = None
    if not conv.sse:
        reply = _plain_reply(path, pieces) if plain and not truncated else None
    elif path == CHAT and plain and not truncated:
        reply = plain_chat_reply(b"".join(pieces), cap)
    if reply is None:
        assembler = ReplyAssembler(path, conv.sse, encoding or b"", cap)
        for piece in pieces:
            assembler.feed(piece)
        reply = assembler.result()
    if truncated:
        reply = {**(reply if isinstance(reply, dict) else {}), "truncated": True}
    return orjson.dumps(reply)


_PLAIN = (b"", b"identity")


def fitting(kept: list[bytes], cap: int) -> list[bytes]:
    """Of the whole pieces an observer kept (up to ``cap`` bytes or a little past it), those
    that ``Capture.keep`` would have kept: the first ones that fit in ``cap``."""
    pieces = list(kept)
    size = sum(map(len, pieces))
    while pieces and size > cap:
        size -= len(pieces.pop())
    return pieces


def _plain_reply(path: str, pieces: list[bytes]) -> Any:
    """The reply of a whole, uncompressed JSON answer the usage observer did not read as
    one object, read straight from it (cheaper than the assembler); None to let the
    assembler judge it."""
    try:
        obj = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    get = obj.get
    if path == "/v1/responses":
        out = {"output": get("output"), "status": get("status")}
    elif type(get("choices")) is list:
        out = {"choices": obj["choices"]}
    else:
        return None
    out.update(model=get("model"), usage=get("usage"), error=get("error"), truncated=False)
    return out


def _one_line(data: bytes) -> bytes:
    """Valid JSON on one line: a raw line break can only be whitespace between tokens (in a
    string it is escaped), so it becomes a space."""
    return data.replace(b"\n", b" ").replace(b"\r", b" ")


def open_sink(target: str, config: Config) -> Sink:
    """``stdout``, or a rotating file at ``target``."""
    from .logfile import LineFile, StdoutLines

    if target == "stdout":
        return StdoutLines()
    retention = config.log_retention_days or None
    return LineFile(target, config.log_max_bytes, config.log_backups, retention)


def log_target(value: str) -> str | None:
    """Where a log goes (``stdout`` or a path), or None: empty, ``off``, ``false``, ``none``."""
    target = value.strip()
    return None if target.lower() in ("", "off", "false", "none") else target


def access_targets(config: Config) -> list[str]:
    """Where the access log goes: ``stdout`` and/or file paths, comma-separated."""
    found = [log_target(part) for part in config.access_log.split(",")]
    return list(dict.fromkeys(t for t in found if t is not None))


def line_format(target: str, configured: str) -> Callable[[UsageRow], bytes]:
    """The line maker for one access-log target: ``auto`` is console on a terminal's
    standard output, JSON everywhere else."""
    if configured == "auto":
        configured = "console" if target == "stdout" and sys.stdout.isatty() else "json"
    return console_line if configured == "console" else json_line


class EventLog:
    """The logs of one worker: lines made on the loop as requests end, written by a thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.interval = config.log_flush_interval
        fmt = config.access_log_format
        self.access = [(t, line_format(t, fmt)) for t in access_targets(config)]
        self.conversations = log_target(config.conversation_log)
        self.cap = config.conversation_max_bytes
        # each line maker once (two targets may share one), and the lines it made since
        # the last flush; the JSON access line also opens the conversation line
        self._makers: list[tuple[Callable[[UsageRow], bytes], list[bytes]]] = [
            (line, []) for line in dict.fromkeys(line for _, line in self.access)
        ]
        self._talks: list[Talk] = []  # conversation lines since the last flush
        self._sinks: dict[str, Sink] = {}
        self._count = 0  # requests since the last flush
        self._bytes = 0  # conversation bytes since the last flush
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="logs")
        self._failing: dict[str, int] = {}  # target -> lines it dropped since it failed
        self.dropped = 0
        self.dropped_conversations = 0
        self.max_pending_bytes = MAX_PENDING_BYTES

    @property
    def active(self) -> bool:
        """Whether any log wants request events."""
        return bool(self.access or self.conversations)

    def add(self, row: UsageRow, conv: Conversation | None) -> None:
        """Make the lines of a finished request for the next flush. Never blocks, never
        raises. While the writer falls behind (a slow disk, a stdout nobody reads), at most
        MAX_PENDING lines wait per log, and at most ``max_pending_bytes`` of conversations;
        beyond, the oldest lines are dropped, and new requests keep their access line but
        lose their conversation."""
        head = None
        try:
            for line, lines in self._makers:
                text = line(row)
                lines.append(text)
                if line is json_line:
                    head = text
                if len(lines) > MAX_PENDING:  # the oldest tenth goes: amortised O(1)
                    del lines[: MAX_PENDING // 10]
                    self.dropped += MAX_PENDING // 10
            if conv is not None:
                held = conv.capture or conv.observer
                size = held.seen_bytes if held is not None else 0
                if self._bytes > self.max_pending_bytes:
                    self.dropped_conversations += 1
                elif size <= INLINE_ANSWER:
                    talk = conversation_line(row, conv, self.cap, head or json_line(row))
                    if talk is not None:
                        self._talks.append(talk)
                        self._bytes += len(talk)
                else:  # a long answer is assembled by the writer thread
                    self._talks.append((row, conv, head or json_line(row)))
                    self._bytes += len(conv.log_body or b"") + min(size, self.cap)
        except (TypeError, ValueError):  # not encodable: this request's lines only
            self._unwritable(row)
        except Exception:  # a line must never break the request's accounting
            log.exception("logs: request %s could not be written down", row["request_id"])
            self.dropped += 1
        self._count += 1
        if self._count == BATCH:  # a busy worker writes small batches
            self._wake.set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None and self.active:
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            if self._closing:
                return
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bad batch must not end the logging of this worker
                log.exception("logs: could not write a batch")

    async def flush(self) -> None:
        """Hand every pending line to the writer thread and wait for it."""
        if not self._count:
            return
        made, talks = self._take()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._write, made, talks)

    def _take(self) -> tuple[dict[Callable[[UsageRow], bytes], list[bytes]], list[Talk]]:
        """The lines made since the last flush, by line maker, and the conversation lines;
        the next ones start afresh."""
        made = dict(self._makers)
        self._makers = [(line, []) for line, _ in self._makers]
        talks, self._talks = self._talks, []
        self._count = self._bytes = 0
        return made, talks

    async def aclose(self) -> None:
        """Write every pending line, close the files (graceful stop: no line lost)."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close_sinks)
        self._thread.shutdown(wait=True)

    def _unwritable(self, row: UsageRow) -> None:
        self.dropped += 1
        log.warning("logs: request %s could not be written down", row["request_id"])

    # the writer thread

    def _write(
        self, made: dict[Callable[[UsageRow], bytes], list[bytes]], talks: list[Talk]
    ) -> None:
        for target, line in self.access:
            self._emit(target, made[line])
        if self.conversations:
            self._emit(self.conversations, [line for line in map(self._made, talks) if line])

    def _made(self, talk: Talk) -> bytes | None:
        if type(talk) is bytes:
            return talk
        row, conv, head = cast("tuple[UsageRow, Conversation, bytes]", talk)
        try:
            return conversation_line(row, conv, self.cap, head)
        except (TypeError, ValueError):  # not encodable: this record only
            self._unwritable(row)
            return None

    def _emit(self, target: str, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            sink = self._sinks.get(target)
            if sink is None:
                sink = self._sinks[target] = open_sink(target, self.config)
            sink.write(lines)
        except OSError as exc:
            self.dropped += len(lines)
            failing = self._failing
            if target not in failing:
                failing[target] = 0
                log.warning("log %s: cannot write (%s); lines are dropped", target, exc)
            failing[target] += len(lines)
            return
        lost = self._failing.pop(target, None)
        if lost is not None:
            log.warning("log %s: writing again (%d lines were dropped)", target, lost)

    def _close_sinks(self) -> None:
        for sink in self._sinks.values():
            with contextlib.suppress(OSError):
                sink.close()
        self._sinks.clear()
