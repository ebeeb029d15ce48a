"""Pass-through fidelity: what the client sends reaches the upstream, and what the upstream
answers reaches the client, unchanged except for the documented hop-by-hop rules.

Exact byte checks use raw sockets (parsed with h11, which keeps header case and reason
phrases); HTTP behaviour checks use httpx.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
import pytest
from conftest import DEFAULT_API_KEY, GatewayProcess, assert_no_secret
from fakeupstream import FakeUpstream, Reply, sse

TIMEOUT = 10.0
USER_KEY = "sk-user-QWERTYzxcvbn5544"
AUTH = ("Authorization", f"Bearer {USER_KEY}")
MiB = 1 << 20


# --------------------------------------------------------------------------- raw client


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as sent by the gateway (case kept)
    body: bytes
    raw: bytes  # every byte received

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == lname]


def raw_exchange(gw: GatewayProcess, request: bytes, method: str = "GET") -> RawResponse:
    """Send `request` verbatim on a new connection and read one response strictly with h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))  # sync h11's state
    conn.send(h11.EndOfMessage())
    received = bytearray()
    body = bytearray()
    response: h11.Response | None = None
    with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(MiB)
                received += data
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    assert response is not None, bytes(received)
    assert_no_secret(bytes(received))
    return RawResponse(
        status=response.status_code,
        reason=response.reason,
        headers=list(response.headers.raw_items()),
        body=bytes(body),
        raw=bytes(received),
    )


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def host(gw: GatewayProcess) -> tuple[str, str]:
    return ("Host", f"127.0.0.1:{gw.port}")


def is_subsequence(needles: list[tuple[bytes, bytes]], haystack: list[tuple[bytes, bytes]]) -> bool:
    it = iter(haystack)
    return all(any(item == h for h in it) for item in needles)


