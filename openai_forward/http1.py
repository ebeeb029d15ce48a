"""The client side: an HTTP/1.1 server protocol on llhttp (httptools), hardened at the edge.

It parses and checks framing, enforces size limits and deadlines, keeps pipelined requests
in order, streams request bodies into whatever sink the application attaches, and exposes
the transport's flow control. It knows nothing about upstreams; the application decides.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

from .config import Config
from .errors import GatewayError, new_request_id
from .timer import LazyTimer

log = logging.getLogger("openai_forward")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PENDING_HIGH = 256 * 1024  # body bytes held before a sink is attached, then reading pauses
_REPLAY_MAX = 256 * 1024  # a body up to this size is kept until the response, for one retry
_FORBIDDEN_METHODS = frozenset({b"CONNECT", b"TRACE", b"TRACK"})


class BodySink(Protocol):
    """Where request body bytes go once the application has a place for them."""

    def body(self, data: bytes) -> None: ...
    def body_end(self) -> None: ...


class App(Protocol):
    """What the server protocol drives. ``begin`` runs at end of headers, synchronously."""

    def begin(self, req: Request) -> bytes | None: ...
    def handle(self, req: Request) -> None: ...
    def refused(self, req: Request, error: GatewayError, request_id: str) -> None: ...


class Request:
    """One request on a client connection: its head, body state and response state."""

    __slots__ = (
        "body_bytes",
        "body_complete",
        "body_limit",
        "buffer_limit",
        "chunked",
        "client",
        "client_ip",
        "content_length",
        "ctx",
        "expect_continue",
        "headers",
        "identity",
        "keep_alive",
        "method",
        "on_body_done",
        "on_lost",
        "on_overflow",
        "path",
        "pending",
        "query",
        "responded",
        "sink",
        "target",
        "version",
    )

    def __init__(self, client: ServerProtocol, method: bytes, target: bytes, version: str) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.version = version
        self.headers: list[tuple[bytes, bytes]] = []
        self.path = ""
        self.query = ""
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body_limit = 0
        self.buffer_limit = _PENDING_HIGH
        self.body_bytes = 0
        self.body_complete = False
        self.pending: list[bytes] | None = []
        self.sink: BodySink | None = None
        self.responded = False
        # the client went away (None), or its body broke a limit or its framing
        # while it was being forwarded (the error, for the handler to answer and account)
        self.on_lost: Callable[[GatewayError | None], None] | None = None
        self.on_body_done: Callable[[], None] | None = None
        self.on_overflow: Callable[[], None] | None = None
        self.ctx: Any = None  # the application's per-request data
        self.client_ip = ""  # set by the application when it resolves X-Forwarded-For
        self.identity: Any = None  # the application's idea of who is asking

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def attach(self, sink: BodySink) -> None:
        """Send the body (what arrived so far, then the rest as it comes) to ``sink``."""
        self.sink = sink
        self.want_body()
        for data in self.pending or ():
            sink.body(data)
        if self.body_complete:
            sink.body_end()
        else:
            self.client.body_flow(resume=True)

    def want_body(self) -> None:
        """Tell a client that waits (``Expect: 100-continue``) to send its body now."""
        if self.expect_continue and not self.body_complete and not self.responded:
            self.expect_continue = False
            self.client.write(_CONTINUE)

    @property
    def replayable(self) -> bool:
        """The whole body is still at hand: the request can be sent again."""
        return self.body_complete and self.may_replay

    @property
    def may_replay(self) -> bool:
        """What arrived of the body is at hand and small enough to send again."""
        return self.pending is not None and self.body_bytes <= _REPLAY_MAX

    def detach(self) -> None:
        """Stop feeding the sink (its upstream request failed); later bytes are dropped."""
        self.sink = None


class ServerProtocol(asyncio.Protocol):
    """One client connection. Created per accepted socket by the server."""

    def __init__(self, app: App, config: Config, connections: set[ServerProtocol]) -> None:
        self.app = app
        self.config = config
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # being parsed
        self.active: Request | None = None  # being answered
        self.queue: deque[Request | bytes] = deque()
        self.closing = False  # close after the active response
        self.draining = False
        self.write_paused = False
        self.on_write_pause: Callable[[bool], None] | None = None
        self._read_paused = 0  # bit set: 1 body backpressure, 2 pipeline queue, 4 parse stopped
        self._in_head = False
        self._head_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._url_size = 0
        self._timer = LazyTimer(self.loop, self._tick)
        self._due = 0.0
        self._on_due: Callable[[], None] | None = None
        self._last_rx = 0.0
        self._host_seen = 0
        self._te: bytes | None = None
        self._broken = False  # stop reading: no more requests on this connection
        self._closed = False

    # connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self._arm(self.config.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None
        self._cancel_timer()
        for req in (self.active, self.req):
            if req is not None and req.on_lost is not None:
                callback, req.on_lost = req.on_lost, None
                callback(None)
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        if self._in_head:
            self._head_bytes += len(data)
        else:
            self._last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # on_headers_complete already answered the upgrade request
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised, if one did
            if isinstance(cause, _Stop):
                return
            if not isinstance(cause, GatewayError):
                cause = GatewayError(400, "invalid_request", _parser_message(exc))
            self._reject(cause)
            return
        if self._in_head and self._head_bytes > self._head_limit:
            self._reject(_headers_too_large())

    @property
    def _head_limit(self) -> int:
        """Bytes a head may take on the wire: request line, fields and their separators."""
        return self.config.max_request_line + self.config.max_header_size + 4 * 1024

    def eof_received(self) -> bool | None:
        # A client that closes its side has gone away, as far as we can tell: answering a
        # half-closed connection would keep an upstream generation running for nobody
        # (nginx treats it the same way). Closing runs connection_lost, which aborts it.
        return None

    # flow control

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.on_write_pause is not None:
            self.on_write_pause(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_write_pause is not None:
            self.on_write_pause(False)

    def body_flow(self, resume: bool) -> None:
        """Pause or resume reading for request-body backpressure."""
        self._set_read_pause(1, not resume)

    def _set_read_pause(self, bit: int, on: bool) -> None:
        before = self._read_paused
        self._read_paused = before | bit if on else before & ~bit
        if self.transport is None or bool(before) == bool(self._read_paused):
            return
        if self._read_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # parser callbacks

    def on_message_begin(self) -> None:
        if self._broken:
            raise _Stop  # nothing after a refused request is read as a request
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._url_size = 0
        self._host_seen = 0
        self._te = None
        self.req = Request(self, b"", b"", "1.1")
        if self.active is None and not self.queue:
            self._arm(self.config.header_timeout, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self._url_size += len(url)
        if self._url_size > self.config.max_request_line:
            raise GatewayError(414, "uri_too_long", "The request-target is too long.")
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        self._header_count += 1
        size = len(name) + len(value)
        self._header_bytes += size + 4
        if (
            size > 8192
            or self._header_count > self.config.max_headers
            or self._header_bytes > self.config.max_header_size
        ):
            raise _headers_too_large()
        lname = name.lower()
        if lname == b"host":
            self._host_seen += 1
        elif lname == b"transfer-encoding":
            if self._te is not None:
                raise GatewayError(400, "invalid_request", "Transfer-Encoding appears twice.")
            self._te = value.strip().lower()
        elif lname == b"expect" and value.strip().lower() == b"100-continue":
            req.expect_continue = True
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        self._in_head = False
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        self._last_rx = self.loop.time()
        if self.draining:
            req.keep_alive = False
        error = self._check_head(req)
        if error is None:
            try:
                ready = self.app.begin(req)
            except GatewayError as exc:
                error = exc
            else:
                if ready is not None:
                    self._enqueue(req, ready)
                    return
        if error is not None:
            self._stop_reading()
            request_id = new_request_id()
            self.app.refused(req, error, request_id)
            self._enqueue(req, error.response(request_id, close=True), close=True)
            return
        if self.active is None and not self.queue:
            self._start(req)
        else:
            self.queue.append(req)
            self._set_read_pause(2, True)
        if req.has_body:
            self._arm(self.config.body_timeout, self._body_timeout)

    def _check_head(self, req: Request) -> GatewayError | None:
        if req.method in _FORBIDDEN_METHODS:
            return GatewayError(405, "method_not_allowed", "This method is not allowed.")
        if self.parser.should_upgrade():
            return _not_implemented("Protocol upgrades (WebSocket) are not supported yet.")
        if req.version not in ("1.1", "1.0"):
            return GatewayError(400, "invalid_request", "Only HTTP/1.0 and HTTP/1.1 are supported.")
        if self._host_seen != 1 and (req.version == "1.1" or self._host_seen > 1):
            return GatewayError(400, "invalid_request", "Exactly one Host header is required.")
        te = self._te
        if te is not None:
            if req.version == "1.0":
                return GatewayError(400, "invalid_request", "Transfer-Encoding needs HTTP/1.1.")
            if te != b"chunked":
                return _not_implemented("Only the chunked transfer coding is supported.")
            req.chunked = True
        else:
            req.content_length = _content_length(req.headers)
        return None

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.body_bytes += len(body)
        if req.body_bytes > req.body_limit:
            raise _body_too_large()
        sink = req.sink
        pending = req.pending
        if sink is not None:
            sink.body(body)
            if pending is not None:  # kept while small, so a stale connection can be retried
                if req.body_bytes <= _REPLAY_MAX:
                    pending.append(body)
                else:
                    req.pending = None
        elif pending is not None and not req.responded:
            pending.append(body)
            if req.body_bytes > req.buffer_limit:
                self.body_flow(resume=False)
                if req.on_overflow is not None:
                    callback, req.on_overflow = req.on_overflow, None
                    callback()

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        req.body_complete = True
        if req is self.active:
            self._disarm()
        elif self.active is None and not self.queue and not self._broken:
            self._arm(self.config.keepalive_timeout, self._idle_timeout)
        if req.sink is not None:
            req.sink.body_end()
        elif req.on_body_done is not None and not req.responded:
            req.on_body_done()

    # answering

    def _start(self, req: Request) -> None:
        self.active = req
        self._disarm()
        self.app.handle(req)

    def _enqueue(self, req: Request, response: bytes, close: bool = False) -> None:
        req.responded = True
        if not req.has_body:
            req.body_complete = True  # on_message_complete follows at once
        if self.active is None and not self.queue:
            self.active = req
            self.write(response)
            self.finish(req, reusable=not close)
        else:
            self.queue.append(response)
            self._set_read_pause(2, True)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def finish(self, req: Request, reusable: bool) -> None:
        """The response to ``req`` is complete; go on with the next request or close."""
        if req is not self.active:
            return
        self.active = None
        self.on_write_pause = None
        req.on_lost = None
        if self.transport is None:
            return
        if (
            not reusable
            or not req.keep_alive
            or not req.body_complete
            or self.closing
            or self._closed
        ):
            self._close()
            return
        while self.queue:
            item = self.queue.popleft()
            if isinstance(item, bytes):
                self.write(item)
                self._close()
                return
            if not self.queue:
                self._set_read_pause(2, False)
            self._start(item)
            return
        if self._broken:  # reading stopped after a refused request: nothing more will come
            self._close()
            return
        self._set_read_pause(2, False)
        if self.req is None:
            self._arm(self.config.keepalive_timeout, self._idle_timeout)
        else:
            self._arm(self.config.header_timeout, self._head_timeout)

    def abort(self) -> None:
        """Drop the connection at once (a response that cannot be completed)."""
        self._broken = self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self._broken = self._closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _stop_reading(self) -> None:
        self._broken = True
        self._set_read_pause(4, True)

    def _reject(self, error: GatewayError) -> None:
        """A framing or limit error on the request being parsed: answer in order, then close."""
        self._in_head = False
        self._stop_reading()
        req = self.req
        self.req = None
        request_id = new_request_id()
        response = error.response(request_id, close=True)
        if req is not None and req is not self.active and not req.responded:
            self.app.refused(req, error, request_id)  # else it was answered and logged
        if req is not None and req is self.active:
            # the request is being forwarded and its body went wrong
            if req.on_lost is not None:
                callback, req.on_lost = req.on_lost, None
                callback(error)  # drops the upstream request, answers (or aborts), accounts
                return
            if req.responded:
                self.abort()  # the response began: it cannot be completed
            else:
                req.responded = True
                self.write(response)
                self._close()
            return
        if req is not None and req in self.queue:
            self.queue.remove(req)  # pipelined behind the active one: answered in its turn
        if self.active is None and not self.queue:
            self.write(response)
            self._close()
        else:
            self.queue.append(response)

    # deadlines

    # One timer per connection, moved lazily: a later deadline keeps the timer that is already
    # set and is re-armed when it fires, so a keep-alive request costs one timer, not three.

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._due = self.loop.time() + delay
        self._on_due = callback
        self._timer.ensure(self._due)

    def _disarm(self) -> None:
        self._on_due = None

    def _cancel_timer(self) -> None:
        self._on_due = None
        self._timer.cancel()

    def _tick(self) -> None:
        callback = self._on_due
        if callback is None or self.transport is None:
            return
        if self.loop.time() < self._due:
            self._timer.ensure(self._due)
            return
        self._on_due = None
        callback()

    def _head_timeout(self) -> None:
        if self.active is not None:
            return
        if self.req is None and not self._in_head:
            self._close()
            return
        self.req = None
        self._stop_reading()
        error = GatewayError(408, "request_timeout", "The request head did not arrive in time.")
        self.write(error.response(new_request_id(), close=True))
        self._close()

    def _idle_timeout(self) -> None:
        if self.active is None and self.req is None:
            self._close()

    def _body_timeout(self) -> None:
        req = self.req
        if req is None or req.body_complete or self.transport is None:
            return
        if self._read_paused:  # we stopped reading; the client is not to blame
            self._arm(self.config.body_timeout, self._body_timeout)
            return
        waited = self.loop.time() - self._last_rx
        if waited < self.config.body_timeout:
            self._arm(self.config.body_timeout - waited, self._body_timeout)
            return
        self._reject(GatewayError(408, "request_timeout", "The request body stopped arriving."))

    def shutdown(self) -> None:
        """Graceful stop: close when idle, or right after the response in progress."""
        self.draining = True
        self.closing = True
        if self.active is None and self.req is None and not self.queue:
            self._close()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection we are closing."""


def _not_implemented(message: str) -> GatewayError:
    return GatewayError(501, "not_implemented", message, type="invalid_request_error")


def _headers_too_large() -> GatewayError:
    return GatewayError(431, "headers_too_large", "The request headers are too large.")


def _body_too_large() -> GatewayError:
    return GatewayError(413, "request_too_large", "The request body is too large.")


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return None


def _parser_message(exc: Exception) -> str:
    text = str(exc).split(":")[0].strip() or "malformed request"
    printable = "".join(c for c in text if c.isprintable())[:120]
    return f"Malformed HTTP request ({printable})."
