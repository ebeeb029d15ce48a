"""Token usage as the upstream reported it, read from responses without slowing them down.

Pure state, no I/O. ``usage_from_obj`` normalises the usage object of every OpenAI API shape
(chat completions, completions, embeddings, the Responses API) into one ``Usage``.
Two observers are fed the response body piece by piece from the relay and read at the end:

* ``JsonUsage`` for a non-stream JSON body (plain, gzip or deflate): it keeps only a 4 KiB
  head and a 64 KiB tail, and finds the top-level ``usage`` object and ``model`` there.
* ``StreamUsage`` for a ``text/event-stream`` body: it scans SSE lines for the final usage
  and, in strip mode, removes what the gateway's own ``stream_options.include_usage`` added,
  so the client receives exactly the stream it asked for.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    """Token counts of one request; ``estimated`` when the gateway counted them itself."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_obj(obj: object) -> Usage | None:
    """Normalise an upstream ``usage`` object; None unless it is a dict with a token count.

    Reads ``prompt_tokens``/``input_tokens``, ``completion_tokens``/``output_tokens`` (else
    ``total_tokens - prompt``, so embeddings give 0) and the cached/reasoning counts from
    ``prompt_tokens_details``/``input_tokens_details`` and
    ``completion_tokens_details``/``output_tokens_details``. A count that is null or absent
    everywhere means no usage; one that is not a non-negative int (bool included) reads as 0.
    Never raises.
    """
    if type(obj) is not dict:
        return None
    get = obj.get
    prompt = get("prompt_tokens")
    if prompt is None:
        prompt = get("input_tokens")
    completion = get("completion_tokens")
    if completion is None:
        completion = get("output_tokens")
    if completion is None:
        total = get("total_tokens")
        if prompt is None and total is None:
            return None
        completion = max(_count(total) - _count(prompt), 0)
    # the counts and details read inline (a call each would cost more than the reading):
    # type() rather than isinstance, so a bool is not a count
    details = get("prompt_tokens_details") or get("input_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else 0
    details = get("completion_tokens_details") or get("output_tokens_details")
    reasoning = details.get("reasoning_tokens") if type(details) is dict else 0
    return Usage(
        prompt if type(prompt) is int and prompt > 0 else 0,
        completion if type(completion) is int and completion > 0 else 0,
        cached if type(cached) is int and cached > 0 else 0,
        reasoning if type(reasoning) is int and reasoning > 0 else 0,
    )


def _count(value: object) -> int:
    # type() rather than isinstance: a bool is not a count (and this is cheaper)
    return value if type(value) is int and value > 0 else 0


# --------------------------------------------------------------------------------------------
# Non-stream JSON bodies

HEAD = 4096
TAIL = 65536
MAX_DECODED = 64 << 20
# Up to this size a full orjson parse is faster than the scan (measured: 4 us vs 9 us at
# 1 KiB, equal near 16 KiB, 26 us vs 14 us at 60 KiB), and exact.
WHOLE = 16384
KEEP = 65536  # the first bytes of a stream kept for an estimate of its tokens (StreamUsage)
_STEP = 65536  # inflate at most this much per call: a small compressed piece can be a bomb
_IDENTITY = (b"", b"identity")
_SPACE = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_MODEL_MEMBER = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\]|\\.)*")')
_DECODER = json.JSONDecoder()


