"""The upstream side: pooled HTTP/1.1 client connections on llhttp (httptools).

A connection parses the response and hands head, body pieces and the end to a
:class:`Listener` from inside the protocol callbacks, so relaying a chunk costs one parser
callback and one write: no task, no queue, no await per chunk. Timeouts are one timer per
request, re-armed from timestamps rather than per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from . import errors
from .config import Config, Upstream
from .errors import GatewayError
from .timer import LazyTimer

if TYPE_CHECKING:
    from .outbound import ProxyURL

log = logging.getLogger("openai_forward")

# RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text )
_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Listener(Protocol):
    """Receives one upstream response. Calls come from the event loop, in this order:
    ``on_head``, ``on_body``*, then exactly one of ``on_complete`` or ``on_error``;
    ``flush`` after each batch of bytes read from the socket."""

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...
    def on_error(self, error: GatewayError, stale: bool) -> None: ...
    def flush(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream, carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: Listener | None = None
        self.on_write_pause: Callable[[bool], None] | None = None
        self.idle_since = 0.0
        self.requests = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._chunked_body = False
        self._body_sent = False
        self._head_only = False
        self._got_bytes = False
        self._until_close = False
        self._informational = False
        self._reusable = True
        self._out: list[bytes] | None = None
        self._timer = LazyTimer(self.loop, self._tick)
        self._started = 0.0
        self._last_progress = 0.0
        self._client_paused = False

    # transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._timer.cancel()
        self.pool.forget(self)
        listener = self.listener
        if listener is None:
            return
        if self._until_close and self._status and exc is None:
            self._complete()  # a body delimited by the close: a clean EOF ends it
            return
        stale = not self._got_bytes and self.requests > 1
        self._fail(errors.upstream_disconnected(), stale)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what it meant

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            self.close()  # bytes on an idle connection: the upstream is confused
            return
        self._last_progress = self.loop.time()
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(errors.upstream_protocol_error(), stale=False)
            return
        if self.listener is not None:
            listener.flush()

    def pause_writing(self) -> None:
        if self.on_write_pause is not None:
            self.on_write_pause(True)

    def resume_writing(self) -> None:
        if self.on_write_pause is not None:
            self.on_write_pause(False)

    # parser callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599 or (self._reason and _BAD_REASON.search(self._reason)):
            raise ValueError("invalid status line")  # fails the response as a protocol error
        if status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: not relayed
            return
        self._status = status
        self._reusable = self.parser.should_keep_alive()
        headers = self._headers
        if not self._head_only and status not in (204, 304):
            self._until_close = not any(
                n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers
            )
        assert self.listener is not None
        self.listener.on_head(status, self._reason, headers)
        if self._head_only and self.listener is not None:
            self._reusable = False  # llhttp would wait for the body a HEAD answer never has
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.listener is not None:
            self.listener.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._reason = b""
            self._headers = []
            return
        if self.listener is not None:
            self._complete()

    # the request

    def start(self, head: bytes, listener: Listener, chunked: bool, head_only: bool) -> None:
        """Begin a request: the head now (corked until :meth:`uncork`), the body via the sink."""
        self.listener = listener
        self.requests += 1
        self._chunked_body = chunked
        self._body_sent = False
        self._head_only = head_only
        self._got_bytes = False
        self._until_close = False
        self._status = 0
        self._reason = b""
        self._headers = []
        self._out = [head]
        self._started = self._last_progress = self.loop.time()
        self._timer.ensure(self._started + self.pool.tick)

    def uncork(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def body(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked_body:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def body_end(self) -> None:
        if self._chunked_body:
            self._write(b"0\r\n\r\n")
        self._body_sent = True

    def client_paused(self, paused: bool) -> None:
        """The client's socket is full (or drained): stop (or resume) reading the upstream."""
        if self.transport is None or paused == self._client_paused:
            return
        self._client_paused = paused
        self._last_progress = self.loop.time()
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _complete(self) -> None:
        listener, self.listener = self.listener, None
        self.on_write_pause = None
        reusable = (
            self._reusable and self._body_sent and not self._until_close and not self._client_paused
        )
        if listener is not None:
            listener.on_complete()
        if reusable and self.transport is not None:
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, error: GatewayError, stale: bool) -> None:
        listener, self.listener = self.listener, None
        self.close()
        if listener is not None:
            listener.on_error(error, stale)

    def abort(self) -> None:
        """Drop the request and the connection at once (the client went away)."""
        self.listener = None
        self.close()

    def close(self) -> None:
        self._timer.cancel()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    # deadlines

    # One timer per connection, checked against timestamps when it fires: while a request
    # waits for its first byte the limit is read_timeout, after it idle_timeout since the
    # last byte. A timer still pending from the previous request is reused as it is.

    def _tick(self) -> None:
        if self.listener is None:
            return
        now = self.loop.time()
        if self._got_bytes:
            limit, waited = self.pool.idle_timeout, now - self._last_progress
        else:
            limit, waited = self.pool.read_timeout, now - self._started
        if waited >= limit:
            if self._got_bytes:
                self._fail(errors.stream_stalled(), stale=False)
            else:
                self._fail(errors.upstream_timeout(retry=False), stale=False)
            return
        self._timer.ensure(now + min(limit - waited, self.pool.tick))


