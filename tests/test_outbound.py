"""Outbound proxies: real pproxy processes and loopback targets, every event loop on uvloop.

pproxy (a real HTTP/SOCKS5 proxy, with TLS and Basic/RFC 1929 auth) runs as a subprocess; the
targets are threaded HTTP(S) servers, so no server socket outlives a test's loop; the few
hand-written proxies (for answers pproxy never gives) are asyncio servers in the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
import trustme
import uvloop

from openai_forward.config import ConfigError
from openai_forward.outbound import ProxyError, ProxyURL, open_via_proxy, parse_proxy_url

USER = "alice"
PASSWORD = "s3cret-Pw-42"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 15)

    return uvloop.run(bounded())


# pproxy as a subprocess


class ProxyProcess:
    """A pproxy subprocess; its output is collected by a thread so lines can be awaited."""

    def __init__(self, *args: str) -> None:
        pytest.importorskip("pproxy", reason="pproxy is not installed (it is in the [test] extra)")
        # pproxy 2.7.9 installs uvloop and then asks it for a loop it never set; without uvloop
        # it falls back to asyncio's loop, which is fine for the proxy side of these tests.
        launch = "import sys; sys.modules['uvloop'] = None; from pproxy.server import main; main()"
        cmd = [sys.executable, "-u", "-c", launch, "-v", "--auth", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()
        try:
            serving = self.wait_for_line(r"Serving on \S+ 127\.0\.0\.1:(\d+)")
        except BaseException:
            self.stop()
            raise
        self.port = int(serving.group(1))

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exit>")
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or "<exit>" in self.lines:
                    raise AssertionError(f"pproxy never printed {pattern!r}: {self.lines}")
                self._cond.wait(left)

    def url(self, scheme: str, auth: str = "") -> ProxyURL:
        return parse_proxy_url(f"{scheme}://{auth}127.0.0.1:{self.port}", "test")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def open_proxy() -> Iterator[ProxyProcess]:
    proxy = ProxyProcess("-l", "http+socks5://127.0.0.1:0")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def auth_proxy() -> Iterator[ProxyProcess]:
    proxy = ProxyProcess("-l", f"http+socks5://127.0.0.1:0#{USER}:{PASSWORD}")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def tls_proxy(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    pem = tmp_path_factory.mktemp("proxy") / "proxy.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    proxy = ProxyProcess("-l", f"http+ssl://127.0.0.1:0#{USER}:{PASSWORD}", "--ssl", str(pem))
    yield proxy
    proxy.stop()


# targets and client


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"you said " + self.requestline.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(tls: ssl.SSLContext | None) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 in a thread, outside the tests' loops; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def plain_target() -> Iterator[int]:
    with serve(None) as port:
        yield port


@pytest.fixture(scope="module")
def tls_target(ca: trustme.CA) -> Iterator[int]:
    with serve(server_ctx(ca)) as port:
        yield port


@pytest.fixture(scope="module")
def foreign_target() -> Iterator[int]:
    """A TLS target whose certificate comes from a CA the tests do not trust."""
    with serve(server_ctx(trustme.CA())) as port:
        yield port


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.made = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"you said" in self.data and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)
        if not self.done.done():
            self.done.set_result(None)


async def request(
    proxy: ProxyURL,
    port: int,
    host: str = "localhost",
    tls: ssl.SSLContext | None = None,
    **kw: Any,
) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await open_via_proxy(
        loop, proxy, Client, host, port, tls, host if tls else None, **kw
    )
    assert isinstance(protocol, Client) and protocol.made == 1
    try:
        transport.write(b"GET /v1/models HTTP/1.1\r\nHost: %b\r\n\r\n" % host.encode())
        await protocol.done
        return bytes(protocol.data)
    finally:
        # abort, not close: a TLS close waits for the peer's close_notify, and the loop must
        # not end with the transport still open
        transport.abort()
        await protocol.lost


def through(
    proxy: ProxyURL,
    port: int,
    ca: trustme.CA | None = None,
    host: str = "localhost",
    **kw: Any,
) -> bytes:
    """One request to the target on `port` through `proxy`, TLS to it if a CA is given."""
    return run(request(proxy, port, host, client_ctx(ca) if ca else None, **kw))


OK = b"you said GET /v1/models HTTP/1.1"


# pproxy: the happy paths


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_tunnel_reaches_a_tls_target_and_verifies_it(open_proxy, tls_target, ca, scheme):
    assert OK in through(open_proxy.url(scheme), tls_target, ca)


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_tunnel_reaches_a_plain_target(open_proxy, plain_target, scheme):
    assert OK in through(open_proxy.url(scheme), plain_target)


@pytest.mark.parametrize(
    ("scheme", "seen"), [("socks5", r"127\.0\.0\.1"), ("socks5h", "localhost")]
)
def test_socks5_resolves_the_name_here_and_socks5h_leaves_it_to_the_proxy(
    plain_target, scheme, seen
):
    proxy = ProxyProcess("-l", "socks5://127.0.0.1:0")
    try:
        assert OK in through(proxy.url(scheme), plain_target, host="localhost")
        proxy.wait_for_line(rf"socks5 \S+ -> {seen}:{plain_target}\b")
    finally:
        proxy.stop()


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
def test_an_ip_literal_upstream_is_sent_as_an_address(open_proxy, plain_target, scheme):
    assert OK in through(open_proxy.url(scheme), plain_target, host="127.0.0.1")


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_credentials_that_the_proxy_accepts_open_the_tunnel(auth_proxy, tls_target, ca, scheme):
    assert OK in through(auth_proxy.url(scheme, f"{USER}:{PASSWORD}@"), tls_target, ca)


# refusals and failures


@pytest.mark.parametrize("scheme", ["http", "socks5"])
@pytest.mark.parametrize("auth", [f"{USER}:wrong-{PASSWORD}@", "", "bob:@"])
def test_refused_credentials_are_an_oserror_that_shows_no_password(
    auth_proxy, plain_target, scheme, auth
):
    with pytest.raises(OSError) as info:
        through(auth_proxy.url(scheme, auth), plain_target)
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)
    assert ("407" if scheme == "http" else "credentials") in str(info.value)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_proxy_that_is_not_listening_fails_fast(plain_target):
    proxy = parse_proxy_url(f"http://{USER}:{PASSWORD}@127.0.0.1:{unused_port()}", "test")
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError) as info:
        through(proxy, plain_target)
    assert time.monotonic() - started < 2
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("tls", [False, True])
def test_connect_to_a_port_nothing_listens_on_is_an_oserror(open_proxy, ca, tls):
    with pytest.raises(ProxyError, match="closed the connection"):
        through(open_proxy.url("http"), unused_port(), ca if tls else None)


@pytest.mark.parametrize("scheme", ["http", "socks5h", "https"])
def test_a_target_certificate_from_another_ca_is_rejected_through_the_tunnel(
    open_proxy, tls_proxy, foreign_target, ca, scheme
):
    proxy = (tls_proxy if scheme == "https" else open_proxy).url(scheme, f"{USER}:{PASSWORD}@")
    with pytest.raises(ssl.SSLCertVerificationError):
        through(proxy, foreign_target, ca, proxy_ssl=client_ctx(ca))


# an https:// proxy: TLS to the proxy, and the upstream's TLS inside it


def test_https_proxy_carries_tls_inside_tls(tls_proxy, tls_target, ca):
    proxy = tls_proxy.url("https", f"{USER}:{PASSWORD}@")
    assert OK in through(proxy, tls_target, ca, proxy_ssl=client_ctx(ca))


def test_https_proxy_reaches_a_plain_target(tls_proxy, plain_target, ca):
    proxy = tls_proxy.url("https", f"{USER}:{PASSWORD}@")
    assert OK in through(proxy, plain_target, proxy_ssl=client_ctx(ca))


def test_https_proxy_refuses_a_wrong_password_over_tls(tls_proxy, tls_target, ca):
    proxy = tls_proxy.url("https", f"{USER}:nope@")
    with pytest.raises(ProxyError, match="407") as info:
        through(proxy, tls_target, ca, proxy_ssl=client_ctx(ca))
    assert "nope" not in str(info.value)


def test_https_proxy_certificate_is_verified_against_the_system_store(tls_proxy, plain_target):
    proxy = tls_proxy.url("https", f"{USER}:{PASSWORD}@")
    with pytest.raises(ssl.SSLCertVerificationError):
        through(proxy, plain_target)


# hand-written proxies for answers pproxy never gives


@asynccontextmanager
async def fake_proxy(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[ProxyURL]:
    handlers: list[asyncio.Future[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            await script(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client hung up, as it does once it has seen enough
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield ProxyURL("http", "127.0.0.1", port)
    finally:
        server.close()
        # every script ran to its end: its asserts count, and no socket outlives the loop
        await asyncio.gather(*handlers)


def test_bytes_the_proxy_sends_with_its_answer_reach_the_protocol_in_order():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"Content-Length: 8\r\n\r\nyou said")
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            return await request(proxy, 443, "api.example")

    assert run(main()) == b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nyou said"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused CONNECT: 403 Forbidden"),
        (b"HTTP/1.0 502 Bad Gateway\r\n\r\n", "502"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\n", "closed the connection"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000, "too long"),
    ],
)
def test_a_connect_answer_other_than_2xx_is_a_proxy_error(answer: bytes, message: str):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            return await request(proxy, 443, "api.example")

    with pytest.raises(ProxyError, match=message):
        run(main())


@pytest.mark.parametrize(("reply", "message"), [(5, "connection refused"), (2, "not allowed")])
def test_a_socks5_error_reply_is_a_proxy_error(reply: int, message: str):
    requests: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(3) == b"\x05\x01\x00"
        writer.write(b"\x05\x00")
        requests.append(await reader.readexactly(4 + 1 + len("api.example") + 2))
        writer.write(bytes([5, reply, 0, 1, 0, 0, 0, 0, 0, 0]))
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            socks = ProxyURL("socks5h", proxy.host, proxy.port)
            return await request(socks, 443, "api.example")

    with pytest.raises(ProxyError, match=message):
        run(main())
    assert requests == [b"\x05\x01\x00\x03\x0bapi.example\x01\xbb"]


def test_a_socks5_proxy_that_accepts_no_offered_method_is_a_proxy_error():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(4) == b"\x05\x02\x00\x02"
        writer.write(b"\x05\xff")
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            socks = ProxyURL("socks5", proxy.host, proxy.port, USER, PASSWORD)
            return await request(socks, 443, "127.0.0.1")

    with pytest.raises(ProxyError, match="refused our credentials") as info:
        run(main())
    assert PASSWORD not in str(info.value)


def test_the_connect_request_names_the_target_and_carries_basic_credentials():
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            http = ProxyURL("http", proxy.host, proxy.port, "us er", "pä:ss")
            return await request(http, 8443, "::1")

    with pytest.raises(ProxyError, match="refused the credentials: 407"):
        run(main())
    assert heads == [
        b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
        b"Proxy-Authorization: Basic " + base64.b64encode("us er:pä:ss".encode()) + b"\r\n\r\n"
    ]


def test_bytes_before_the_upstreams_tls_handshake_are_a_proxy_error(ca):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nnot a TLS record")
        await reader.read()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            return await request(proxy, 443, "localhost", client_ctx(ca))

    with pytest.raises(ProxyError, match="before the upstream's TLS handshake"):
        run(main())


@pytest.mark.parametrize("stage", ["connect", "tls"])
def test_a_cancelled_attempt_closes_its_connection_to_the_proxy(ca, stage: str):
    async def main() -> None:
        seen = asyncio.Event()
        closed = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            if stage == "tls":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
                await reader.readexactly(1)  # the first byte of the ClientHello
            seen.set()
            while await reader.read(65536):
                pass  # until the client hangs up
            closed.set()

        async with fake_proxy(script) as proxy:
            tls = client_ctx(ca) if stage == "tls" else None
            attempt = asyncio.ensure_future(request(proxy, 443, "localhost", tls))
            await seen.wait()
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            await asyncio.wait_for(closed.wait(), 5)

    run(main())


# parsing


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.local:3128", ProxyURL("http", "proxy.local", 3128)),
        ("HTTP://proxy.local", ProxyURL("http", "proxy.local", 80)),
        ("https://proxy.local/", ProxyURL("https", "proxy.local", 443)),
        ("socks5://[::1]", ProxyURL("socks5", "::1", 1080)),
        ("socks5h://u%40x:p%3Aw%2F@h:9", ProxyURL("socks5h", "h", 9, "u@x", "p:w/")),
        ("http://user@h:1", ProxyURL("http", "h", 1, "user", None)),
    ],
)
def test_proxy_urls_parse(url: str, expected: ProxyURL):
    assert parse_proxy_url(url, "proxy") == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "'ftp://x' is not an http://, https://, socks5:// or socks5h:// URL"),
        ("proxy.local:3128", "is not an http://"),
        ("http://", "is not an http://"),
        ("http://h:99999", "not a valid URL"),
        ("http://h:port", "not a valid URL"),
        ("http://h:1/path", "no path, query or fragment"),
        ("http://h:1?x=1", "no path, query or fragment"),
        ("http://h:1 ", "spaces or control characters"),
        ("http://:1", "has no host"),
        ("http://a%3Ab:pw@h:1", "cannot contain ':'"),
        ("socks5://" + "u" * 256 + ":pw@h", "255 bytes"),
    ],
)
def test_bad_proxy_urls_are_config_errors_naming_the_key(url: str, message: str):
    with pytest.raises(ConfigError) as info:
        parse_proxy_url(url, "upstreams[0].proxy")
    assert str(info.value).startswith("upstreams[0].proxy: ")
    assert message in str(info.value)


def test_the_password_is_masked_in_repr_and_in_errors():
    proxy = parse_proxy_url(f"socks5://{USER}:{PASSWORD}@h:1080", "proxy")
    assert proxy.password == PASSWORD
    assert PASSWORD not in repr(proxy) and "password='***'" in repr(proxy)
    assert PASSWORD not in str(proxy)
    with pytest.raises(ConfigError) as info:
        parse_proxy_url(f"ftp://{USER}:{PASSWORD}@h:1", "proxy")
    assert PASSWORD not in str(info.value) and f"{USER}:***@h:1" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_proxy_url(f"http://{USER}:{PASSWORD}@h:1/x", "proxy")
    assert PASSWORD not in str(info.value)


def test_an_international_host_name_goes_to_the_proxy_in_idna_form():
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        await writer.drain()

    async def main() -> bytes:
        async with fake_proxy(script) as proxy:
            return await request(proxy, 443, "bücher.example")

    with pytest.raises(ProxyError, match="502"):
        run(main())
    assert heads[0].startswith(b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\n")
