"""Hostile client input on raw sockets against a real gateway process (TESTING.md 3a).

Every case checks what a client would notice: the status, the OpenAI error envelope, whether
the connection is closed, and what (if anything) the fake upstream received.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import unquote

import pytest
from conftest import DEFAULT_API_KEY, assert_no_secret, start_gateway
from fakeupstream import FakeUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhttp import RawClosed, RawConn, RawResponse, RawTimeout, exchange, mutate, request

CHAT = "/v1/chat/completions"
CHAT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
).encode()


# --------------------------------------------------------------------------- fixtures / helpers


def _stop_and_check(gw) -> None:
    gw.stop()
    out = gw.output()
    gw.cleanup()
    assert "Traceback" not in out, f"gateway output has a traceback:\n{out}"


@pytest.fixture(scope="module")
def tight_gateway(upstream: FakeUpstream) -> Iterator:
    """Short client deadlines and a small body limit (the other limits at their defaults)."""
    gw = start_gateway(
        upstream.url,
        env={
            "OPENAI_FORWARD_HEADER_TIMEOUT": "1",
            "OPENAI_FORWARD_BODY_TIMEOUT": "1",
            "OPENAI_FORWARD_MAX_BODY_SIZE": "65536",
        },
    )
    yield gw
    _stop_and_check(gw)


@pytest.fixture(scope="module")
def prefixed_gateway(upstream: FakeUpstream) -> Iterator:
    """A gateway whose upstream base URL carries the path prefix /openai."""
    gw = start_gateway(upstream.url + "/openai")
    yield gw
    _stop_and_check(gw)


def assert_gateway_error(
    resp: RawResponse,
    status: int,
    code: str | set[str],
    type_: str = "invalid_request_error",
    upstream: FakeUpstream | None = None,
) -> dict:
    """The response is a gateway-made error in OpenAI's envelope."""
    assert resp.status == status, (resp.status, resp.body)
    assert (resp.header("content-type") or "").startswith("application/json"), resp.headers
    assert resp.header("x-request-id"), resp.headers
    body = resp.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["param"] is None, err
    assert err["type"] == type_, err
    codes = {code} if isinstance(code, str) else code
    assert err["code"] in codes, err
    if 400 <= status < 500 and status not in (408, 409, 429):
        assert resp.header("x-should-retry") == "false", resp.headers
    raw = repr(resp.headers) + resp.body.decode("latin-1")
    assert_no_secret(raw)
    if upstream is not None:
        assert f"127.0.0.1:{upstream.port}" not in raw and str(upstream.port) not in raw, raw
    return err


def sentinel_only(gw, upstream: FakeUpstream) -> None:
    """Assert the upstream received nothing so far except one sentinel request sent now.

    The sentinel orders things: anything the gateway forwarded earlier arrives before it.
    """
    exchange(gw.port, request("GET", "/v1/models?sentinel=1"))
    recs = upstream.wait_for_requests(1)
    seen = [(r.method, r.target) for r in recs]
    assert len(recs) == 1 and recs[0].target.endswith("/v1/models?sentinel=1"), seen


def send_and_read(
    gw, data: bytes, method: str = "GET", close_wait: float = 0.0
) -> tuple[RawResponse, bool, bytes]:
    """Send bytes on a fresh connection; return (first response, closed?, bytes after it).

    ``close_wait`` is how long to wait for the server to close (0: only check what is there).
    """
    with RawConn(gw.port) as c:
        c.send(data)
        resp = c.read_response(method)
        closed = c.is_closed(max(close_wait, 2.0 if resp.closes else 0.0))
        if resp.closes:
            assert closed, "the response says Connection: close but the socket stays open"
        return resp, closed, c.extra


def expect_rejected(
    gw,
    upstream: FakeUpstream,
    data: bytes,
    status: int | set[int],
    code: str | set[str],
) -> RawResponse:
    """A framing error: an error response, the connection closed, nothing after it upstream."""
    resp, closed, extra = send_and_read(gw, data, close_wait=2.0)
    statuses = {status} if isinstance(status, int) else status
    assert resp.status in statuses, (resp.status, resp.body)
    assert_gateway_error(resp, resp.status, code, upstream=upstream)
    assert closed, "connection must be closed after a framing error"
    assert extra == b"", f"bytes after the error response: {extra!r}"
    sentinel_only(gw, upstream)
    return resp


