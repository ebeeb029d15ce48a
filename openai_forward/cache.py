"""The response cache's pure parts: keys, the per-request directive, entries and recorders.

No I/O and no clock of its own (the stores are in ``cachestore.py``). A request's entry is
found by :func:`cache_key`; what the client asked for by :func:`cache_directive` and
:func:`read_write`. While a cacheable response is relayed, a :class:`Recorder` keeps a
reference to each chunk (never a copy) until it is over its size cap, and at the end gives
an :class:`Entry` only for a complete 200: a stream counts as complete when its last event
is ``data: [DONE]`` or a ``response.completed`` event.

Entry format (``Entry.encode``), version 1::

    [1 byte version][4 bytes LE: n][n bytes: orjson header][8k bytes: event table][payload]

The header is a JSON array (status, headers, model, 4 token counts, created, k or -1 for a
non-stream body, payload length); the table holds k pairs of little-endian uint32 (ms since
the first byte, length); the payload is the body, or the events' raw bytes back to back.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson

from .usage import Usage

FORMAT_VERSION = 1
KEY_VERSION = 1  # changing what a key covers bumps this, so every old entry misses
DIRECTIVE_HEADER = b"x-openai-forward-cache"  # request: on|off|refresh|bypass; response: hit|miss
BODY_MEMBER = "caching"
# Kept from the upstream's answer: what describes the body, nothing about keys, accounts,
# cookies, rate limits or the original request (those would be stale or another tenant's).
SAFE_HEADERS = frozenset({b"content-type", b"openai-model", b"openai-version"})

_BODY_VALUES: dict[Any, str] = {"refresh": "refresh", "bypass": "bypass"}
_HEADER_VALUES = {b"on": "on", b"off": "off", b"refresh": "refresh", b"bypass": "bypass"}
_PLANS = {"on": (True, True), "off": (False, False), "bypass": (False, False)}
_PREFIX = struct.Struct("<BI")
_U32 = 0xFFFFFFFF
_SWAP = sys.byteorder == "big"  # the table is little-endian on disk


def cache_key(upstream: str, path: str, tenant: str | None, body: dict[str, Any]) -> bytes:
    """The 32-byte SHA-256 naming the entry of a request.

    Covers ``upstream`` (its configured name), ``path`` (canonical, with any query that
    changes the answer), ``tenant`` (None: an entry shared by every tenant) and every member
    of ``body`` except ``caching``, whatever their order. Values compare by their JSON text,
    so ``1`` and ``1.0`` are different keys (a miss, never a wrong hit). ``ValueError`` if
    the body holds something JSON cannot encode (never the case for a parsed JSON body).
    """
    if BODY_MEMBER in body:
        body = {k: v for k, v in body.items() if k != BODY_MEMBER}
    try:
        text = orjson.dumps(
            (KEY_VERSION, upstream, path, tenant, body), option=orjson.OPT_SORT_KEYS
        )
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"the request body cannot be used as a cache key: {exc}") from None
    return hashlib.sha256(text).digest()


def cache_directive(body: dict[str, Any], header: bytes | None) -> str | None:
    """What the request asks of the cache: "on", "off", "refresh", "bypass" or None.

    The body member ``caching`` (true, false, "refresh" or "bypass") wins over the header
    ``x-openai-forward-cache`` (on, off, refresh or bypass; any case): the body is written per
    call, a header is often a client-wide default. ``ValueError`` with a message fit for a
    400 for any other value.
    """
    if BODY_MEMBER in body:
        value = body[BODY_MEMBER]
        if value is True:
            return "on"
        if value is False:
            return "off"
        if type(value) is str and value in _BODY_VALUES:
            return _BODY_VALUES[value]
        shown = orjson.dumps(value, default=repr).decode()
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f'"caching" must be true, false, "refresh" or "bypass", not {shown}')
    if header is None:
        return None
    found = _HEADER_VALUES.get(header.strip().lower())
    if found is None:
        raise ValueError("the x-openai-forward-cache header must be on, off, refresh or bypass")
    return found


def read_write(directive: str | None, enabled: bool) -> tuple[bool, bool]:
    """(look the entry up, store the answer) for a request whose route and model have
    caching ``enabled`` by the configuration, given its ``directive``.

    "on" turns caching on for this request, "off" and "bypass" keep it away from the cache
    both ways, "refresh" skips the lookup and stores the fresh answer.
    """
    if directive is None:
        return enabled, enabled
    if directive == "refresh":
        return False, True
    return _PLANS[directive]


def keep_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream response headers an entry keeps: those named in ``SAFE_HEADERS``."""
    return [(name, value) for name, value in headers if name.lower() in SAFE_HEADERS]