class JsonUsage:
    """Observer of a non-stream JSON response body: ``feed`` every piece, then ``result``.

    ``encoding`` is the response Content-Encoding: b"" / b"identity", b"gzip" or b"deflate"
    (zlib or raw). Anything else, a decoding error, or more than MAX_DECODED decoded bytes
    makes ``result`` (None, None) and ``feed`` a no-op. Memory stays bounded: the first HEAD
    and the last TAIL decoded bytes, held as references to the pieces fed where possible.
    A body of at most WHOLE bytes is parsed whole; a larger one is searched from its end.
    ``keep`` (the conversation log's cap) keeps the pieces of an uncompressed body in
    ``kept`` until it is past that many bytes, for the log to take when the answer ends.
    """

    __slots__ = (
        "_deflate",
        "_head",
        "_head_len",
        "_inflate",
        "_keep",
        "_limit",
        "_ok",
        "_small",
        "_tail",
        "_tail_len",
        "kept",
        "seen_bytes",
        "whole_object",
    )

    def __init__(self, encoding: bytes = b"", keep: int = 0) -> None:
        name = encoding.strip().lower() if encoding else b""  # most answers name none
        self._ok = name in _IDENTITY or name in (b"gzip", b"deflate")
        self._deflate = name == b"deflate"
        self._inflate: zlib._Decompress | None = None
        if name == b"gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.seen_bytes = 0  # decoded bytes fed so far
        # an uncompressed body's pieces while it is at most WHOLE bytes: a list append a
        # piece, no head and tail kept apart (most answers end here, and never need those)
        self._small: list[bytes] | None = None
        # the pieces of an uncompressed body, by reference, for the conversation log (which
        # asks with ``keep``: every piece until the body is past ``keep`` bytes, the first
        # one past it included); without ``keep``, only while they are all kept for parsing
        self.kept: list[bytes] | None = None
        if name in _IDENTITY:
            self._small = self.kept = []
        else:
            self._keep_apart()
        self._keep = keep
        # the size past which the pieces are no longer all kept
        self._limit = keep if keep > WHOLE else WHOLE
        self.whole_object = False  # result() parsed the whole (decoded) body: a JSON object

    def _keep_apart(self) -> None:
        """From now on keep a head and a tail of the decoded body, not every piece."""
        self._head: list[bytes] = []
        self._head_len = 0
        self._tail: deque[bytes] = deque()
        self._tail_len = 0

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body as received (still encoded)."""
        small = self._small
        if small is not None:
            small.append(data)
            self.seen_bytes += len(data)
            if self.seen_bytes > self._limit:
                self._spill(small)
            return
        if not self._ok or not data:
            return
        if self._deflate and self._inflate is None:
            self._inflate = zlib.decompressobj(_deflate_wbits(data[0]))
        if self._inflate is None:
            self._add(data)
            return
        try:
            self._inflate_piece(self._inflate, data)
        except zlib.error:
            self._give_up()

    def _inflate_piece(self, inflate: zlib._Decompress, data: bytes) -> None:
        out = inflate.decompress(data, _STEP)
        while True:
            self._add(out)
            if self.seen_bytes > MAX_DECODED:
                self._give_up()
                return
            if not inflate.unconsumed_tail:
                return
            out = inflate.decompress(inflate.unconsumed_tail, _STEP)

    def _add(self, piece: bytes) -> None:
        size = len(piece)
        if not size:
            return
        self.seen_bytes += size
        if self._head_len < HEAD:
            head = piece[: HEAD - self._head_len]
            self._head.append(head)
            self._head_len += len(head)
        if size >= TAIL:
            self._tail.clear()
            self._tail.append(piece[-TAIL:])
            self._tail_len = TAIL
            return
        self._tail.append(piece)
        self._tail_len += size
        while self._tail_len - len(self._tail[0]) >= TAIL:
            self._tail_len -= len(self._tail.popleft())

    def _spill(self, small: list[bytes]) -> None:
        """Past ``_limit`` bytes: keep the head and the tail only, from now on."""
        self._small = None
        if not self._keep:  # no log asked to keep them: they may go
            self.kept = None
        self.seen_bytes = 0
        self._keep_apart()
        for piece in small:
            self._add(piece)

    def _give_up(self) -> None:
        self._ok = False
        self._head.clear()
        self._tail.clear()

    def result(self) -> tuple[Usage | None, str | None]:
        """(usage, model) of the body fed so far: the top-level ``usage`` object and
        ``model`` string, or None for what is not there. Never raises."""
        small = self._small
        if small is not None:
            body = small[0] if len(small) == 1 else b"".join(small)
            if len(body) <= WHOLE:  # _read_whole(), inline: most answers end here
                try:
                    obj = orjson.loads(body)
                except orjson.JSONDecodeError:
                    obj = _NOT_JSON
                if type(obj) is dict:
                    self.whole_object = True
                    model = obj.get("model")
                    return usage_from_obj(obj.get("usage")), model if type(model) is str else None
                if obj is not _NOT_JSON:
                    return None, None
            tail = body[-TAIL:]
            return _find_usage(tail), _find_model(body[:HEAD]) or _find_last_model(tail)
        if not self._ok:
            return None, None
        tail = b"".join(self._tail)
        if self.seen_bytes <= WHOLE:
            whole = _read_whole(tail)
            if whole is not None:
                self.whole_object = whole[2]
                return whole[0], whole[1]
        tail = tail[-TAIL:]
        return _find_usage(tail), _find_model(b"".join(self._head)) or _find_last_model(tail)

    def end(self) -> bytes:
        """Nothing is ever held back from a JSON body: b"" (the same shape as StreamUsage)."""
        return b""


def _deflate_wbits(first: int) -> int:
    # "deflate" means zlib-wrapped (RFC 9110), yet some servers send raw deflate. A zlib
    # stream starts with CM=8 and a window of at most 32 KiB.
    if first & 0x0F == 8 and first >> 4 <= 7:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


_NOT_JSON = object()


def _read_whole(body: bytes) -> tuple[Usage | None, str | None, bool] | None:
    """(usage, model, whether the body is a JSON object), or None if it is not JSON."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None, None, False
    model = obj.get("model")
    return usage_from_obj(obj.get("usage")), model if isinstance(model, str) else None, True


