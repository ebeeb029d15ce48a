"""Outbound proxies: reach the upstream through an HTTP(S) CONNECT or a SOCKS5 proxy.

One connection to the proxy carries the whole route. A small protocol (:class:`_Handshake`)
drives the proxy's handshake on it; then the upstream's TLS, if any, starts on the same
transport with ``loop.start_tls`` (for an ``https://`` proxy that is TLS inside TLS), and the
caller's protocol takes the transport over together with any bytes the proxy already sent.
Everything is non-blocking, and a cancelled or failed attempt closes its socket.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

from .config import ConfigError

SCHEMES = ("http", "https", "socks5", "socks5h")
DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
MAX_HEAD = 16 * 1024  # a CONNECT answer longer than this is not one

_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r\n")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class ProxyError(ConnectionError):
    """The proxy could not, or would not, open the tunnel. The message names no secret."""


@dataclass(frozen=True)
class ProxyURL:
    """A parsed proxy address; ``repr`` masks the password."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        password = None if self.password is None else "***"
        return (
            f"ProxyURL(scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
            f"username={self.username!r}, password={password!r})"
        )

    @property
    def basic_auth(self) -> bytes | None:
        """The ``Proxy-Authorization`` value for an http(s) proxy, or None without a user."""
        if self.username is None:
            return None
        userpass = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(userpass)


