"""The request path, top to bottom.

``Proxy.begin`` runs when a request head is complete: it makes the path canonical, answers
the health check and sets the body limit. ``Proxy.handle`` then forwards the request, still
inside the same parser callback when a pooled upstream connection is idle (a task only opens
new connections): it writes the filtered head and attaches the streaming body. From there a
:class:`Relay` copies the response to the client from inside the upstream parser's
callbacks, so a chunk reaches the client in the same loop iteration it arrived in, and the
relay's last callback hands the client connection back for its next request.
"""

from __future__ import annotations

import asyncio
import logging

from . import errors
from .config import Config
from .errors import GatewayError, new_request_id
from .http1 import Request
from .paths import PathError, canonicalize, split_target, with_v1
from .upstream import Pool, UpstreamConnection

log = logging.getLogger("openai_forward")

# RFC 9110 §7.6.1 hop-by-hop fields, and the fields the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"forwarded"}

UPLOAD_PREFIXES = (
    "/v1/files",
    "/v1/uploads",
    "/v1/audio/",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/videos",
)

_NO_BODY_STATUS = frozenset({204, 304})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Field names listed in Connection headers that are not already hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens - HOP_BY_HOP)


def _drop_named(lines: list[bytes], start: int, names: frozenset[bytes]) -> list[bytes]:
    """``lines[start:]`` are "name: value" lines; drop those whose name is in ``names``."""
    kept = [ln for ln in lines[start:] if ln.split(b":", 1)[0].lower() not in names]
    return lines[:start] + kept


class Proxy:
    """The application the server protocol drives: one per worker, no per-request state."""

    def __init__(self, config: Config, pool: Pool) -> None:
        up = config.upstream
        self.pool = pool
        self.loop = pool.loop
        self.base = up.base_path.encode()
        self.host_line = b"host: " + up.host_header
        self.default_auth = (
            b"authorization: Bearer " + config.api_key.encode() if config.api_key else None
        )
        self.health_path = config.health_path
        self.forwarded_for = config.forwarded_for
        self.body_limit = config.max_body_size
        self.upload_limit = config.max_upload_size

    # at end of headers, synchronously

    def begin(self, req: Request) -> bytes | None:
        """Check the head; return a complete response to send now, or None to forward."""
        try:
            path, query = split_target(req.target)
            path = canonicalize(path)
        except PathError as exc:
            raise errors.bad_request(str(exc), "invalid_path") from None
        if path == self.health_path and req.method in (b"GET", b"HEAD"):
            return _health_response(req)
        path = with_v1(path)
        req.path = path
        req.query = query
        req.body_limit = self.upload_limit if path.startswith(UPLOAD_PREFIXES) else self.body_limit
        if req.content_length is not None and req.content_length > req.body_limit:
            raise GatewayError(413, "request_too_large", "The request body is too large.")
        return None

    def request_head(self, req: Request) -> bytes:
        """The head sent upstream: filtered client headers, our Host, body framing, key."""
        target = self.base + req.path.encode()
        if req.query:
            target += b"?" + req.query.encode()
        lines = [req.method + b" " + target + b" HTTP/1.1", self.host_line]
        has_auth = False
        extra: frozenset[bytes] | None = None
        for name, value in req.headers:
            lname = name.lower()
            if lname in REQUEST_DROP:
                if lname == b"connection":
                    extra = _connection_tokens(req.headers) or None
                continue
            if b"_" in lname or lname.startswith(b"x-forwarded-"):
                continue
            if lname == b"authorization":
                has_auth = True
            lines.append(name + b": " + value)
        if extra is not None:
            lines = _drop_named(lines, 2, extra)
        if not has_auth and self.default_auth is not None:
            lines.append(self.default_auth)
        if self.forwarded_for and req.client.peer:
            lines.append(b"x-forwarded-for: " + req.client.peer.encode())
        if req.chunked:
            lines.append(b"transfer-encoding: chunked")
        elif req.content_length is not None:
            lines.append(b"content-length: %d" % req.content_length)
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    # forwarding

    def handle(self, req: Request) -> None:
        """Forward ``req``. With a pooled connection at hand the request goes out now, in
        this callback; otherwise a task opens a connection first. Never raises."""
        relay = Relay(self, req)
        req.on_lost = relay.client_lost
        try:
            relay.head = self.request_head(req)
            conn = self.pool.take()
            if conn is not None:
                relay.start(conn, reused=True)
            else:
                relay.task = self.loop.create_task(relay.connect())
        except Exception:
            relay.internal_error()