def storable_head(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """True if a response with this head may be stored: a 200, not compressed (entries are
    plain; the proxy asks the upstream for identity), not marked ``no-store``."""
    if status != 200:
        return False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return False
        if lname == b"cache-control" and value.lower().find(b"no-store") >= 0:
            return False
    return True


@dataclass(slots=True)
class Entry:
    """One stored response. ``events`` is None for a non-stream response (then ``body`` is
    it); for a stream it lists (ms since the first byte, raw bytes as relayed, SSE framing
    included) and ``body`` is empty. ``created`` is unix seconds."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    events: list[tuple[int, bytes]] | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    created: int = 0

    @property
    def stream(self) -> bool:
        return self.events is not None

    @property
    def size(self) -> int:
        """Bytes of body or events: what the response cost to send."""
        if self.events is None:
            return len(self.body)
        return sum(len(data) for _, data in self.events)

    def encode(self) -> bytes:
        """The compact binary form (see the module docstring); copies the payload once."""
        events = self.events
        if events is None:
            count, table, payload = -1, b"", [self.body]
        else:
            times, payload = [ms for ms, _ in events], [d for _, d in events]
            flat = [0] * (2 * len(events))
            flat[0::2] = times if _in_range(times) else [min(max(t, 0), _U32) for t in times]
            flat[1::2] = map(len, payload)
            pairs = array("I", flat)
            if _SWAP:
                pairs.byteswap()
            count, table = len(events), pairs.tobytes()
        head = orjson.dumps(
            [
                self.status,
                [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                self.model,
                self.prompt_tokens,
                self.completion_tokens,
                self.cached_tokens,
                self.reasoning_tokens,
                self.created,
                count,
                sum(map(len, payload)),
            ]
        )
        return b"".join([_PREFIX.pack(FORMAT_VERSION, len(head)), head, table, *payload])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Entry:
        """The entry ``encode`` made; ``ValueError`` for anything else (never another error)."""
        try:
            return _decode(memoryview(data))
        except (TypeError, IndexError, struct.error, OverflowError) as exc:
            raise ValueError(f"not a cache entry: {type(exc).__name__}") from None


def _decode(view: memoryview) -> Entry:
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < _PREFIX.size:
        raise ValueError("not a cache entry: too short")
    version, n = _PREFIX.unpack_from(view)
    if version != FORMAT_VERSION:
        raise ValueError(f"not a cache entry of format {FORMAT_VERSION} (found {version})")
    start = _PREFIX.size + n
    if start > len(view):
        raise ValueError("not a cache entry: truncated header")
    head = orjson.loads(view[_PREFIX.size : start])
    if type(head) is not list or len(head) != 10:
        raise ValueError("not a cache entry: bad header")
    status, headers, model, p, c, k, r, created, count, length = head
    if not all(type(x) is int and x >= 0 for x in (status, p, c, k, r, created, length)):
        raise ValueError("not a cache entry: bad numbers")
    if model is not None and type(model) is not str:
        raise ValueError("not a cache entry: bad model")
    entry = Entry(status, _headers(headers), b"", None, model, p, c, k, r, created)
    if type(count) is not int or count < -1:
        raise ValueError("not a cache entry: bad event count")
    table_end = start + 8 * max(count, 0)
    if len(view) - table_end != length:
        raise ValueError("not a cache entry: payload length differs")
    if count == -1:
        entry.body = bytes(view[table_end:])
    else:
        entry.events = _events(view, start, count, table_end)
    return entry


def _headers(raw: object) -> list[tuple[bytes, bytes]]:
    if type(raw) is not list:
        raise ValueError("not a cache entry: bad headers")
    out = []
    for pair in raw:
        if type(pair) is not list or len(pair) != 2 or not all(type(s) is str for s in pair):
            raise ValueError("not a cache entry: bad header")
        out.append((pair[0].encode("latin-1"), pair[1].encode("latin-1")))
    return out


def _in_range(times: list[int]) -> bool:
    return not times or (min(times) >= 0 and max(times) <= _U32)


def _events(view: memoryview, start: int, count: int, pos: int) -> list[tuple[int, bytes]]:
    pairs = array("I")
    pairs.frombytes(view[start:pos])
    if _SWAP:
        pairs.byteswap()
    lengths = pairs[1::2]
    if sum(lengths) != len(view) - pos:
        raise ValueError("not a cache entry: event lengths differ from the payload")
    payload = bytes(view[pos:])  # one copy; each event is then a slice of it
    ends = list(accumulate(lengths))
    starts = [0, *ends][: len(ends)]
    events = [(ms, payload[a:b]) for ms, a, b in zip(pairs[0::2], starts, ends, strict=True)]
    return events


class Recorder:
    """Keeps one response as it is relayed, to store it if it ends well.

    Call ``head`` when the upstream's head arrives (False: not storable, stop feeding),
    ``feed`` with each piece of body as it goes to the client, then ``entry`` once the
    response is complete. ``feed`` only appends a reference: it never copies and never
    delays; past ``max_bytes`` the recorder lets go of what it held and ``overflow`` is True.
    """

    __slots__ = ("_chunks", "_start", "_times", "headers", "max_bytes", "overflow", "size",
                 "status", "stream")  # fmt: skip

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.overflow = False
        self.status = 0
        self.stream = False
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._times: list[float] = []
        self._start = 0.0

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Note the response head; False if ``storable_head`` refuses it (then ``entry``
        gives None whatever is fed)."""
        if not storable_head(status, headers):
            return False
        self.status = status
        kept = keep_headers(headers)
        self.headers = kept
        self.stream = any(
            n.lower() == b"content-type" and v[:17].lower() == b"text/event-stream" for n, v in kept
        )
        return True

    def feed(self, data: bytes, now: float) -> None:
        """Keep ``data`` (relayed at ``now``, in seconds on any monotonic clock)."""
        if self.overflow or not data:
            return
        size = self.size + len(data)
        if size > self.max_bytes:
            self.overflow = True
            self._chunks, self._times = [], []
            return
        if not self._chunks:
            self._start = now
        self.size = size
        self._chunks.append(data)
        self._times.append(now)

    def entry(self, model: str | None, usage: Usage | None, created: int) -> Entry | None:
        """The entry to store, or None: over ``max_bytes``, not a storable 200 head, or a
        stream whose last event is not ``data: [DONE]`` nor ``response.completed``."""
        if self.overflow or self.status != 200:
            return None
        chunks = self._chunks
        u = usage or Usage()
        e = Entry(200, self.headers, b"", None, model, u.prompt_tokens, u.completion_tokens,
                  u.cached_tokens, u.reasoning_tokens, created)  # fmt: skip
        if not self.stream:
            e.body = b"".join(chunks)
            return e
        if not stream_complete(chunks):
            return None
        start = self._start
        offsets = [int((t - start) * 1000.0) for t in self._times]
        e.events = list(zip(offsets, chunks, strict=True))
        return e


def stream_complete(chunks: list[bytes]) -> bool:
    """Whether the stream whose pieces end with ``chunks`` (the last ones suffice) ended as a
    complete stream does (see ``ended_well``)."""
    return bool(chunks) and ended_well(_last_event(chunks))


def _last_event(chunks: list[bytes]) -> bytes:
    """The last SSE event of the stream, newlines normalised; joins as few chunks as it can
    (doubling), so a large final event costs O(its size)."""
    take = 1
    while True:
        tail = b"".join(chunks[-take:]).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = tail.rstrip(b"\n")
        cut = text.rfind(b"\n\n")
        if cut >= 0 or take >= len(chunks):
            return text[cut + 2 :] if cut >= 0 else text
        take *= 2


def ended_well(event: bytes) -> bool:
    """True if ``event`` (one SSE event) is how a complete stream ends: ``data: [DONE]``
    (chat and completions), or a ``response.completed`` event (the Responses API)."""
    data: list[bytes] = []
    kind = b""
    for line in event.split(b"\n"):
        name, _, value = line.partition(b":")
        value = value[1:] if value[:1] == b" " else value
        if name == b"data":
            data.append(value)
        elif name == b"event":
            kind = value.strip()
    text = b"\n".join(data).strip()
    if text == b"[DONE]" or kind == b"response.completed":
        return True
    if text.find(b"response.completed") < 0:
        return False
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return type(obj) is dict and obj.get("type") == "response.completed"


def paced(
    events: list[tuple[int, bytes]], factor: float, min_gap_ms: int = 5
) -> list[tuple[float, bytes]]:
    """A stream entry's events as writes: (seconds after the first write, bytes). Events
    closer than ``min_gap_ms`` (after scaling by ``factor``) share one write; ``factor`` 0
    gives one write of everything (replay as fast as the client reads)."""
    if not events:
        return []
    if factor <= 0:
        return [(0.0, b"".join(d for _, d in events))]
    out: list[tuple[float, bytes]] = []
    group: list[bytes] = []
    at = events[0][0] * factor
    for ms, data in events:
        t = ms * factor
        if group and t - at >= min_gap_ms:
            out.append(((at - events[0][0] * factor) / 1000.0, b"".join(group)))
            group, at = [], t
        group.append(data)
    out.append(((at - events[0][0] * factor) / 1000.0, b"".join(group)))
    return out