def chat_head(extra_headers: list[str], version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {CHAT} {version}", "Host: gw.test", "Content-Type: application/json"]
    return ("\r\n".join(lines + extra_headers) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int = 16) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x\r\n%b\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


# --------------------------------------------------------------------------- baseline


def test_plain_request_is_forwarded_and_connection_kept_alive(gateway, upstream):
    with RawConn(gateway.port) as c:
        c.send(request("POST", CHAT, [("Content-Type", "application/json")], CHAT_BODY))
        resp = c.read_response()
        assert resp.status == 200
        assert resp.json()["object"] == "chat.completion"
        assert not c.is_closed(0.2)
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == CHAT and rec.body == CHAT_BODY


# --------------------------------------------------------------------------- smuggling / framing


def test_content_length_plus_chunked_with_smuggled_request_is_rejected_and_closed(
    gateway, upstream
):
    data = chat_head(["Content-Length: 4", "Transfer-Encoding: chunked"]) + (
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    )
    with RawConn(gateway.port) as c:
        c.send(data)
        resp = c.read_response()
        assert_gateway_error(resp, 400, "invalid_request", upstream=upstream)
        assert c.is_closed(2.0), "connection must be closed after CL+TE"
        assert b"HTTP/1." not in c.extra, f"a second response was sent: {c.extra!r}"
    sentinel_only(gateway, upstream)
    assert not any(r.path == "/admin" for r in upstream.requests)


def test_two_different_content_lengths_are_rejected(gateway, upstream):
    data = chat_head([f"Content-Length: {len(CHAT_BODY)}", "Content-Length: 5"]) + CHAT_BODY
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


@pytest.mark.parametrize(
    "value", ["+4", "-1", "0x4", "4 4", "4, 5", "abc", "99999999999999999999999"]
)
def test_malformed_content_length_is_rejected(gateway, upstream, value):
    data = chat_head([f"Content-Length: {value}"]) + b"abcd"
    expect_rejected(gateway, upstream, data, {400, 413}, {"invalid_request", "request_too_large"})


def test_content_length_on_get_with_smuggled_request_in_body_is_one_request(gateway, upstream):
    smuggled = b"GET /admin HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    data = (
        b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        + smuggled
    )
    with RawConn(gateway.port) as c:
        c.send(data)
        resp = c.read_response()
        assert not c.is_closed(0.3) or resp.closes
        assert b"HTTP/1." not in c.extra
    if resp.status == 400:
        sentinel_only(gateway, upstream)
        return
    assert resp.status == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.path == "/v1/models" and rec.body == smuggled


def test_identical_duplicate_content_length_is_rejected_or_forwarded_once(gateway, upstream):
    n = len(CHAT_BODY)
    data = chat_head([f"Content-Length: {n}", f"Content-Length: {n}"]) + CHAT_BODY
    resp, closed, _ = send_and_read(gateway, data, close_wait=2.0)
    if resp.status == 400:
        assert_gateway_error(resp, 400, "invalid_request", upstream=upstream)
        assert closed
        sentinel_only(gateway, upstream)
    else:
        assert resp.status == 200, resp.body
        [rec] = upstream.wait_for_requests(1)
        assert rec.body == CHAT_BODY
        assert rec.headers_named("content-length") == [str(n)]


@pytest.mark.parametrize(
    ("te", "status", "code"),
    [
        ("identity", {501, 400}, {"not_implemented", "invalid_request"}),
        ("chunked, identity", {501, 400}, {"not_implemented", "invalid_request"}),
        ("gzip, chunked", {501, 400}, {"not_implemented", "invalid_request"}),
        ("chunked\x0b", {501, 400}, {"not_implemented", "invalid_request"}),
        ("chunked, chunked", {501, 400}, {"not_implemented", "invalid_request"}),
    ],
)
def test_transfer_codings_other_than_chunked_are_refused(gateway, upstream, te, status, code):
    data = chat_head([f"Transfer-Encoding: {te}"]) + chunked(CHAT_BODY)
    expect_rejected(gateway, upstream, data, status, code)


def test_transfer_encoding_twice_is_rejected(gateway, upstream):
    data = chat_head(["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"])
    expect_rejected(gateway, upstream, data + chunked(CHAT_BODY), 400, "invalid_request")


def test_transfer_encoding_on_http10_is_rejected(gateway, upstream):
    data = chat_head(["Transfer-Encoding: chunked"], version="HTTP/1.0") + chunked(CHAT_BODY)
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