class Relay:
    """One request's journey: upstream attempt(s) and the copy of the response."""

    __slots__ = (
        "chunked",
        "client",
        "conn",
        "head",
        "keep_client",
        "out",
        "proxy",
        "req",
        "retried",
        "reused",
        "sse",
        "task",
    )

    def __init__(self, proxy: Proxy, req: Request) -> None:
        self.proxy = proxy
        self.req = req
        self.client = req.client
        self.head = b""
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.out: list[bytes] = []
        self.chunked = False
        self.sse = False
        self.keep_client = True
        self.reused = False
        self.retried = False

    def start(self, conn: UpstreamConnection, reused: bool) -> None:
        """Send the head and whatever body has arrived; the rest streams as it comes."""
        req = self.req
        self.conn = conn
        self.reused = reused
        self.client.on_write_pause = conn.client_paused
        conn.on_write_pause = self._upstream_write_pause
        conn.start(self.head, self, req.chunked, req.method == b"HEAD")
        req.attach(conn)
        conn.uncork()
        if self.client.write_paused:  # still full from the previous response
            conn.client_paused(True)

    async def connect(self) -> None:
        """Open a new upstream connection, then start; errors become the response."""
        try:
            conn = await self.proxy.pool.connect()
        except GatewayError as exc:
            self.task = None
            self.fail_before_response(exc)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            self.internal_error()
            return
        self.task = None
        if self.client.transport is None:  # the client left while we connected
            self.proxy.pool.release(conn)
            return
        try:
            self.start(conn, reused=False)
        except Exception:
            self.internal_error()

    def _upstream_write_pause(self, paused: bool) -> None:
        if not self.req.body_complete:
            self.client.body_flow(resume=not paused)

    # Listener: called by the upstream connection

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.req
        lines = [b"HTTP/1.1 %d %b" % (status, reason)]
        length = False
        extra: frozenset[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    extra = _connection_tokens(headers) or None
                continue
            if lname == b"content-length":
                length = True
            elif lname == b"content-type" and value[:17].lower() == b"text/event-stream":
                self.sse = True
            lines.append(name + b": " + value)
        if extra is not None:
            lines = _drop_named(lines, 1, extra)
        if self.sse:
            lines.append(b"x-accel-buffering: no")
        bodyless = req.method == b"HEAD" or status in _NO_BODY_STATUS
        if not bodyless and not length:
            if req.version == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked")
            else:
                self.keep_client = False
        if not req.keep_alive or not self.keep_client or self.client.closing:
            self.keep_client = False
            if req.version == "1.1":
                lines.append(b"connection: close")
        elif req.version == "1.0":
            lines.append(b"connection: keep-alive")
        lines.append(b"\r\n")
        req.responded = True
        self.out.append(b"\r\n".join(lines))

    def on_body(self, data: bytes) -> None:
        if self.chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def on_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self.req.on_lost = None
        self.client.finish(self.req, reusable=self.keep_client)

    def on_error(self, error: GatewayError, stale: bool) -> None:
        req = self.req
        if not req.responded:
            if stale and self.reused and not self.retried and req.replayable:
                # the upstream had closed this pooled connection while it was idle
                self.retried = True
                req.detach()
                log.info("retrying on a new connection after a stale pooled one")
                self.task = self.proxy.loop.create_task(self.connect())
            else:
                self.fail_before_response(error)
            return
        self.flush()
        req.on_lost = None
        log.warning("upstream failed mid-response: %s", error.code)
        if self.sse and self.chunked:
            event = error.sse_event()
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
        else:
            self.client.abort()
        self.client.finish(req, reusable=False)

    # the client side

    def client_lost(self) -> None:
        """The client went away: drop the upstream request now; it is not the upstream's fault."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.conn is not None and self.conn.listener is self:
            self.conn.abort()

    def internal_error(self) -> None:
        log.exception("internal error while forwarding %s", self.req.path)
        self.client_lost()
        self.fail_before_response(
            GatewayError(500, "internal_error", "The gateway failed to handle the request.")
        )

    def fail_before_response(self, error: GatewayError) -> None:
        req = self.req
        req.on_lost = None
        req.detach()
        if req.responded:
            self.client.abort()
            self.client.finish(req, reusable=False)
            return
        req.responded = True
        close = not req.body_complete or not req.keep_alive
        head_only = req.method == b"HEAD"
        self.client.write(error.response(new_request_id(), close=close, head_only=head_only))
        self.client.finish(req, reusable=not close)


def _health_response(req: Request) -> bytes:
    body = b'{"status":"ok"}'
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
        b"content-length: %d\r\n" % len(body)
    )
    if req.version == "1.0" and req.keep_alive:
        head += b"connection: keep-alive\r\n"
    elif not req.keep_alive:
        head += b"connection: close\r\n"
    head += b"\r\n"
    return head if req.method == b"HEAD" else head + body