def _find_usage(tail: bytes) -> Usage | None:
    # The top-level usage comes last in every OpenAI response; a later "usage" member that
    # is not a usage object (metadata, tool output) is skipped because it does not normalise.
    end = len(tail)
    while (at := tail.rfind(b'"usage"', 0, end)) >= 0:
        end = at
        colon = _SPACE.match(tail, at + 7)
        if colon is None or tail[colon.end() : colon.end() + 1] != b"{":
            continue
        try:
            value, _ = _DECODER.raw_decode(tail[colon.end() :].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            continue
        usage = usage_from_obj(value)
        if usage is not None:
            return usage
    return None


def _find_model(head: bytes) -> str | None:
    match = _MODEL_MEMBER.search(head)
    return None if match is None else _string(match.group(1))


def _find_last_model(tail: bytes) -> str | None:
    # Embeddings put "model" after "data", which can be far beyond the head.
    end = len(tail)
    while (at := tail.rfind(b'"model"', 0, end)) >= 0:
        end = at
        match = _MODEL_MEMBER.match(tail, at)
        if match is not None:
            return _string(match.group(1))
    return None


def _string(quoted: bytes) -> str | None:
    try:
        value = json.loads(quoted.decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(value, str):
        return None
    if not value.isascii():  # json keeps a lone surrogate ("\\ud800"): no UTF-8 can hold it
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


# --------------------------------------------------------------------------------------------
# Server-sent event streams

_USAGE_OBJECT = re.compile(rb'"usage"[ \t]*:[ \t]*\{')
_USAGE_NULL = re.compile(rb'"usage"[ \t]*:[ \t]*null')
# how OpenAI ends a chunk of a stream asked for usage: this member, then (by default) a
# random "obfuscation" string, then the end of the chunk
_USAGE_NULL_MEMBER = b',"usage":null'
_USAGE_NULL_END = _USAGE_NULL_MEMBER + b"}\n\n"
_OBFUSCATION = b',"obfuscation":"'
_EOL = (b"\n", b"\r")
_EOL_BYTES = (10, 13)
_BLANKS = (32, 9)
# Where the state of the current event is, in strip mode.
_OPEN, _PASS, _DROP = 0, 1, 2  # no data line yet / being sent / being dropped (usage event)
# Where the last line went when a piece ended with "\r" (its "\n" may start the next piece).
_SENT, _HELD, _DROPPED = 1, 2, 3
_RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)


class StreamUsage:
    """Observer of an SSE response: ``feed`` every piece and send what it returns, then
    ``end``; read ``usage``, ``model`` and ``overflow`` at any time.

    strip=False: ``feed`` returns its argument itself and only scans. strip=True (the gateway
    added ``stream_options.include_usage``): ``feed`` returns the complete lines so far minus
    the ``"usage":null`` member of each chunk and minus the whole usage event (the one whose
    chunk has ``"choices":[]`` and a usage object); everything else byte for byte, in order.
    The incomplete last line is held until its end arrives, and so are the non-data lines
    that open an event (``event:``, ``id:``, comments) until its first data line shows
    whether it is the usage event. Output is the same for any split of the input.

    A line longer than ``line_cap`` stops the scan (``overflow``; ``usage`` stays as it
    was); strip mode then sends what it held and passes the rest through unchanged. The
    first ``keep`` bytes are kept by reference for ``completion_text``.
    """

    __slots__ = (
        "_cr",
        "_event",
        "_held",
        "_keep",
        "_line_cap",
        "_partial",
        "_partial_len",
        "_strip",
        "kept",
        "kept_bytes",
        "model",
        "overflow",
        "seen_bytes",
        "usage",
    )

    whole_object = False  # (as JsonUsage's: a stream is never read as one JSON object)

    def __init__(self, strip: bool = False, keep: int = KEEP, line_cap: int = 1 << 20) -> None:
        self.usage: Usage | None = None
        self.model: str | None = None
        self.overflow = False
        self.seen_bytes = 0
        self.kept_bytes = 0
        self._strip = strip
        self._keep = keep
        self._line_cap = line_cap
        self.kept: list[bytes] = []  # the first ``keep`` bytes (or a little more) as fed
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._held: list[bytes] = []
        self._event = _OPEN
        self._cr = 0

    def feed(self, data: bytes) -> bytes:
        """Scan the next piece; return the bytes to send to the client now."""
        size = len(data)
        if not size:
            return data
        self.seen_bytes += size
        if self.kept_bytes < self._keep:
            self.kept.append(data)
            self.kept_bytes += size
        if self.overflow:
            return data
        if self._strip:
            # The common piece in strip mode: one whole chunk event whose last member is the
            # one include_usage added, or which ends with it and then OpenAI's random
            # "obfuscation" string. Cut it and send the rest: no line machinery. (Such a
            # chunk is not the usage event: that one has an object.) Slices compare, and
            # one splitlines() tells a single line: fewer calls than find() and its kin,
            # which on 3.11 parse their arguments with PyArg_ParseTuple.
            if (
                data[:5] == b"data:"
                and self.model is not None
                and self._event == _OPEN
                and not self._partial
                and not self._held
                and not self._cr
                and size <= self._line_cap
            ):
                if data[-16:] == _USAGE_NULL_END:
                    if len(data.splitlines()) == 2:  # one line, then the blank one
                        return data[:-16] + b"}\n\n"
                elif data[-3:] == b"}\n\n":
                    at = data.rfind(_USAGE_NULL_MEMBER)
                    end = at + len(_USAGE_NULL_MEMBER)
                    if (
                        at > 0
                        and data[end : end + len(_OBFUSCATION)] == _OBFUSCATION
                        and data.find(b'"', end + len(_OBFUSCATION)) == size - 4
                        and data[size - 5] != 92  # no backslash before the closing quote
                        and len(data.splitlines()) == 2
                    ):
                        return data[:at] + data[end:]
            return self._strip_piece(data)
        # The common piece: whole lines, model known, no usage object. A substring test is
        # cheaper than the regex, which only runs when "usage" is there at all.
        if (
            self._partial
            or self.model is None
            or data[-1] not in _EOL_BYTES
            or size > self._line_cap
            or (data.find(b'"usage"') >= 0 and _USAGE_OBJECT.search(data))
        ):
            self._scan_piece(data)
        return data

    def end(self) -> bytes:
        """The stream ended: scan the unterminated last line; return what strip mode held."""
        if self.overflow:
            return b""
        line = b"".join(self._partial)
        self._partial.clear()
        if not self._strip:
            if line:
                self._look(line)
            return b""
        out: list[bytes] = []
        if line:
            self._line(line, out)
        out += self._held
        self._held.clear()
        return b"".join(out)

    # ---- scan mode

    def _scan_piece(self, data: bytes) -> None:
        start = 0
        if self._partial:
            eol = _first_eol(data)
            if eol < 0:
                self._hold(data)
                return
            self._partial.append(data[:eol])
            line = b"".join(self._partial)
            self._partial.clear()
            self._partial_len = 0
            if len(line) > self._line_cap:
                self.overflow = True
                return
            self._look(line)
            start = eol + 1
        last = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last > start and self._worth_reading(data, start, last):
            for line in data[start:last].splitlines():
                if len(line) > self._line_cap:
                    self.overflow = True
                    return
                self._look(line)
        if last + 1 < len(data):
            self._hold(data[last + 1 :])

    def _worth_reading(self, data: bytes, start: int, end: int) -> bool:
        return (
            end - start > self._line_cap
            or _USAGE_OBJECT.search(data, start, end) is not None
            or (self.model is None and data.find(b'"model"', start, end) >= 0)
        )

    def _hold(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_len += len(piece)
        if self._partial_len > self._line_cap:
            self.overflow = True
            self._partial.clear()

    def _look(self, line: bytes) -> dict[str, Any] | None:
        """Read usage and the first model from one line; the parsed chunk if it was parsed."""
        if not line.startswith(b"data:"):
            return None
        has_usage = _USAGE_OBJECT.search(line) is not None
        if not has_usage and (self.model is not None or line.find(b'"model"') < 0):
            return None
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        if has_usage:
            self.usage = _usage_of(obj) or self.usage
        if self.model is None:
            self.model = _model_of(obj)
        return obj

    # ---- strip mode

    def _strip_piece(self, data: bytes) -> bytes:
        if self._is_plain_event(data):
            return _without_usage_null(data)
        out: list[bytes] = []
        if self._cr:
            if data[0] == 10:  # the "\n" of a "\r\n" split between pieces
                self._finish_cr(out)
                data = data[1:]
            self._cr = 0
        if self._partial:
            if _first_eol(data) < 0:  # the held line goes on: join only once it ends
                self._partial.append(data)
                self._partial_len += len(data)
                if self._partial_len > self._line_cap:
                    self._flush_overflow(out, [])
                return b"".join(out)
            self._partial.append(data)
            data = b"".join(self._partial)
            self._partial.clear()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(_EOL):
            self._partial.append(lines.pop())
        self._partial_len = len(self._partial[0]) if self._partial else 0
        went = 0
        for index, line in enumerate(lines):
            if len(line.rstrip(b"\r\n")) > self._line_cap:
                self._flush_overflow(out, lines[index:])
                return b"".join(out)
            went = self._line(line, out)
        if self._partial_len > self._line_cap:
            self._flush_overflow(out, [])
        elif data.endswith(b"\r"):  # its "\n" may start the next piece
            self._cr = went
        return b"".join(out)

    def _is_plain_event(self, data: bytes) -> bool:
        # The common piece, one whole chunk event "data: {...}\n\n" with nothing held and
        # nothing to read, skips the line machinery (5 us -> 1.5 us a chunk).
        return (
            self._event == _OPEN
            and not self._partial
            and not self._held
            and not self._cr
            and self.model is not None
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and data.startswith(b"data:")
            and data.find(b"\r") < 0
            and len(data) <= self._line_cap
            and _USAGE_OBJECT.search(data) is None
        )

    def _finish_cr(self, out: list[bytes]) -> None:
        if self._cr == _SENT:
            out.append(b"\n")
        elif self._cr == _HELD:
            self._held[-1] += b"\n"

    def _flush_overflow(self, out: list[bytes], rest: list[bytes]) -> None:
        self.overflow = True
        out += self._held
        out += rest
        out += self._partial
        self._held.clear()
        self._partial.clear()

    def _line(self, line: bytes, out: list[bytes]) -> int:
        """Route one line (with its terminator) of the stream; say where it went."""
        content = line.rstrip(b"\r\n")
        if not content:
            event, self._event = self._event, _OPEN
            if event == _DROP:
                return _DROPPED
            out += self._held
            self._held.clear()
            out.append(line)
            return _SENT
        if self._event == _DROP:
            self._look(content)
            return _DROPPED
        if not content.startswith(b"data:"):
            if self._event == _OPEN:
                self._held.append(line)
                return _HELD
            out.append(line)
            return _SENT
        obj = self._look(content)
        if self._event == _OPEN:
            if obj is not None and _is_usage_event(obj):
                self._held.clear()
                self._event = _DROP
                return _DROPPED
            out += self._held
            self._held.clear()
            self._event = _PASS
        out.append(_without_usage_null(line))
        return _SENT

    # ---- estimation

    def completion_text(self) -> str:
        """The assistant output found in the kept data lines (the first ``keep`` bytes, or
        a little more: ``kept_bytes``): content, reasoning, refusals, tool call names and
        arguments, completion text, Responses API text and argument deltas."""
        parts: list[str] = []
        for line in b"".join(self.kept).splitlines():
            if line.startswith(b"data:"):
                try:
                    obj = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    _collect_output(obj, parts)
        return "".join(parts)


def _first_eol(data: bytes) -> int:
    lf = data.find(b"\n")
    cr = data.find(b"\r")
    return lf if cr < 0 or 0 <= lf < cr else cr


def _usage_of(obj: dict[str, Any]) -> Usage | None:
    usage = usage_from_obj(obj.get("usage"))
    if usage is None:
        response = obj.get("response")
        if isinstance(response, dict):
            usage = usage_from_obj(response.get("usage"))
    return usage


def _model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    if model is None:
        response = obj.get("response")
        if isinstance(response, dict):
            model = response.get("model")
    return model if isinstance(model, str) else None


def _is_usage_event(obj: dict[str, Any]) -> bool:
    return obj.get("choices") == [] and usage_from_obj(obj.get("usage")) is not None


def _without_usage_null(line: bytes) -> bytes:
    # Upstreams put the top-level member after "choices"; no chunk field nests a usage
    # member, so the last member-shaped occurrence is the one include_usage added.
    end = len(line)
    while (at := line.rfind(b'"usage"', 0, end)) >= 0:
        end = at
        match = _USAGE_NULL.match(line, at)
        if match is not None:
            span = _member_span(line, at, match.end())
            if span is not None:
                return line[: span[0]] + line[span[1] :]
    return line


def _member_span(line: bytes, start: int, stop: int) -> tuple[int, int] | None:
    """The bytes to cut so that line[start:stop], a member, goes and the JSON stays valid."""
    before = start - 1
    while before >= 0 and line[before] in _BLANKS:
        before -= 1
    after = stop
    while after < len(line) and line[after] in _BLANKS:
        after += 1
    follow = line[after : after + 1]
    if follow not in (b",", b"}") or before < 0:
        return None
    if line[before] == 44:  # ",": a middle or last member takes its leading comma along
        return before, stop
    if line[before] == 123:  # "{": the first member takes its trailing comma along
        return (start, after + 1) if follow == b"," else (start, stop)
    return None


def _collect_output(obj: dict[str, Any], parts: list[str]) -> None:
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                _collect_choice(choice, parts)
    elif obj.get("type") in _RESPONSES_DELTAS:
        _strings(parts, obj.get("delta"))


def _collect_choice(choice: dict[str, Any], parts: list[str]) -> None:
    _strings(parts, choice.get("text"))
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    _strings(parts, delta.get("content"), delta.get("reasoning_content"), delta.get("refusal"))
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            _strings(parts, function.get("name"), function.get("arguments"))


def _strings(parts: list[str], *values: object) -> None:
    parts.extend(value for value in values if isinstance(value, str))