def test_chunked_body_with_mixed_case_coding_is_forwarded_intact(gateway, upstream):
    data = chat_head(["Transfer-Encoding: Chunked"]) + chunked(CHAT_BODY)
    resp, _, _ = send_and_read(gateway, data)
    assert resp.status == 200, resp.body
    [rec] = upstream.wait_for_requests(1)
    assert rec.body == CHAT_BODY


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nabcd\r\n0\r\n\r\n", id="bad-size"),
        pytest.param(b"4\r\nabcdXX0\r\n\r\n", id="garbage-after-chunk-data"),
        pytest.param(b"4\r\nabcd\nX0\r\n\r\n", id="bad-chunk-terminator"),
        pytest.param(b"100000000000000000004\r\nabcd\r\n0\r\n\r\n", id="20-hex-digit-size"),
        pytest.param(b"-1\r\nabcd\r\n0\r\n\r\n", id="negative-size"),
        pytest.param(b"+4\r\nabcd\r\n0\r\n\r\n", id="plus-size"),
        pytest.param(b"0x4\r\nabcd\r\n0\r\n\r\n", id="0x-size"),
    ],
)
def test_bad_chunked_bodies_are_rejected_and_never_reach_upstream_complete(gateway, upstream, body):
    data = chat_head(["Transfer-Encoding: chunked"]) + body
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


# --------------------------------------------------------------------------- header syntax


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost : gw.test\r\n\r\n", id="space-before-colon-host"
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nX-Foo : 1\r\n\r\n",
            id="space-before-colon",
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nX-Foo: a\r\n b\r\n\r\n", id="obs-fold"
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nX-Foo: a\x00b\r\n\r\n",
            id="nul-in-value",
        ),
        pytest.param(b"GET /v1/models HTTP/1.1\nHost: gw.test\n\n", id="bare-lf"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\nX-Foo: 1\r\n\r\n", id="mixed-bare-lf"
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nX-Foo: a\rb\r\n\r\n", id="bare-cr"
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nX-F\xf6o: 1\r\n\r\n", id="8bit-name"
        ),
    ],
)
def test_malformed_header_syntax_is_rejected(gateway, upstream, data):
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


def test_underscore_header_names_are_not_forwarded(gateway, upstream):
    data = request("GET", "/v1/models", [("x_api_key", "u"), ("x-api-key", "d")])
    resp = exchange(gateway.port, data)
    assert resp.status == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("x_api_key") == []
    assert rec.headers_named("x-api-key") == ["d"]


# --------------------------------------------------------------------------- size limits


def test_70kb_header_trickled_in_1kb_pieces_gets_431_and_close(gateway, upstream):
    data = request("GET", "/v1/models", [("X-Big", "a" * 70_000)])
    with RawConn(gateway.port) as c:
        c.trickle([data[i : i + 1024] for i in range(0, len(data), 1024)], delay=0.002)
        resp = c.read_response()
        assert_gateway_error(resp, 431, "headers_too_large", upstream=upstream)
        assert c.is_closed(2.0)
    sentinel_only(gateway, upstream)


def test_70kb_header_in_one_write_gets_431_and_close(gateway, upstream):
    data = request("GET", "/v1/models", [("X-Big", "a" * 70_000)])
    expect_rejected(gateway, upstream, data, 431, "headers_too_large")


def test_16kb_request_line_gets_414_and_close(gateway, upstream):
    data = request("GET", "/v1/models?q=" + "a" * 16_000)
    expect_rejected(gateway, upstream, data, 414, "uri_too_long")


def test_200_headers_get_431_and_close(gateway, upstream):
    data = request("GET", "/v1/models", [(f"X-H{i}", "v") for i in range(200)])
    expect_rejected(gateway, upstream, data, 431, "headers_too_large")


def test_many_small_headers_summing_over_the_limit_get_431(gateway, upstream):
    data = request("GET", "/v1/models", [(f"X-H{i}", "v" * 400) for i in range(50)])
    expect_rejected(gateway, upstream, data, 431, "headers_too_large")


