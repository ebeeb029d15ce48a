"""A small raw-socket HTTP/1.1 client for hostile-input tests.

It sends exactly the bytes it is given and parses what comes back with h11 as a strict parser,
so a malformed response from the gateway makes the test fail loudly instead of being "fixed
up" by a lenient client. It can also tell whether the server closed the connection.

    with RawConn(port) as c:
        c.send(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        r = c.read_response()
        assert r.status == 200 and not c.is_closed(0.2)

Every read is bounded by a timeout (a socket read with a timeout, never a sleep).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import h11


class RawTimeout(AssertionError):
    """Nothing (or not enough) arrived within the timeout."""


class RawClosed(AssertionError):
    """The peer closed (or reset) the connection before a complete response head arrived."""


@dataclass
class RawResponse:
    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False  # the body ended where its framing says it ends
    error: str | None = None  # why the body is incomplete (h11 error, EOF, reset)
    informational: list[int] = field(default_factory=list)  # 1xx statuses seen before this one
    chunked: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def headers_named(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        """The response announced Connection: close (or is HTTP/1.0 without keep-alive)."""
        conn = (self.header("connection") or "").lower()
        tokens = {t.strip() for t in conn.split(",")}
        if self.http_version == "1.0":
            return "keep-alive" not in tokens
        return "close" in tokens


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str | None = "gw.test",
    version: str = "HTTP/1.1",
    content_length: bool = True,
) -> bytes:
    """Build the bytes of a simple well-formed request (tests add the hostile parts themselves)."""
    lines = [f"{method} {target} {version}".encode()]
    if host is not None:
        lines.append(b"Host: " + host.encode())
    for k, v in headers or []:
        lines.append(k.encode() + b": " + v.encode())
    if content_length and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RawConn:
    """One client TCP connection to 127.0.0.1:port."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._h11 = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=256 * 1024)
        self._eof = False
        self._reset = False
        self.raw_received = bytearray()  # every byte received, for "never contains" checks
        self.closed_at: float | None = None
        self._interim: list[int] = []  # 1xx already consumed by read_interim

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0), like a client that crashed."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    # -- sending ---------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Send all bytes; return False (instead of raising) if the peer already closed."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self._reset = True
            return False

    def trickle(self, parts: list[bytes], delay: float, stop_when_answered: bool = True) -> int:
        """Send parts one by one, waiting ``delay`` between them (a slow client).

        Stops early when the server answers or closes (if ``stop_when_answered``).
        Returns how many parts were sent.
        """
        sent = 0
        for part in parts:
            if not self.send(part):
                return sent
            sent += 1
            if stop_when_answered and self._readable(delay):
                return sent
            if not stop_when_answered:
                time.sleep(delay)
        return sent

    def _readable(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(r)

    # -- receiving -------------------------------------------------------------------------
    def _recv(self, deadline: float) -> bytes:
        """One recv; b"" on EOF or reset; raises RawTimeout at the deadline."""
        if self._eof:
            return b""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RawTimeout("timed out waiting for data from the gateway")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise RawTimeout("timed out waiting for data from the gateway") from None
        except ConnectionResetError:
            self._reset = True
            data = b""
        if not data:
            self._eof = True
            self.closed_at = time.monotonic()
        self.raw_received += data
        return data

    def _prepare(self, method: str) -> None:
        """Tell h11 a request went out, so it expects a response (we send our own bytes)."""
        st = self._h11
        if st.our_state is h11.DONE and st.their_state is h11.DONE:
            st.start_next_cycle()
        if st.our_state is h11.IDLE:
            st.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            st.send(h11.EndOfMessage())

    def _next_event(self, deadline: float) -> Any:
        while True:
            ev = self._h11.next_event()
            if ev is h11.NEED_DATA:
                self._h11.receive_data(self._recv(deadline))
                continue
            return ev

    def read_interim(self, method: str = "GET", timeout: float | None = None) -> int:
        """Read the next response head and require it to be a 1xx; return its status."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._prepare(method)
        try:
            ev = self._next_event(deadline)
        except h11.RemoteProtocolError as exc:
            raise AssertionError(f"invalid or no HTTP response from the gateway: {exc}") from None
        assert isinstance(ev, h11.InformationalResponse), f"expected a 1xx response, got {ev!r}"
        self._interim.append(ev.status_code)
        return ev.status_code

    def read_head(self, method: str = "GET", timeout: float | None = None) -> RawResponse:
        """Read up to the end of the final (non-1xx) response head."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._prepare(method)
        informational, self._interim = self._interim, []
        while True:
            try:
                ev = self._next_event(deadline)
            except h11.RemoteProtocolError as exc:
                if self._eof and not self._h11.trailing_data[0] and not informational:
                    raise RawClosed(
                        f"connection closed without a response (reset={self._reset})"
                    ) from None
                raise AssertionError(f"invalid HTTP response from the gateway: {exc}") from None
            if isinstance(ev, h11.ConnectionClosed):
                raise RawClosed(f"connection closed without a response (reset={self._reset})")
            if isinstance(ev, h11.InformationalResponse):
                informational.append(ev.status_code)
                continue
            assert isinstance(ev, h11.Response), ev
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
            resp = RawResponse(
                status=ev.status_code,
                reason=ev.reason.decode("latin-1"),
                http_version=ev.http_version.decode(),
                headers=headers,
                informational=informational,
            )
            te = (resp.header("transfer-encoding") or "").lower()
            resp.chunked = "chunked" in te
            return resp

    def read_body_part(self, timeout: float | None = None) -> bytes | None:
        """Next piece of body data as it arrives; None at the end of the message."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        ev = self._next_event(deadline)
        if isinstance(ev, h11.Data):
            return bytes(ev.data)
        if isinstance(ev, h11.EndOfMessage):
            return None
        raise AssertionError(f"unexpected event {ev!r}")

    def read_body(self, resp: RawResponse, timeout: float | None = None) -> RawResponse:
        """Read the rest of the body into ``resp``; an incomplete body sets resp.error."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        parts = [resp.body]
        try:
            while True:
                ev = self._next_event(deadline)
                if isinstance(ev, h11.Data):
                    parts.append(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    resp.complete = True
                    break
                else:
                    resp.error = f"unexpected event {ev!r}"
                    break
        except h11.RemoteProtocolError as exc:
            resp.error = f"{exc} (reset={self._reset})"
        resp.body = b"".join(parts)
        return resp

    def read_until(self, resp: RawResponse, needle: bytes, timeout: float | None = None) -> bytes:
        """Read body data into resp.body until it contains ``needle``; return the body so far."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while needle not in resp.body:
            ev = self._next_event(deadline)
            if isinstance(ev, h11.Data):
                resp.body += bytes(ev.data)
            else:
                raise AssertionError(f"body ended ({ev!r}) before {needle!r}: {resp.body!r}")
        return resp.body

    def read_response(
        self, method: str = "GET", timeout: float | None = None, allow_incomplete: bool = False
    ) -> RawResponse:
        """Read one complete response (skipping 1xx, which are listed in .informational)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        resp = self.read_head(method, timeout=deadline - time.monotonic())
        self.read_body(resp, timeout=max(0.0, deadline - time.monotonic()))
        if not allow_incomplete:
            assert resp.complete, f"incomplete response body: {resp.error}; got {resp.body!r}"
        return resp

    def is_closed(self, timeout: float = 1.0) -> bool:
        """True if the server closes the connection within ``timeout``.

        Bytes that arrive meanwhile are kept in .extra (they would be an unexpected response).
        """
        if self._eof:
            return True
        deadline = time.monotonic() + timeout
        try:
            while True:
                data = self._recv(deadline)
                self._h11.receive_data(data)
                if not data:
                    return True
        except RawTimeout:
            return False

    @property
    def extra(self) -> bytes:
        """Bytes received beyond the responses parsed so far."""
        return bytes(self._h11.trailing_data[0])

    def rest(self, timeout: float = 1.0) -> bytes:
        """Everything that arrives after the parsed responses until close or ``timeout``."""
        self.is_closed(timeout)
        return self.extra

    @property
    def was_reset(self) -> bool:
        return self._reset


def exchange(port: int, data: bytes, timeout: float = 5.0, method: str = "GET") -> RawResponse:
    """Send ``data`` on a fresh connection and return the first response."""
    with RawConn(port, timeout=timeout) as c:
        c.send(data)
        return c.read_response(method)


def mutate(draw: Any, seed: bytes, pieces: list[bytes], start: int = 0) -> bytes:
    """1-3 random edits (insert, replace or delete a piece) after byte ``start`` of ``seed``;
    ``draw`` is a hypothesis draw function."""
    from hypothesis import strategies as st

    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(start, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.sampled_from(pieces))
        if op == "insert":
            data[pos:pos] = piece
        elif op == "replace":
            data[pos : pos + len(piece)] = piece
        else:
            del data[pos : pos + draw(st.integers(1, 4))]
    return bytes(data)