def parse_proxy_url(url: str, key: str) -> ProxyURL:
    """Parse ``scheme://[user[:password]@]host[:port]``; raises ConfigError naming `key`.

    Schemes: http, https (CONNECT; default ports 80 and 443), socks5 (names resolved here)
    and socks5h (names resolved by the proxy; both default to port 1080). User and password
    are percent-decoded. Messages show the URL with its password masked.
    """
    shown = _mask_password(url)
    if _SPACE_OR_CONTROL.search(url):
        raise ConfigError(f"{key}: {shown!r} has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: {shown!r} is not a valid URL (check the port)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not parts.netloc:
        raise ConfigError(
            f"{key}: {shown!r} is not an http://, https://, socks5:// or socks5h:// URL"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: {shown!r} must have no path, query or fragment")
    if not parts.hostname:
        raise ConfigError(f"{key}: {shown!r} has no host")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    _check_credentials(scheme, username, password, key, shown)
    return ProxyURL(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], username, password)


def _check_credentials(
    scheme: str, username: str | None, password: str | None, key: str, shown: str
) -> None:
    if username is None:
        return
    if not username:
        raise ConfigError(f"{key}: {shown!r} has an empty user name")
    if scheme.startswith("socks"):
        if len(username.encode()) > 255 or len((password or "").encode()) > 255:
            raise ConfigError(f"{key}: {shown!r}: SOCKS5 user and password are 255 bytes at most")
    elif ":" in username:
        raise ConfigError(f"{key}: {shown!r}: a Basic user name cannot contain ':'")


def _mask_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{tail}"


@functools.cache
def _default_proxy_ssl() -> ssl.SSLContext:
    return ssl.create_default_context()


async def open_via_proxy(
    loop: asyncio.AbstractEventLoop,
    proxy: ProxyURL,
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    ssl: ssl.SSLContext | None,
    server_hostname: str | None,
    *,
    proxy_ssl: ssl.SSLContext | None = None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Like ``loop.create_connection(protocol_factory, host, port, ssl=ssl,
    server_hostname=server_hostname)``, but through `proxy`.

    `proxy_ssl` verifies an ``https://`` proxy (default: one shared
    ``ssl.create_default_context()``). The protocol gets ``connection_made`` and then, if
    the proxy already relayed some of the upstream's bytes, ``data_received``.

    Raises OSError on any failure: the proxy's own connect errors (e.g.
    ConnectionRefusedError), :class:`ProxyError` for a refusal (407, a non-2xx CONNECT
    answer, a SOCKS5 error reply or refused credentials) or a broken handshake, and
    ``ssl.SSLError`` for TLS failures. Cancellation closes the connection.
    """
    tls_to_proxy = None
    if proxy.scheme == "https":
        tls_to_proxy = proxy_ssl or _default_proxy_ssl()
    transport, shake = await loop.create_connection(
        lambda: _Handshake(loop),
        proxy.host,
        proxy.port,
        ssl=tls_to_proxy,
        server_hostname=proxy.host if tls_to_proxy else None,
    )
    try:
        if proxy.scheme in ("http", "https"):
            await _http_connect(shake, proxy, host, port)
        else:
            await _socks5_connect(loop, shake, proxy, host, port)
        if ssl is not None:
            if shake.buffer:
                raise ProxyError("the proxy sent bytes before the upstream's TLS handshake")
            name = host if server_hostname is None else server_hostname  # as create_connection
            transport = cast(
                asyncio.Transport,
                await loop.start_tls(transport, shake, ssl, server_hostname=name),
            )
        return _hand_over(transport, shake, protocol_factory)
    except BaseException:
        transport.abort()
        raise


def _hand_over(
    transport: asyncio.Transport,
    shake: _Handshake,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    shake.check_open("the tunnel was closed as it opened")
    early, shake.buffer = bytes(shake.buffer), bytearray()
    protocol = protocol_factory()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if early:
        protocol.data_received(early)
    return transport, protocol


class _Handshake(asyncio.Protocol):
    """Buffers what the proxy sends until the handshake is done; reads wait on a future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def check_open(self, message: str) -> None:
        if self.closed:
            raise ProxyError(message)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def _more(self, stage: str) -> None:
        self.check_open(f"the proxy closed the connection {stage}")
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exactly(self, n: int, stage: str) -> bytes:
        while len(self.buffer) < n:
            await self._more(stage)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_head(self, stage: str) -> bytes:
        """Up to and including the first blank line; later bytes stay in the buffer."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise ProxyError("the proxy's CONNECT answer is too long")
            await self._more(stage)
        head = bytes(self.buffer[: end + 4])
        del self.buffer[: end + 4]
        return head


def _host_bytes(host: str) -> bytes:
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        pass
    try:
        return host.encode("idna")
    except UnicodeError:
        raise ProxyError("the upstream's host name is not a valid DNS name") from None


async def _http_connect(shake: _Handshake, proxy: ProxyURL, host: str, port: int) -> None:
    name = _host_bytes(host)
    target = b"[%b]:%d" % (name, port) if name.find(b":") >= 0 else b"%b:%d" % (name, port)
    request = b"CONNECT %b HTTP/1.1\r\nHost: %b\r\n" % (target, target)
    if (auth := proxy.basic_auth) is not None:
        request += b"Proxy-Authorization: " + auth + b"\r\n"
    shake.write(request + b"\r\n")
    head = await shake.read_head("before answering CONNECT")
    match = _STATUS_LINE.match(head)
    if match is None:
        raise ProxyError("the proxy's CONNECT answer is not HTTP/1.x")
    status = int(match.group(1))
    if 200 <= status < 300:
        return
    reason = _printable(match.group(2) or b"")
    if status == 407:
        what = "refused the credentials" if proxy.username is not None else "wants credentials"
        raise ProxyError(f"the proxy {what}: 407 {reason}".rstrip())
    raise ProxyError(f"the proxy refused CONNECT: {status} {reason}".rstrip())


def _printable(text: bytes) -> str:
    return _UNPRINTABLE.sub("?", text[:100].decode("latin-1"))


async def _socks5_connect(
    loop: asyncio.AbstractEventLoop, shake: _Handshake, proxy: ProxyURL, host: str, port: int
) -> None:
    # RFC 1928 (SOCKS5) with RFC 1929 (username/password) authentication.
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    shake.write(b"\x05" + bytes([len(methods)]) + methods)
    hint = "" if proxy.username is not None else " (does it want credentials?)"
    version, method = await shake.read_exactly(2, "during the SOCKS5 greeting" + hint)
    if version != 5:
        raise ProxyError("the proxy does not speak SOCKS5")
    if method == 2 and proxy.username is not None:
        await _socks5_login(shake, proxy.username, proxy.password or "")
    elif method != 0:
        what = "refused our credentials" if proxy.username else "wants credentials"
        raise ProxyError(f"the SOCKS5 proxy {what} (no acceptable method)")
    address = await _socks5_address(loop, proxy, host, port)
    shake.write(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
    version, reply, _, atyp = await shake.read_exactly(4, "before answering CONNECT")
    if version != 5:
        raise ProxyError("the proxy's SOCKS5 reply is malformed")
    if reply != 0:
        meaning = _SOCKS_REPLIES.get(reply, "unknown error")
        raise ProxyError(f"the SOCKS5 proxy refused CONNECT: {meaning} ({reply})")
    if atyp == 3:
        (length,) = await shake.read_exactly(1, "in its SOCKS5 reply")
        await shake.read_exactly(length + 2, "in its SOCKS5 reply")
    elif atyp in (1, 4):
        await shake.read_exactly((4 if atyp == 1 else 16) + 2, "in its SOCKS5 reply")
    else:
        raise ProxyError("the proxy's SOCKS5 reply is malformed")


async def _socks5_login(shake: _Handshake, username: str, password: str) -> None:
    user, secret = username.encode(), password.encode()
    shake.write(b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret)
    _, status = await shake.read_exactly(2, "after SOCKS5 login (credentials refused?)")
    if status != 0:
        raise ProxyError("the SOCKS5 proxy refused our credentials")


async def _socks5_address(
    loop: asyncio.AbstractEventLoop, proxy: ProxyURL, host: str, port: int
) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if proxy.scheme == "socks5h":
            name = _host_bytes(host)
            if len(name) > 255:
                raise ProxyError("the upstream's host name is too long for SOCKS5") from None
            return b"\x03" + bytes([len(name)]) + name
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise ProxyError(f"cannot resolve {host}") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