def test_declared_body_over_limit_gets_413_before_any_body_byte(gateway, upstream):
    data = chat_head(["Content-Length: 10737418240"])
    with RawConn(gateway.port) as c:
        t0 = time.monotonic()
        c.send(data)
        resp = c.read_response(timeout=2.0)
        elapsed = time.monotonic() - t0
        assert_gateway_error(resp, 413, "request_too_large", upstream=upstream)
        assert elapsed < 1.0, f"413 took {elapsed:.2f}s"
        assert c.is_closed(2.0)
    sentinel_only(gateway, upstream)


def test_chunked_body_over_limit_gets_413_and_close(tight_gateway, upstream):
    body = b"x" * 100_000
    data = chat_head(["Transfer-Encoding: chunked"]) + chunked(body, size=8192)
    with RawConn(tight_gateway.port) as c:
        c.send(data)
        resp = c.read_response(timeout=3.0)
        assert_gateway_error(resp, 413, "request_too_large", upstream=upstream)
        assert c.is_closed(2.0)
    sentinel_only(tight_gateway, upstream)


def test_content_length_body_over_small_limit_gets_413(tight_gateway, upstream):
    data = chat_head(["Content-Length: 70000"])
    with RawConn(tight_gateway.port) as c:
        c.send(data)
        resp = c.read_response(timeout=2.0)
        assert_gateway_error(resp, 413, "request_too_large", upstream=upstream)
        assert c.is_closed(2.0)
    sentinel_only(tight_gateway, upstream)


# --------------------------------------------------------------------------- deadlines


def test_slowloris_headers_are_cut_at_the_header_deadline(tight_gateway, upstream):
    with RawConn(tight_gateway.port) as c:
        t0 = time.monotonic()
        lines = [b"GET /v1/models HTTP/1.1\r\n"] + [b"X-Slow-%d: v\r\n" % i for i in range(20)]
        c.trickle(lines, delay=0.3)
        try:
            resp = c.read_response(timeout=3.0)
        except AssertionError:
            resp = None  # a plain close is allowed too
        closed = c.is_closed(3.0)
        elapsed = time.monotonic() - t0
    assert closed, "slow header sender still connected"
    assert elapsed < 2.5, f"closed only after {elapsed:.2f}s with a 1s header deadline"
    if resp is not None:
        assert_gateway_error(resp, 408, "request_timeout", upstream=upstream)
    sentinel_only(tight_gateway, upstream)


def test_idle_connection_without_request_is_closed_at_header_deadline(tight_gateway):
    with RawConn(tight_gateway.port) as c:
        t0 = time.monotonic()
        assert c.is_closed(3.0)
        assert time.monotonic() - t0 < 2.5


def test_stalled_request_body_gets_408_or_close_at_body_deadline(tight_gateway, upstream):
    with RawConn(tight_gateway.port) as c:
        c.send(chat_head(["Content-Length: 100"]) + b'{"model":')
        t0 = time.monotonic()
        try:
            resp = c.read_response(timeout=3.0)
        except AssertionError:
            resp = None
        closed = c.is_closed(3.0)
        elapsed = time.monotonic() - t0
    assert closed
    assert 0.8 < elapsed < 2.5, f"closed after {elapsed:.2f}s with a 1s body deadline"
    if resp is not None:
        assert_gateway_error(resp, 408, "request_timeout", upstream=upstream)
    sentinel_only(tight_gateway, upstream)


def test_body_trickled_slowly_but_within_deadline_is_accepted(tight_gateway, upstream):
    body = CHAT_BODY
    with RawConn(tight_gateway.port) as c:
        c.send(chat_head([f"Content-Length: {len(body)}"]))
        half = len(body) // 2
        c.trickle([body[:half], body[half:]], delay=0.4, stop_when_answered=False)
        resp = c.read_response()
    assert resp.status == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.body == body


# --------------------------------------------------------------------------- methods, targets, Host


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", id="CONNECT"
        ),
        pytest.param(b"TRACE / HTTP/1.1\r\nHost: gw.test\r\n\r\n", id="TRACE"),
        pytest.param(b"TRACE /v1/models HTTP/1.1\r\nHost: gw.test\r\n\r\n", id="TRACE-v1"),
    ],
)
def test_connect_and_trace_get_405(gateway, upstream, data):
    resp, _, extra = send_and_read(gateway, data)
    assert_gateway_error(resp, 405, "method_not_allowed", upstream=upstream)
    assert extra == b""
    sentinel_only(gateway, upstream)