def send(gw: GatewayProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """An httpx request (with the client key unless `headers` is given), scanned for the secret."""
    kwargs.setdefault("headers", dict([AUTH]))
    response = httpx.request(method, gw.url + path, timeout=TIMEOUT, **kwargs)
    assert_no_secret(response)
    return response


def get(gw: GatewayProcess, path: str, **kwargs: Any) -> httpx.Response:
    return send(gw, "GET", path, **kwargs)


# --------------------------------------------------------------------------- responses


def test_status_reason_headers_and_body_pass_through_byte_for_byte(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    body = bytes(range(256)) * 40 + b"\r\n\r\nHTTP/1.1 200 OK\r\n"
    odd_headers = [
        ("X-Mixed-CASE-Name", "Value  with   spaces"),
        ("set-cookie", "a=1; Path=/; HttpOnly"),
        ("Set-Cookie", "b=2; Path=/v1; Secure"),
        ("x-empty", ""),
        ("X-Dup", "first"),
        ("x-dup", "second"),
        ("Content-Type", "application/x-odd; charset=latin-1"),
        ("ETag", 'W/"abc"'),
        ("x-unicode-ish", "caf\xe9"),
        ("Cache-Control", "no-store, private"),
    ]
    upstream.script(
        "POST",
        "/v1/odd",
        Reply(status=299, reason="Very Odd Indeed", headers=odd_headers, body=body),
    )
    resp = raw_exchange(
        gateway, request_bytes("POST", "/v1/odd", [host(gateway), AUTH], b"{}"), "POST"
    )
    assert (resp.status, resp.reason) == (299, b"Very Odd Indeed")
    sent = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in odd_headers]
    assert is_subsequence(sent, resp.headers), resp.headers
    assert resp.body == body
    assert resp.raw.startswith(b"HTTP/1.1 299 Very Odd Indeed\r\n")


def test_chunked_upstream_body_reaches_the_client_unchanged(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    chunks = [b"first,", b"", b"second,", bytes(range(256)), b"\x00last"]
    upstream.script("GET", "/v1/chunky", Reply(headers=[("Content-Type", "x/y")], chunks=chunks))
    resp = raw_exchange(gateway, request_bytes("GET", "/v1/chunky", [host(gateway), AUTH]))
    assert resp.status == 200
    assert resp.body == b"".join(chunks)
    assert resp.header("transfer-encoding") == "chunked"


def test_close_delimited_upstream_body_is_delivered_whole(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Up: 1\r\n\r\nno framing, ends at close"
    upstream.script("GET", "/v1/unframed", Reply(raw=raw))
    resp = raw_exchange(gateway, request_bytes("GET", "/v1/unframed", [host(gateway), AUTH]))
    assert resp.status == 200
    assert resp.headers_named("x-up") == ["1"]
    assert resp.body == b"no framing, ends at close"
    assert resp.header("transfer-encoding") == "chunked"  # so the client can tell it is complete


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_status_passes_through_and_keeps_the_connection_usable(
    status: int, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script("GET", "/v1/empty", Reply(status=status, headers=[("ETag", '"v1"')]))
    with httpx.Client(timeout=TIMEOUT, headers=dict([AUTH])) as client:
        first = client.get(gateway.url + "/v1/empty")
        second = client.get(gateway.url + "/v1/models")
    assert (first.status_code, first.content, first.headers["etag"]) == (status, b"", '"v1"')
    assert second.status_code == 200
    assert second.json()["object"] == "list"
    assert [r.target for r in upstream.wait_for_requests(2)] == ["/v1/empty", "/v1/models"]


def test_gzip_upstream_body_stays_compressed(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    plain = json.dumps({"data": ["x" * 100] * 50}).encode()
    compressed = gzip.compress(plain, mtime=0)
    upstream.script(
        "GET",
        "/v1/models",
        Reply(
            headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            body=compressed,
        ),
    )
    request = request_bytes(
        "GET", "/v1/models", [host(gateway), AUTH, ("Accept-Encoding", "gzip, br")]
    )
    resp = raw_exchange(gateway, request)
    assert resp.header("content-encoding") == "gzip"
    assert resp.body == compressed
    assert gzip.decompress(resp.body) == plain
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("accept-encoding") == ["gzip, br"]


def test_hop_by_hop_response_headers_are_not_forwarded(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script(
        "GET",
        "/v1/hop",
        Reply(
            headers=[
                ("Connection", "x-foo, keep-alive"),
                ("x-foo", "1"),
                ("Keep-Alive", "timeout=5, max=100"),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("Proxy-Authenticate", "Basic realm=up"),
                ("x-bar", "kept"),
            ],
            body=b"hop",
        ),
    )
    resp = raw_exchange(gateway, request_bytes("GET", "/v1/hop", [host(gateway), AUTH]))
    assert resp.body == b"hop"
    assert resp.headers_named("x-bar") == ["kept"]
    for name in ("x-foo", "keep-alive", "proxy-connection", "upgrade", "proxy-authenticate"):
        assert resp.headers_named(name) == [], name
    assert all("x-foo" not in v.lower() for v in resp.headers_named("connection"))


def test_event_stream_gets_x_accel_buffering_no(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script(
        "GET",
        "/v1/events",
        Reply(headers=[("Content-Type", "text/event-stream")], chunks=sse([{"n": 1}])),
    )
    response = get(gateway, "/v1/events")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.content == b"".join(sse([{"n": 1}]))


@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirect_is_returned_to_the_client_not_followed(
    status: int, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    location = "http://127.0.0.1:9/v1/elsewhere?x=1"
    upstream.script(
        "POST", "/v1/moved", Reply(status=status, headers=[("Location", location)], body=b"moved")
    )
    response = send(gateway, "POST", "/v1/moved", content=b"{}")
    assert response.status_code == status
    assert response.headers["location"] == location
    assert response.content == b"moved"
    assert [r.target for r in upstream.requests] == ["/v1/moved"]


# --------------------------------------------------------------------------- requests


def test_request_headers_are_filtered_and_the_rest_forwarded_unchanged(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    kept = [
        ("User-Agent", "MyAgent/1.0 (odd; Case)"),
        ("OpenAI-Organization", "org-XyZ"),
        ("OpenAI-Project", "proj_123"),
        ("x-custom-THING", "Value  With  Spaces"),
        ("X-Dup", "1"),
        ("X-Dup", "2"),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        AUTH,
    ]
    dropped = [
        ("Connection", "keep-alive, X-Hop-Named"),
        ("X-Hop-Named", "gone"),
        ("Keep-Alive", "timeout=300"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=6.6.6.6;host=evil.example"),
        ("X_Api_Key", "underscore"),
        ("x_custom", "underscore"),
    ]
    headers = [("Host", "client-chosen.example"), *kept, *dropped]
    resp = raw_exchange(
        gateway, request_bytes("POST", "/v1/chat/completions", headers, b'{"model":"m"}'), "POST"
    )
    assert resp.status in (200, 400)  # the fake answers; what matters is what it saw
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("host") == [f"127.0.0.1:{upstream.port}"]
    for pair in kept:
        assert pair in rec.headers, (pair, rec.headers)
    forwarded_names = {k.lower() for k, _ in rec.headers}
    for name, _ in dropped:
        if name.lower() != "connection":
            assert name.lower() not in forwarded_names, (name, rec.headers)
    assert all("hop-named" not in v.lower() for v in rec.headers_named("connection"))
    assert rec.body == b'{"model":"m"}'


@pytest.mark.parametrize(
    ("client_target", "upstream_target"),
    [
        ("/v1/models?a=1&a=2&b=%2F%20x&c=&d=%E2%9C%93&e=a+b", None),
        ("/v1/files?purpose=batch&limit=2&order=desc&after=file-1&x=%3D%26", None),
        ("/models?q=%41%42&q=%61", "/v1/models?q=%41%42&q=%61"),
    ],
)
def test_query_string_is_forwarded_exactly(
    client_target: str,
    upstream_target: str | None,
    gateway: GatewayProcess,
    upstream: FakeUpstream,
) -> None:
    resp = raw_exchange(gateway, request_bytes("GET", client_target, [host(gateway), AUTH]))
    assert resp.status == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == (upstream_target or client_target)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_every_method_reaches_the_upstream(
    method: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script(
        method,
        "/v1/things/t1",
        Reply(
            headers=[("Content-Type", "text/plain"), ("X-Method", method)],
            body=b"ok " + method.encode(),
        ),
    )
    body = b"" if method in ("GET", "HEAD", "OPTIONS") else b'{"m": "' + method.encode() + b'"}'
    response = send(gateway, method, "/v1/things/t1?v=1", content=body or None)
    assert response.status_code == 200
    assert response.headers["x-method"] == method
    assert response.content == (b"" if method == "HEAD" else b"ok " + method.encode())
    if method == "HEAD":
        assert response.headers["content-length"] == str(len(b"ok HEAD"))
    [rec] = upstream.wait_for_requests(1)
    assert (rec.method, rec.target, rec.body) == (method, "/v1/things/t1?v=1", body)


def test_dashboard_billing_usage_is_forwarded_as_is(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    response = get(gateway, "/dashboard/billing/usage?start_date=2024-01-01&end_date=2024-02-01")
    assert response.status_code == 200
    assert response.json()["total_usage"] == 1234.5
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == "/dashboard/billing/usage?start_date=2024-01-01&end_date=2024-02-01"


def test_healthz_is_answered_by_the_gateway(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    response = get(gateway, "/healthz", headers={})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert upstream.requests == []


def test_custom_health_path_moves_the_health_check_and_forwards_healthz(
    gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream
) -> None:
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_HEALTH_PATH": "/_gw/health"})
    response = get(gw, "/_gw/health", headers={})
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert upstream.requests == []
    upstream.script("GET", "/healthz", Reply(body=b"upstream health", headers=[("X-From", "up")]))
    response = get(gw, "/healthz")
    assert (response.status_code, response.content) == (200, b"upstream health")
    assert response.headers["x-from"] == "up"
    assert [r.target for r in upstream.requests] == ["/healthz"]


def test_base_url_path_prefix_is_kept(
    gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream
) -> None:
    gw = gateway_factory(upstream.url + "/openai")
    upstream.script("POST", "/openai/v1/chat/completions", Reply(body=b'{"ok": true}'))
    for client_path in ("/v1/chat/completions", "/chat/completions"):
        response = send(gw, "POST", client_path + "?api-version=1", json={})
        assert response.status_code == 200
        assert response.content == b'{"ok": true}'
    reqs = upstream.wait_for_requests(2)
    assert [r.target for r in reqs] == ["/openai/v1/chat/completions?api-version=1"] * 2


@pytest.mark.parametrize("client_xff", [None, "6.6.6.6, 7.7.7.7"])
def test_forwarded_for_setting_sets_the_client_address(
    client_xff: str | None,
    gateway_factory: Callable[..., GatewayProcess],
    upstream: FakeUpstream,
) -> None:
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_FORWARDED_FOR": "true"})
    headers = {AUTH[0]: AUTH[1]}
    if client_xff:
        headers["X-Forwarded-For"] = client_xff
    assert get(gw, "/v1/models", headers=headers).status_code == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("x-forwarded-for") == ["127.0.0.1"]


# --------------------------------------------------------------------------- streaming


def test_first_sse_chunk_reaches_the_client_before_upstream_sends_the_second(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    gate = threading.Event()
    first, second = b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\ndata: [DONE]\n\n'
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(headers=[("Content-Type", "text/event-stream")], chunks=[first, second], gate=gate),
    )
    try:
        with httpx.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json={"stream": True},
            headers=dict([AUTH]),
            timeout=TIMEOUT,
        ) as response:
            pieces = response.iter_raw()
            got = b""
            while len(got) < len(first):
                got += next(pieces)  # blocks (and times out) if the gateway buffers
            assert got == first
            gate.set()
            rest = b"".join(pieces)
            assert_no_secret(list(response.headers.raw), got + rest)
    finally:
        gate.set()
    assert rest == second


def vm_hwm(pid: int) -> int:
    """Peak resident set size of `pid` in bytes since the last reset_hwm()."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_hwm(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm_hwm(pid)


def payload(n_mib: int, seed: int) -> Iterator[bytes]:
    """`n_mib` MiB of pseudo-random bytes in 1 MiB pieces (each piece numbered)."""
    base = random.Random(seed).randbytes(MiB)
    for i in range(n_mib):
        yield i.to_bytes(8, "big") + base[8:]


def payload_digest(n_mib: int, seed: int) -> str:
    h = hashlib.sha256()
    for piece in payload(n_mib, seed):
        h.update(piece)
    return h.hexdigest()


BIG_MIB = 100
RSS_BUDGET = 50 * MiB


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_100mb_upload_is_streamed_intact_without_buffering(
    framing: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script("POST", "/v1/files", Reply(body=b'{"id": "file-big"}'))
    headers = {AUTH[0]: AUTH[1], "Content-Type": "application/octet-stream"}
    if framing == "content-length":
        headers["Content-Length"] = str(BIG_MIB * MiB)
    before = reset_hwm(gateway.proc.pid)
    response = httpx.post(
        gateway.url + "/v1/files", content=payload(BIG_MIB, 1), headers=headers, timeout=30
    )
    peak = vm_hwm(gateway.proc.pid)
    assert response.status_code == 200
    assert response.content == b'{"id": "file-big"}'
    [rec] = upstream.wait_for_requests(1)
    assert rec.chunked is (framing == "chunked")
    assert len(rec.body) == BIG_MIB * MiB
    assert rec.sha256 == payload_digest(BIG_MIB, 1)
    assert peak - before < RSS_BUDGET, f"gateway RSS grew {(peak - before) / MiB:.1f} MiB"


def test_100mb_download_is_streamed_intact_without_buffering(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.script(
        "GET",
        "/v1/files/file-big/content",
        Reply(headers=[("Content-Type", "application/octet-stream")], chunks=payload(BIG_MIB, 2)),
    )
    before = reset_hwm(gateway.proc.pid)
    digest, size = hashlib.sha256(), 0
    with httpx.stream(
        "GET", gateway.url + "/v1/files/file-big/content", headers=dict([AUTH]), timeout=30
    ) as response:
        assert response.status_code == 200
        for piece in response.iter_raw():
            digest.update(piece)
            size += len(piece)
    peak = vm_hwm(gateway.proc.pid)
    assert size == BIG_MIB * MiB
    assert digest.hexdigest() == payload_digest(BIG_MIB, 2)
    assert peak - before < RSS_BUDGET, f"gateway RSS grew {(peak - before) / MiB:.1f} MiB"


# --------------------------------------------------------------------------- processes


def wait_for_children(pid: int, n: int, timeout: float = 5.0) -> list[psutil.Process]:
    """The child processes of `pid`, once there are `n` of them (workers fork at start)."""
    deadline = time.monotonic() + timeout
    while True:
        children = psutil.Process(pid).children(recursive=True)
        if len(children) >= n or time.monotonic() > deadline:
            assert len(children) == n, children
            return children
        time.sleep(0.02)  # polling: fork gives no event we can wait on


def test_two_workers_serve_and_stop_cleanly_on_sigterm(
    gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream
) -> None:
    gw = gateway_factory(upstream.url, workers=2)
    children = wait_for_children(gw.proc.pid, 2)

    def one(i: int) -> int:
        # a new connection each time, so the kernel spreads them over both workers
        with httpx.Client(timeout=TIMEOUT) as client:
            return client.get(gw.url + f"/v1/models?i={i}", headers=dict([AUTH])).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(50)))
    assert statuses == [200] * 50
    assert len(upstream.wait_for_requests(50)) == 50

    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(10) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], alive
    assert "Traceback" not in gw.output()
    assert DEFAULT_API_KEY not in gw.output()