class Pool:
    """Idle keep-alive connections to one upstream, most recently used first."""

    def __init__(
        self,
        upstream: Upstream,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        proxy: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.loop = loop
        self.size = config.pool_size
        self.max_idle = config.pool_idle_timeout
        self.connect_timeout = config.connect_timeout
        self.read_timeout = config.read_timeout
        self.idle_timeout = config.idle_timeout
        self.tick = min(config.read_timeout, config.idle_timeout)
        self.idle: list[UpstreamConnection] = []
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if upstream.tls else None
        self.proxy: ProxyURL | None = None
        if proxy:
            from .outbound import parse_proxy_url

            self.proxy = parse_proxy_url(proxy, "proxy")
        self._sweeper = loop.call_later(self.max_idle, self._sweep)

    def take(self) -> UpstreamConnection | None:
        """An idle connection that is still open and fresh, or None."""
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.transport is not None and now - conn.idle_since < self.max_idle:
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises GatewayError 502 if it cannot be made in time."""
        up = self.upstream
        hostname = up.host if self.ssl else None
        opening: Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]
        if self.proxy is None:
            opening = self.loop.create_connection(
                lambda: UpstreamConnection(self),
                up.host,
                up.port,
                ssl=self.ssl,
                server_hostname=hostname,
            )
        else:
            from .outbound import open_via_proxy

            opening = open_via_proxy(
                self.loop,
                self.proxy,
                lambda: UpstreamConnection(self),
                up.host,
                up.port,
                self.ssl,
                hostname,
            )
        try:
            _, conn = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            # a proxy's refusal says why (never with its password); others by kind only
            detail = str(exc) if type(exc).__name__ == "ProxyError" else type(exc).__name__
            log.warning("upstream connect failed: %s", detail)
            raise errors.upstream_connect_error() from None
        return cast(UpstreamConnection, conn)

    async def fetch(self, head: bytes, limit: int = 8 * 1024 * 1024) -> tuple[int, bytes]:
        """Send a bodyless request of the gateway's own; return (status, body).

        For small internal reads such as /v1/models, never for client traffic.
        """
        conn = self.take() or await self.connect()
        collector = _Collector(self.loop, limit)
        conn.start(head, collector, chunked=False, head_only=False)
        conn.body_end()
        conn.uncork()
        try:
            return await collector.done
        finally:
            if conn.listener is collector:
                conn.abort()

    def release(self, conn: UpstreamConnection) -> None:
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if len(self.idle) > self.size:
            self.idle.pop(0).close()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def _sweep(self) -> None:
        cutoff = self.loop.time() - self.max_idle
        for conn in [c for c in self.idle if c.idle_since <= cutoff]:
            conn.close()
        self._sweeper = self.loop.call_later(self.max_idle / 2, self._sweep)

    def close(self) -> None:
        self._sweeper.cancel()
        for conn in list(self.idle):
            conn.close()


class _Collector:
    """A Listener that keeps a whole (small) response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.done: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.limit = limit
        self.status = 0
        self.parts: list[bytes] = []
        self.size = 0

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.limit:
            self.parts.append(data)

    def on_complete(self) -> None:
        if not self.done.done():
            if self.size > self.limit:
                self.done.set_exception(errors.upstream_protocol_error())
            else:
                self.done.set_result((self.status, b"".join(self.parts)))

    def on_error(self, error: GatewayError, stale: bool) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def flush(self) -> None:
        pass