@pytest.mark.parametrize(
    "target",
    ["http://evil.example/v1/models", "https://api.openai.com/v1/models", "*"],
)
def test_absolute_form_and_asterisk_targets_get_400(gateway, upstream, target):
    data = f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()
    resp, _, _ = send_and_read(gateway, data)
    assert_gateway_error(resp, 400, {"invalid_request", "invalid_path"}, upstream=upstream)
    sentinel_only(gateway, upstream)


def test_missing_host_on_http11_gets_400(gateway, upstream):
    data = b"GET /v1/models HTTP/1.1\r\nAccept: */*\r\n\r\n"
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


def test_two_host_headers_get_400(gateway, upstream):
    data = b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nHost: evil.example\r\n\r\n"
    expect_rejected(gateway, upstream, data, 400, "invalid_request")


@pytest.mark.parametrize("host", ["evil/?", "evil/#", "a@b", "evil.example:443", "evil/../admin"])
def test_hostile_host_header_never_changes_what_upstream_sees(gateway, upstream, host):
    data = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    resp, _, _ = send_and_read(gateway, data)
    if resp.status == 400:
        assert_gateway_error(resp, 400, "invalid_request", upstream=upstream)
        sentinel_only(gateway, upstream)
        return
    assert resp.status == 200, resp.body
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == "/v1/models"
    assert rec.headers_named("host") == [f"127.0.0.1:{upstream.port}"]


def test_http10_request_without_host_is_forwarded_and_closed(gateway, upstream):
    resp, closed, _ = send_and_read(gateway, b"GET /v1/models HTTP/1.0\r\n\r\n", close_wait=2.0)
    assert resp.status == 200
    assert closed
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("host") == [f"127.0.0.1:{upstream.port}"]


# --------------------------------------------------------------------------- traversal (A8 / I4)

# (request-target, canonical paths the upstream may see; None = must be 400 invalid_path)
TRAVERSAL = [
    ("/v1/../admin", {"/admin"}),
    ("/v1/%2e%2e/admin", {"/admin"}),
    ("/v1/%2E%2E/admin", {"/admin"}),
    ("/v1/.%2e/admin", {"/admin"}),
    ("/v1/%2E%2E%2Fadmin", None),
    ("/v1/%252e%252e/", None),
    ("/v1/%252e%252e/admin", None),
    ("/v1//..//admin", {"/admin", "/v1/admin"}),
    ("/v1/..;/admin", {"/v1/..;/admin"}),
    ("/v1%2fadmin", None),
    ("/v1%5cadmin", None),
    ("/v1/%00/admin", None),
    ("/v1\\..\\admin", None),
    ("/ADMIN", {"/ADMIN"}),
    ("/admin/.", {"/admin/", "/admin"}),
    ("//evil.example/v1/models", {"/evil.example/v1/models"}),
    ("/v1/../../../../etc/passwd", {"/etc/passwd"}),
    ("/v1/./models/../models", {"/v1/models"}),
    ("/chat/../models", {"/v1/models"}),
]


def _dot_free(path: str) -> bool:
    segs = [unquote(s.replace("%2E", "%2e")) for s in path.split("/")]
    return "." not in segs and ".." not in segs and "//" not in path


def _check_traversal(gw, upstream: FakeUpstream, target: str, allowed, prefix: str) -> None:
    data = f"GET {target}?x=1 HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()
    resp, _, _ = send_and_read(gw, data)
    if resp.status == 400:
        # the backslash may be refused by the HTTP parser itself
        codes = {"invalid_path", "invalid_request"} if "\\" in target else {"invalid_path"}
        assert_gateway_error(resp, 400, codes, upstream=upstream)
        sentinel_only(gw, upstream)
        return
    assert allowed is not None, f"{target!r} must be refused with 400 invalid_path ({resp.status})"
    [rec] = upstream.wait_for_requests(1)
    assert rec.target.startswith(prefix + "/"), rec.target
    forwarded = rec.path[len(prefix) :]
    assert forwarded in allowed, f"{target!r} forwarded as {rec.target!r}"
    assert _dot_free(forwarded), rec.target
    assert rec.query == "x=1"


@pytest.mark.parametrize(("target", "allowed"), TRAVERSAL)
def test_traversal_is_refused_or_forwarded_canonical(gateway, upstream, target, allowed):
    _check_traversal(gateway, upstream, target, allowed, prefix="")


