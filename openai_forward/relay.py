"""One request's journey through the gateway: its upstream attempt(s), the copy of the
response to the client (or the replay of a cached one), and the accounting at its end.

A :class:`Relay` is made by :meth:`proxy.Proxy.handle` for every forwarded request and is
the ``UpstreamListener`` of the upstream connection it rides on. Retries on another pool
key, fallbacks to another upstream and a stale pooled connection's single retry happen here,
always before the first byte of the response went to the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from . import errors
from .accounting import Account
from .cache import DIRECTIVE_HEADER, Entry, Recorder, paced, stream_complete
from .caching import Ticket, chunk, replay_head
from .errors import GatewayError, new_request_id
from .headers import HOP_BY_HOP, connection_tokens, drop_named
from .http1 import Request
from .keypool import Key, error_code, retry_after
from .targets import Target
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger("openai_forward")

_NO_BODY_STATUS = frozenset({204, 304})
# upstream failures by kind, for the metrics
_ERROR_KINDS = {
    "upstream_connect_error": "connect",
    "upstream_timeout": "timeout",
    "upstream_disconnected": "reset",
    "upstream_protocol_error": "protocol",
}
_KEY_FAILURES = frozenset({401, 403, 429})  # answers that say something about the key


class Relay:
    """One request's journey: upstream attempt(s) and the copy of the response."""

    __slots__ = (
        "acct",
        "before",
        "chunked",
        "client",
        "conn",
        "discard",
        "fell_back",
        "head",
        "keep_client",
        "key",
        "observe",
        "origin",
        "out",
        "proxy",
        "req",
        "retried",
        "reused",
        "sse",
        "status",
        "tail",
        "target",
        "task",
        "ticket",
        "tried_keys",
    )

    def __init__(self, proxy: Proxy, req: Request) -> None:
        self.proxy = proxy
        self.req = req
        self.client = req.client
        self.head = b""
        self.target: Target | None = None
        self.origin: Target | None = None  # the upstream picked first; its fallbacks count
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.out: list[bytes] = []
        self.chunked = False
        self.sse = False
        self.keep_client = True
        self.reused = False
        self.retried = False
        self.fell_back = 0
        self.key: Key | None = None  # the pool key this attempt carries
        self.tried_keys: list[Key] = []
        self.discard: bytearray | None = None  # a failed answer read and dropped, to retry
        self.observe: bytearray | None = None  # a relayed 429's body, to learn why
        self.acct: Account | None = None
        self.ticket: Ticket | None = None  # the request's part in the response cache
        self.status = 0
        self.tail = b""  # the last piece sent to the client ...
        self.before = b""  # ... and the one before it (an event can straddle two reads)

    def begin(self, target: Target) -> None:
        """Send the request to ``target``: now on an idle pooled connection, else once a new
        connection is open."""
        self.target = target
        if self.origin is None:
            self.origin = target
        try:
            # uncompressed: an answer to store in the cache, or a stream whose usage the
            # gateway asked for, which it must read (and take out) on its way through
            acct = self.acct
            plain = (self.ticket is not None and self.ticket.write) or (
                acct is not None and acct.strip
            )
            self.head = self.proxy.request_head(self.req, target, self._take_key, plain=plain)
        except GatewayError as exc:  # no key of this upstream is usable now
            if not self.fall_back(exc):
                self.fail_before_response(exc)
            return
        conn = target.pool.take()
        if conn is not None:
            self.start(conn, reused=True)
        else:
            self.task = self.proxy.loop.create_task(self.connect())

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
        assert self.target is not None
        pool = self.target.pool
        try:
            conn = await pool.connect()
        except GatewayError as exc:
            self.task = None
            self._count_error(exc)
            if not self.fall_back(exc):
                self.fail_before_response(exc)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            self.internal_error()
            return
        self.task = None
        if self.client.transport is None:  # the client left while we connected
            pool.release(conn)
            return
        try:
            self.start(conn, reused=False)
        except Exception:
            self.internal_error()

    def replay(self, target: Target, entry: Entry) -> None:
        """Answer with a cache entry instead of the upstream: its body, or its stream's
        events in order (paced when ``cache_replay_pace`` is set)."""
        req = self.req
        self.target = target
        acct = self.acct
        if acct is not None:
            acct.upstream = target.name
            acct.hit = entry
            acct.cache = "hit"
            acct.sse = entry.stream
            metrics = self.proxy.meter.metrics
            if entry.stream and metrics is not None:
                metrics.stream_started()  # ended, like any stream, when the request ends
        req.on_body_done = req.on_overflow = None
        req.detach()
        req.responded = True
        self.status = 200
        self.keep_client = req.keep_alive and not (entry.stream and req.version == "1.0")
        head = replay_head(req, entry, acct.rate_lines if acct is not None else None)
        if req.method == b"HEAD":
            self._replayed(head)
            return
        if entry.events is None:
            self._replayed(head + entry.body)
            return
        self.chunked = req.version == "1.1"
        pace = self.proxy.cache.pace
        groups = (
            paced(entry.events, pace) if pace > 0 else [(0.0, b"".join(d for _, d in entry.events))]
        )
        if len(groups) == 1:
            self._replayed(head + chunk(groups[0][1], self.chunked))
            return
        self.client.write(head)
        self.task = self.proxy.loop.create_task(self._replay_paced(groups))

    async def _replay_paced(self, groups: list[tuple[float, bytes]]) -> None:
        start = self.proxy.loop.time()
        try:
            for at, data in groups:
                wait = start + at - self.proxy.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.client.write(chunk(data, self.chunked))
        except asyncio.CancelledError:
            return
        self.task = None
        self._replayed(b"")

    def _replayed(self, data: bytes) -> None:
        if self.chunked:
            data += b"0\r\n\r\n"
        if data:
            self.client.write(data)
        self.account_end(200)
        self.req.on_lost = None
        self.client.finish(self.req, reusable=self.keep_client)

    def _can_fall_back(self) -> bool:
        origin = self.origin
        return (
            origin is not None
            and self.req.may_replay
            and self.fell_back < min(self.proxy.max_fallbacks, len(origin.fallbacks))
        )

    def fall_back(self, error: GatewayError | None = None) -> bool:
        """Try the next fallback upstream, if the budget and the request allow it. A body
        still arriving (the failure came first) is awaited, up to the replay limit."""
        if not self._can_fall_back():
            return False
        origin, target = self.origin, self.target
        assert origin is not None and target is not None
        nxt = origin.fallbacks[self.fell_back]
        self.fell_back += 1
        log.info("upstream %s failed before answering; trying %s", target.name, nxt.name)
        self._retry(nxt, error or errors.upstream_disconnected())
        return True

    def _retry(self, target: Target, error: GatewayError) -> None:
        """Send the request again (to another upstream, or with another key) once the whole
        body is here; a body that outgrows the replay limit meanwhile gets ``error``."""
        req = self.req
        req.detach()
        self._release_key()
        if req.body_complete:
            self._begin_again(target)
            return
        req.on_body_done = lambda: self._begin_again(target)
        req.on_overflow = lambda: self.fail_before_response(error)

    def _begin_again(self, target: Target) -> None:
        self.req.on_body_done = self.req.on_overflow = None
        self.retried = False
        self.chunked = self.sse = False
        self.keep_client = True
        self.discard = self.observe = None
        try:
            self.begin(target)
        except Exception:
            self.internal_error()

    # upstream keys

    def _take_key(self) -> bytes | None:
        assert self.target is not None
        pool = self.target.keys
        if pool is None:
            return None
        now = self.proxy.loop.time()
        key = pool.acquire(now, exclude=self.tried_keys)
        if key is None:
            wait = max(1, math.ceil(pool.ready_in(now)))
            raise GatewayError(
                503,
                "no_upstream_key",
                "Every upstream key is cooling down or out of rotation; try again later.",
                headers=((b"retry-after", b"%d" % wait),),
            )
        self.key = key
        return key.secret

    def _release_key(self) -> None:
        key = self.key
        if key is not None:
            self.key = None
            assert self.target is not None and self.target.keys is not None
            self.target.keys.release(key)

    def _key_failed(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Report a 401/403/429 against the pool key; True if another key will be tried."""
        key, target = self.key, self.target
        assert key is not None and target is not None and target.keys is not None
        pool = target.keys
        now = self.proxy.loop.time()
        pool.report(key, status, now, retry_after=retry_after(headers, time.time()))
        log.warning("upstream %s refused key %s with %d", target.name, key.id, status)
        self.tried_keys.append(key)
        if not self.req.may_replay or len(self.tried_keys) >= len(pool.keys):
            return False
        probe = pool.acquire(now, exclude=self.tried_keys)
        if probe is None:
            return False
        pool.release(probe)
        return True

    def _upstream_write_pause(self, paused: bool) -> None:
        if not self.req.body_complete:
            self.client.body_flow(resume=not paused)

    # Listener: called by the upstream connection

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.req
        if self.key is not None and status in _KEY_FAILURES:
            if self._key_failed(status, headers):
                self.discard = bytearray()  # read this answer, then try the next key
                return
            if status == 429:
                self.observe = bytearray()  # relayed; its body says whether quota is gone
        if (status == 429 or status >= 500) and self._can_fall_back():
            assert self.conn is not None
            self.conn.abort()  # this answer is dropped unread; the next upstream answers instead
            self.fall_back()
            return
        lines = [b"HTTP/1.1 %d %b" % (status, reason)]
        length = False
        encoding = b""
        extra: frozenset[bytes] | None = None
        acct = self.acct
        # the gateway's own limits are the client's limits: the upstream's go
        own_rates = acct is not None and acct.rate_lines is not None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    extra = connection_tokens(headers) or None
                continue
            if own_rates and lname.startswith(b"x-ratelimit-"):
                continue
            if lname == b"content-length":
                length = True
            elif lname == b"content-type" and value[:17].lower() == b"text/event-stream":
                self.sse = True
            elif lname == b"content-encoding":
                encoding = value.strip().lower()
            lines.append(name + b": " + value)
        if extra is not None:
            lines = drop_named(lines, 1, extra)
        self.status = status
        if acct is not None:
            self._account_head(acct, status, encoding)
            if acct.rate_lines is not None:
                lines.extend(acct.rate_lines)
        if self.sse:
            lines.append(b"x-accel-buffering: no")
        ticket = self.ticket
        if ticket is not None:
            lines.append(DIRECTIVE_HEADER + b": miss")
            ticket.recorder = None
            if ticket.write and not self.fell_back:  # a fallback's answer is not the entry's
                recorder = Recorder(self.proxy.cache.max_entry)
                if recorder.head(status, headers):
                    ticket.recorder = recorder
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
        if self.discard is not None or self.observe is not None:
            self._keep_error_body(data)
            if self.discard is not None:
                return
        acct = self.acct
        if acct is not None:
            if acct.ttfb is None:
                acct.ttfb = time.perf_counter()
            capture = acct.capture
            if capture is not None:
                capture.keep(data)
            if acct.observer is not None:
                shown = acct.observer.feed(data)
                if shown is not None:
                    data = shown
                    if not data:
                        return  # held until its line ends
        ticket = self.ticket
        if ticket is not None and ticket.recorder is not None:
            ticket.recorder.feed(data, time.perf_counter())
        self.before = self.tail
        self.tail = data
        if self.chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _keep_error_body(self, data: bytes) -> None:
        kept = self.discard if self.discard is not None else self.observe
        assert kept is not None
        if len(kept) < 65536:
            kept += data[: 65536 - len(kept)]

    def _learn_quota(self, key: Key, body: bytes | bytearray) -> None:
        assert self.target is not None and self.target.keys is not None
        if error_code(bytes(body)) == "insufficient_quota":
            self.target.keys.report(key, 429, self.proxy.loop.time(), code="insufficient_quota")

    def on_complete(self) -> None:
        discard, self.discard = self.discard, None
        if discard is not None:  # a key was refused: try the next one
            assert self.target is not None
            key = self.tried_keys[-1]
            self._learn_quota(key, discard)
            self.key = None
            self._retry(self.target, errors.upstream_disconnected())
            return
        if self.observe is not None and self.key is not None:
            self._learn_quota(self.key, self.observe)
        self._answer_complete()
        self._release_key()
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self.req.on_lost = None
        self.client.finish(self.req, reusable=self.keep_client)

    def _answer_complete(self) -> None:
        """The whole answer is here: send what the observer held, account for the request
        and offer the answer to the cache."""
        acct = self.acct
        if acct is not None:
            tail = acct.observer.end() if acct.observer is not None else b""
            if tail:
                self.out.append(b"%x\r\n%b\r\n" % (len(tail), tail) if self.chunked else tail)
                if self.ticket is not None and self.ticket.recorder is not None:
                    self.ticket.recorder.feed(tail, time.perf_counter())
            self.account_end(self.status)
        ticket = self.ticket
        if ticket is not None and ticket.recorder is not None:
            usage, model = acct.final if acct is not None and acct.final else (None, None)
            self.proxy.cache.save(ticket, usage, model)

    def on_error(self, error: GatewayError, stale: bool) -> None:
        req = self.req
        self._count_error(error)
        if self.discard is not None:  # the refused key's answer broke off: next key anyway
            self.discard = None
            self.key = None
            assert self.target is not None
            self._retry(self.target, error)
            return
        if not req.responded:
            if stale and self.reused and not self.retried and req.replayable:
                # the upstream had closed this pooled connection while it was idle
                self.retried = True
                req.detach()
                log.info("retrying on a new connection after a stale pooled one")
                self.task = self.proxy.loop.create_task(self.connect())
            elif error.code == "upstream_timeout" or not self.fall_back(error):
                self.fail_before_response(error)
            return
        self.flush()
        self.account_end(self.status, error.code)
        self._release_key()
        req.on_lost = None
        log.warning("upstream failed mid-response: %s", error.code)
        if self.sse and self.chunked:
            event = error.sse_event()
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
        else:
            self.client.abort()
        self.client.finish(req, reusable=False)

    # accounting

    def _count_error(self, error: GatewayError) -> None:
        metrics = self.proxy.meter.metrics
        if metrics is not None and self.target is not None:
            kind = _ERROR_KINDS.get(error.code, error.code)
            metrics.upstream_error(self.target.name, kind)

    def _account_head(self, acct: Account, status: int, encoding: bytes) -> None:
        assert self.target is not None
        acct.upstream = self.target.name
        was_stream = acct.sse
        acct.on_head(status, self.sse, encoding)
        metrics = self.proxy.meter.metrics
        if metrics is not None:
            if self.sse and not was_stream:
                metrics.stream_started()
            if status == 429 or status >= 500:
                metrics.upstream_error(self.target.name, "429" if status == 429 else "5xx")

    def account_end(self, status: int, error_code: str | None = None) -> None:
        """Settle limits and record usage, once, however the request ended."""
        acct = self.acct
        if acct is not None and not acct.done:
            key = self.key
            if acct.upstream is None and self.target is not None:
                acct.upstream = self.target.name
            try:
                self.proxy.meter.finish(self.req, acct, status, error_code, key.id if key else None)
            except Exception:  # accounting must never break the relay
                acct.done = True
                log.exception("could not account for request %s", acct.request_id)

    # the client side

    def client_lost(self, error: GatewayError | None = None) -> None:
        """The client went away: drop the upstream request now; it is not the upstream's fault.
        With ``error``, the client is still there but its body broke a limit or its framing
        on the way (a chunked body past ``max_body_size``): it gets, and the logs record,
        that error.

        A stream whose last pieces sent end it as a complete stream does (``data: [DONE]``,
        or the Responses API's ``response.completed``) was complete for the client (the
        openai SDKs close the response as soon as they read ``[DONE]``, and the upstream's
        last chunk terminator may come later): it is accounted and cached as a finished
        answer, by the same test the cache applies to what it stores. The last two pieces
        are looked at, so a final event split over two reads counts; one split over more
        (larger than a read, or dribbled out) counts as a disconnect."""
        if error is not None:
            self._drop_upstream()
            self.fail_before_response(error)
            return
        if self.sse and self.req.responded and stream_complete([self.before, self.tail]):
            self._answer_complete()
        elif self.acct is not None:
            self.acct.client_closed = True
            self.account_end(self.status if self.req.responded else 499, "client_closed")
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        self.req.on_body_done = self.req.on_overflow = None
        self._release_key()
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.conn is not None and self.conn.listener is self:
            self.conn.abort()

    def internal_error(self) -> None:
        log.exception("internal error while forwarding %s", self.req.path)
        self._drop_upstream()
        self.fail_before_response(
            GatewayError(500, "internal_error", "The gateway failed to handle the request.")
        )

    def fail_before_response(self, error: GatewayError) -> None:
        req = self.req
        self.account_end(self.status if req.responded else error.status, error.code)
        self._release_key()
        req.on_lost = req.on_body_done = req.on_overflow = None
        req.detach()
        if req.responded:
            self.client.abort()
            self.client.finish(req, reusable=False)
            return
        req.responded = True
        close = not req.body_complete or not req.keep_alive
        head_only = req.method == b"HEAD"
        # the id the access log and the usage row carry, so a client's report can be found
        request_id = self.acct.request_id if self.acct is not None else new_request_id()
        self.client.write(error.response(request_id, close=close, head_only=head_only))
        self.client.finish(req, reusable=not close)