@pytest.mark.parametrize(("target", "allowed"), TRAVERSAL)
def test_traversal_never_climbs_above_the_base_path(prefixed_gateway, upstream, target, allowed):
    _check_traversal(prefixed_gateway, upstream, target, allowed, prefix="/openai")


def test_prefixed_gateway_forwards_under_the_prefix(prefixed_gateway, upstream):
    resp = exchange(prefixed_gateway.port, request("GET", "/models?limit=1"))
    assert resp.status == 404  # the fake upstream has no /openai routes
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == "/openai/v1/models?limit=1"


# --------------------------------------------------------------------------- CRLF injection


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models?a=1%0d%0aX-Injected:%201",
        "/v1/models?a=%0D%0AX-Injected:%201%0D%0A%0D%0A",
        "/v1/models%0d%0aX-Injected:%201",
        "/v1/models/%0d%0aX-Injected:%201",
    ],
)
def test_encoded_crlf_never_becomes_a_header(gateway, upstream, target):
    data = f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()
    resp, _, _ = send_and_read(gateway, data)
    assert resp.header("x-injected") is None
    if resp.status == 400:
        assert_gateway_error(resp, 400, {"invalid_path", "invalid_request"}, upstream=upstream)
        sentinel_only(gateway, upstream)
        return
    [rec] = upstream.wait_for_requests(1)
    assert rec.target == target, "the target must be forwarded byte for byte (still encoded)"
    assert rec.header("x-injected") is None
    assert all("\r" not in v and "\n" not in v for _, v in rec.headers)


# --------------------------------------------------------------------------- Expect, pipelining


def test_expect_100_continue_gets_interim_then_final_and_upstream_sees_no_expect(gateway, upstream):
    head = chat_head([f"Content-Length: {len(CHAT_BODY)}", "Expect: 100-continue"])
    with RawConn(gateway.port) as c:
        c.send(head)
        assert c.read_interim(timeout=2.0) == 100
        c.send(CHAT_BODY)
        resp = c.read_response()
        assert resp.status == 200
        assert resp.informational == [100]
        assert resp.json()["object"] == "chat.completion"
    [rec] = upstream.wait_for_requests(1)
    assert rec.header("expect") is None
    assert rec.body == CHAT_BODY


def test_expect_100_continue_with_body_over_limit_gets_413_without_100(gateway, upstream):
    head = chat_head(["Content-Length: 10737418240", "Expect: 100-continue"])
    with RawConn(gateway.port) as c:
        c.send(head)
        resp = c.read_response(timeout=2.0)
        assert resp.informational == []
        assert_gateway_error(resp, 413, "request_too_large", upstream=upstream)
        assert c.is_closed(2.0)
    sentinel_only(gateway, upstream)


def test_two_pipelined_requests_get_two_responses_in_order(gateway, upstream):
    data = request("GET", "/v1/models/gpt-4o") + request(
        "POST", CHAT, [("Content-Type", "application/json")], CHAT_BODY
    )
    with RawConn(gateway.port) as c:
        c.send(data)
        first = c.read_response()
        second = c.read_response()
        assert not c.is_closed(0.2)
    assert first.status == 200 and first.json()["id"] == "gpt-4o"
    assert second.status == 200 and second.json()["object"] == "chat.completion"
    recs = upstream.wait_for_requests(2)
    assert [r.target for r in recs] == ["/v1/models/gpt-4o", CHAT]


def test_pipelined_request_after_error_is_not_processed(gateway, upstream):
    data = b"GET /v1/models HTTP/1.1\r\nHost: gw.test\r\nHost: x\r\n\r\n" + request(
        "GET", "/v1/models/gpt-4o"
    )
    with RawConn(gateway.port) as c:
        c.send(data)
        resp = c.read_response()
        assert_gateway_error(resp, 400, "invalid_request", upstream=upstream)
        assert c.is_closed(2.0)
        assert c.extra == b""
    sentinel_only(gateway, upstream)


def test_three_sequential_requests_on_one_keepalive_connection(gateway, upstream):
    with RawConn(gateway.port) as c:
        for i in range(3):
            c.send(request("GET", f"/v1/models?i={i}"))
            resp = c.read_response()
            assert resp.status == 200
            assert resp.json()["object"] == "list"
        assert not c.is_closed(0.2)
    recs = upstream.wait_for_requests(3)
    assert [r.query for r in recs] == ["i=0", "i=1", "i=2"]
    assert len({r.conn_id for r in recs}) == 1, "the gateway should reuse its upstream connection"


def test_connection_close_request_is_answered_then_closed(gateway, upstream):
    data = request("GET", "/v1/models", [("Connection", "close")])
    resp, closed, _ = send_and_read(gateway, data, close_wait=2.0)
    assert resp.status == 200
    assert closed


def test_head_request_gets_no_body(gateway, upstream):
    with RawConn(gateway.port) as c:
        c.send(request("HEAD", "/v1/models"))
        resp = c.read_response("HEAD")
        assert resp.body == b""
        c.send(request("GET", "/v1/models"))
        assert c.read_response().status == 200


# --------------------------------------------------------------------------- upgrades


def test_websocket_upgrade_gets_501_not_implemented(gateway, upstream):
    data = request(
        "GET",
        "/v1/realtime?model=gpt-4o-realtime-preview",
        [
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    resp, closed, extra = send_and_read(gateway, data, close_wait=2.0)
    assert_gateway_error(resp, 501, "not_implemented", upstream=upstream)
    assert closed
    assert extra == b""
    sentinel_only(gateway, upstream)


def test_h2c_upgrade_gets_501_or_is_served_as_http11(gateway, upstream):
    data = request(
        "GET", "/v1/models", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")]
    )
    resp, _, _ = send_and_read(gateway, data)
    if resp.status == 501:
        assert_gateway_error(resp, 501, "not_implemented", upstream=upstream)
        return
    assert resp.status == 200
    [rec] = upstream.wait_for_requests(1)
    assert rec.header("upgrade") is None


# --------------------------------------------------------------------------- the key never leaks


def test_gateway_key_is_added_upstream_but_never_shown_to_the_client(gateway, upstream):
    with RawConn(gateway.port) as c:
        c.send(request("GET", "/v1/models/no-such-model"))
        resp = c.read_response()
        assert resp.status == 404
        assert_no_secret(bytes(c.raw_received))
    [rec] = upstream.wait_for_requests(1)
    assert rec.header("authorization") == f"Bearer {DEFAULT_API_KEY}"


# --------------------------------------------------------------------------- mutation fuzz

_SEEDS = [
    request("GET", "/v1/models?limit=2", [("Accept", "application/json")]),
    chat_head([f"Content-Length: {len(CHAT_BODY)}"]) + CHAT_BODY,
    chat_head(["Transfer-Encoding: chunked"]) + chunked(CHAT_BODY),
]
_INSERTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"0",
    b"-",
    b"\xff",
    b"%2e%2e/",
    b"/..",
    b"\r\nTransfer-Encoding: chunked",
    b"\r\nContent-Length: 3",
    b"\r\nHost: evil",
    b"\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
]


@st.composite
def _mutated_requests(draw) -> bytes:
    return mutate(draw, draw(st.sampled_from(_SEEDS)), _INSERTS)


def _read_all_responses(c: RawConn) -> list[RawResponse]:
    out = []
    while True:
        try:
            resp = c.read_response(allow_incomplete=True)
        except (RawClosed, RawTimeout):
            return out
        out.append(resp)
        if not resp.complete or resp.closes:
            return out


@settings(
    max_examples=int(os.environ.get("H2_FUZZ_EXAMPLES", "50")),  # raise it for a nightly run
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=_mutated_requests(), half_close=st.booleans())
def test_mutated_requests_get_well_formed_answers_and_forward_nothing_unsafe(
    gateway, upstream, data, half_close
):
    """Invariants for any mutation of a valid request: what comes back parses with a strict
    HTTP/1.1 parser, is never a 500 and leaks nothing; what is forwarded has a canonical
    target and no control characters in header values; the gateway stays up."""
    upstream.reset()
    with RawConn(gateway.port, timeout=0.3) as c:
        c.send(data)
        if half_close:
            c.sock.shutdown(socket.SHUT_WR)
        responses = _read_all_responses(c)  # h11 raises on anything malformed
        assert_no_secret(bytes(c.raw_received))
    for resp in responses:
        assert resp.status != 500, resp.body
    for rec in upstream.requests:
        assert rec.target.startswith("/"), rec.target
        assert _dot_free(rec.path), rec.target
        for name, value in rec.headers:
            assert not any(ch in value for ch in "\r\n\x00"), (name, value)
    assert exchange(gateway.port, request("GET", "/healthz")).status == 200
