"""Upstream and client faults against a real gateway process (TESTING.md 3c / 3d).

The fake upstream scripts the faults (resets, stalls, garbage, slow heads); the client side
is a raw socket, so what is asserted is exactly what a client would see on the wire.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import DEFAULT_API_KEY, assert_no_secret, free_port, start_gateway
from fakeupstream import FakeUpstream, Recorded, Reply, sse_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhttp import RawClosed, RawConn, RawResponse, RawTimeout, exchange, mutate, request

CHAT = "/v1/chat/completions"
JSON_CT = [("content-type", "application/json")]
SSE_CT = [("content-type", "text/event-stream; charset=utf-8")]

# small timeouts so every fault resolves within a second or two
FAULT_ENV = {
    "OPENAI_FORWARD_CONNECT_TIMEOUT": "1",
    "OPENAI_FORWARD_READ_TIMEOUT": "1",
    "OPENAI_FORWARD_IDLE_TIMEOUT": "1",
}


def chat_body(stream: bool = False) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def post(path: str, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    return request("POST", path, [("Content-Type", "application/json"), *(headers or [])], body)


def events(n: int) -> list[bytes]:
    """n numbered chat.completion.chunk events (no [DONE])."""
    return [
        sse_event(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
            }
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def fault_gateway(upstream: FakeUpstream) -> Iterator:
    gw = start_gateway(upstream.url, env=FAULT_ENV)
    yield gw
    gw.stop()
    out = gw.output()
    gw.cleanup()
    assert "Traceback" not in out, f"gateway output has a traceback:\n{out}"


def no_leak(text: str | bytes, upstream_port: int) -> None:
    """No secret key and no upstream address in anything the client received."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    assert_no_secret(text)
    assert f"127.0.0.1:{upstream_port}" not in text, text
    assert str(upstream_port) not in text, text


def assert_gateway_error(
    resp: RawResponse, status: int, code: str, upstream_port: int, type_: str = "server_error"
) -> dict:
    assert resp.status == status, (resp.status, resp.body)
    assert (resp.header("content-type") or "").startswith("application/json")
    assert resp.header("x-request-id")
    body = resp.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and isinstance(err["message"], str)
    assert err["param"] is None
    assert err["type"] == type_, err
    assert err["code"] == code, err
    no_leak(repr(resp.headers) + resp.body.decode("latin-1"), upstream_port)
    return err


def sse_data(body: bytes) -> list[str]:
    """The data: payloads of an SSE body, in order."""
    out = []
    for block in body.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[len("data: ") :])
    return out


def stream_request(gw, path: str) -> tuple[RawResponse, float]:
    """POST a streaming request, read the whole response; returns it and the elapsed time."""
    with RawConn(gw.port, timeout=8.0) as c:
        t0 = time.monotonic()
        c.send(post(path, chat_body(stream=True)))
        resp = c.read_response(allow_incomplete=True)
        return resp, time.monotonic() - t0


def assert_stream_cut_with_error(resp: RawResponse, sent: list[bytes], code: str, port: int):
    """Client got every event sent so far, then one SSE error event, then a clean end."""
    assert resp.status == 200
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    assert resp.complete, f"the chunked body must end cleanly, got: {resp.error}"
    data = sse_data(resp.body)
    expected = [e[len(b"data: ") : -2].decode() for e in sent]
    assert data[: len(expected)] == expected, data
    assert len(data) == len(expected) + 1, data
    err = json.loads(data[-1])
    assert list(err) == ["error"], err
    assert err["error"]["code"] == code, err
    assert err["error"]["type"] == "server_error", err
    assert err["error"]["param"] is None
    assert err["error"]["message"]
    assert resp.body.endswith(b"\n\n")
    assert b"[DONE]" not in resp.body
    no_leak(resp.body, port)


# --------------------------------------------------------------------------- connect errors


def test_nothing_listening_upstream_gives_fast_502_connect_error(gateway_factory):
    dead_port = free_port()
    gw = gateway_factory(
        f"http://127.0.0.1:{dead_port}", env={"OPENAI_FORWARD_CONNECT_TIMEOUT": "5"}
    )
    for data in (request("GET", "/v1/models"), post(CHAT, chat_body())):
        t0 = time.monotonic()
        resp = exchange(gw.port, data)
        elapsed = time.monotonic() - t0
        assert_gateway_error(resp, 502, "upstream_connect_error", dead_port)
        assert elapsed < 1.0, f"refused connection took {elapsed:.2f}s to report"
    assert exchange(gw.port, request("GET", "/healthz")).status == 200
    assert "Traceback" not in gw.output()


def test_unresolvable_upstream_host_gives_502_without_naming_it(gateway_factory):
    gw = gateway_factory(
        "http://upstream-does-not-exist.invalid:8080",
        env={"OPENAI_FORWARD_CONNECT_TIMEOUT": "1"},
    )
    t0 = time.monotonic()
    resp = exchange(gw.port, request("GET", "/v1/models"))
    assert time.monotonic() - t0 < 3.0
    assert_gateway_error(resp, 502, "upstream_connect_error", 8080)
    assert b"does-not-exist" not in resp.body
    assert "Traceback" not in gw.output()


# --------------------------------------------------------------------------- first byte timeout


def test_upstream_that_never_answers_gives_504_after_read_timeout(fault_gateway, upstream):
    upstream.script("GET", "/v1/x-silent", Reply(headers_delay=30))
    with RawConn(fault_gateway.port) as c:
        t0 = time.monotonic()
        c.send(request("GET", "/v1/x-silent"))
        resp = c.read_response(timeout=5.0)
        elapsed = time.monotonic() - t0
    assert_gateway_error(resp, 504, "upstream_timeout", upstream.port)
    assert 0.9 <= elapsed < 2.5, f"504 after {elapsed:.2f}s with READ_TIMEOUT=1"
    [rec] = upstream.wait_for_requests(1)
    closed_at = upstream.connection_closed_at(rec.conn_id, timeout=2.0)
    assert closed_at - t0 < 2.5, "the gateway must drop the upstream connection it gave up on"


def test_streaming_request_without_first_byte_gives_504(fault_gateway, upstream):
    upstream.script("POST", "/v1/x-silent-stream", Reply(headers_delay=30))
    resp, elapsed = stream_request(fault_gateway, "/v1/x-silent-stream")
    assert_gateway_error(resp, 504, "upstream_timeout", upstream.port)
    assert elapsed < 2.5


# --------------------------------------------------------------------------- protocol errors

BAD_RESPONSES = {
    "garbage": b"this is not http at all\r\n\r\n",
    "invalid-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "bare-cr-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok",
    "http-2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "empty-then-close": b"",
}


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
def test_invalid_upstream_response_gives_502_protocol_error(fault_gateway, upstream, name):
    upstream.script("GET", "/v1/x-bad", Reply(raw=BAD_RESPONSES[name]))
    with RawConn(fault_gateway.port) as c:
        c.send(request("GET", "/v1/x-bad"))
        resp = c.read_response(timeout=5.0)
        assert resp.header("x-injected") is None
        assert resp.status == 502, (resp.status, resp.body)
        code = resp.json()["error"]["code"]
        assert_gateway_error(resp, 502, code, upstream.port)
        if name == "empty-then-close":  # no byte at all: a disconnect, not a protocol error
            assert code in ("upstream_disconnected", "upstream_protocol_error")
        else:
            assert code == "upstream_protocol_error"
        no_leak(bytes(c.raw_received), upstream.port)


BAD_STATUS_LINES = {
    "nul-in-reason": b"HTTP/1.1 200 \x00OK",
    "ctl-in-reason": b"HTTP/1.1 200 O\x01K",
    "esc-in-reason": b"HTTP/1.1 200 \x1b[31mOK",
    "del-in-reason": b"HTTP/1.1 200 O\x7fK",
    "two-digit-status": b"HTTP/1.1 099 Weird",
    "status-0": b"HTTP/1.1 000 Zero",
}


@pytest.mark.parametrize("name", list(BAD_STATUS_LINES))
def test_upstream_status_line_with_control_chars_or_bad_code_never_reaches_client(
    fault_gateway, upstream, name
):
    """Relaying the status line byte-for-byte must not relay bytes that make it invalid:
    either 502 upstream_protocol_error, or a valid 3-digit 1xx-5xx status with a clean reason."""
    raw = BAD_STATUS_LINES[name] + b"\r\nContent-Length: 2\r\n\r\nok"
    upstream.script("GET", "/v1/x-status", Reply(raw=raw))
    with RawConn(fault_gateway.port) as c:
        c.send(request("GET", "/v1/x-status"))
        resp = c.read_response(timeout=5.0)  # h11 rejects NUL and non-3-digit codes
        status_line = bytes(c.raw_received).split(b"\r\n", 1)[0]
    if resp.status == 502:
        assert_gateway_error(resp, 502, "upstream_protocol_error", upstream.port)
        return
    assert 100 <= resp.status <= 999 and status_line[9:13].endswith(b" "), status_line
    assert not any((b < 0x20 and b != 0x09) or b == 0x7F for b in status_line), status_line


def test_bare_lf_in_upstream_header_is_refused_or_relayed_well_formed(fault_gateway, upstream):
    raw = b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: 1\r\nContent-Length: 2\r\n\r\nok"
    upstream.script("GET", "/v1/x-lf", Reply(raw=raw))
    with RawConn(fault_gateway.port) as c:
        c.send(request("GET", "/v1/x-lf"))
        resp = c.read_response(timeout=5.0)  # h11 rejects a bare LF in what we relay
        raw_head = bytes(c.raw_received).split(b"\r\n\r\n", 1)[0]
    if resp.status == 502:
        assert_gateway_error(resp, 502, "upstream_protocol_error", upstream.port)
    else:
        assert resp.status == 200 and resp.body == b"ok"
        assert b"\n" not in raw_head.replace(b"\r\n", b""), raw_head


# --------------------------------------------------------------------------- mid-stream failures


def test_upstream_reset_mid_sse_ends_stream_with_error_event(fault_gateway, upstream):
    sent = events(3)
    upstream.script("POST", "/v1/x-reset", Reply(headers=SSE_CT, chunks=sent, end="reset"))
    resp, elapsed = stream_request(fault_gateway, "/v1/x-reset")
    assert elapsed < 2.0
    assert_stream_cut_with_error(resp, sent, "upstream_disconnected", upstream.port)


def test_upstream_fin_without_last_chunk_mid_sse_ends_stream_with_error_event(
    fault_gateway, upstream
):
    sent = events(2)
    upstream.script("POST", "/v1/x-fin", Reply(headers=SSE_CT, chunks=sent, end="close"))
    resp, _ = stream_request(fault_gateway, "/v1/x-fin")
    assert_stream_cut_with_error(resp, sent, "upstream_disconnected", upstream.port)


def test_upstream_stall_mid_sse_ends_stream_with_timeout_event(fault_gateway, upstream):
    sent = events(3)
    upstream.script("POST", "/v1/x-stall", Reply(headers=SSE_CT, chunks=sent, end="stall"))
    resp, elapsed = stream_request(fault_gateway, "/v1/x-stall")
    assert 0.9 <= elapsed < 2.5, f"stream cut after {elapsed:.2f}s with IDLE_TIMEOUT=1"
    assert_stream_cut_with_error(resp, sent, "upstream_timeout", upstream.port)
    [rec] = upstream.wait_for_requests(1)
    upstream.connection_closed_at(rec.conn_id, timeout=1.0)


def test_each_sse_chunk_reaches_the_client_before_the_next_is_sent(fault_gateway, upstream):
    sent = events(3)
    gate = threading.Event()
    upstream.script("POST", "/v1/x-gated", Reply(headers=SSE_CT, chunks=sent, gate=gate))
    with RawConn(fault_gateway.port) as c:
        c.send(post("/v1/x-gated", chat_body(stream=True)))
        resp = c.read_head()
        c.read_until(resp, sent[0], timeout=2.0)
        gate.set()
        c.read_body(resp)
    assert resp.complete
    assert resp.body == b"".join(sent)


def test_upstream_stall_mid_json_body_aborts_client_connection(fault_gateway, upstream):
    upstream.script(
        "POST", CHAT, Reply(headers=JSON_CT, chunks=[b'{"id": "chatcmpl-1", '], end="stall")
    )
    with RawConn(fault_gateway.port) as c:
        t0 = time.monotonic()
        c.send(post(CHAT, chat_body()))
        resp = c.read_response(timeout=5.0, allow_incomplete=True)
        elapsed = time.monotonic() - t0
        assert resp.status == 200
        assert not resp.complete, "a cut JSON body must not look complete"
        assert c.is_closed(1.0)
    assert elapsed < 2.5


@pytest.mark.parametrize("end", ["reset", "close"])
def test_upstream_disconnect_mid_json_body_aborts_client_connection(fault_gateway, upstream, end):
    upstream.script("POST", CHAT, Reply(headers=JSON_CT, chunks=[b'{"id": "x", '], end=end))
    with RawConn(fault_gateway.port) as c:
        c.send(post(CHAT, chat_body()))
        resp = c.read_response(timeout=5.0, allow_incomplete=True)
        assert resp.status == 200
        assert not resp.complete, "a cut JSON body must not look complete"


def test_content_length_body_shorter_than_declared_is_not_delivered_complete(
    fault_gateway, upstream
):
    raw = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a":'
    upstream.script("POST", CHAT, Reply(raw=raw))
    with RawConn(fault_gateway.port) as c:
        c.send(post(CHAT, chat_body()))
        resp = c.read_response(timeout=5.0, allow_incomplete=True)
    if resp.status == 502:
        assert_gateway_error(resp, 502, resp.json()["error"]["code"], upstream.port)
    else:
        assert resp.status == 200 and not resp.complete


# --------------------------------------------------------------------------- client disconnects


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_disconnect_mid_stream_closes_upstream_within_1s(fault_gateway, upstream, how):
    gate = threading.Event()  # never set: the upstream holds chunk 2 until the peer leaves
    sent = events(5)
    upstream.script("POST", "/v1/x-long", Reply(headers=SSE_CT, chunks=sent, gate=gate))
    with RawConn(fault_gateway.port) as c:
        c.send(post("/v1/x-long", chat_body(stream=True)))
        resp = c.read_head()
        c.read_until(resp, sent[0], timeout=2.0)
        [rec] = upstream.wait_for_requests(1)
        t_close = time.monotonic()
        if how == "reset":
            c.abort()
    closed_at = upstream.connection_closed_at(rec.conn_id, timeout=3.0)
    assert closed_at - t_close < 1.0, f"upstream closed {closed_at - t_close:.2f}s after client"


@pytest.mark.parametrize(
    ("stream", "how"), [(True, "close"), (False, "close"), (True, "reset"), (False, "reset")]
)
def test_client_disconnect_before_first_byte_closes_upstream_within_1s(
    gateway, upstream, stream, how
):
    # default READ_TIMEOUT (600 s): only the client's departure can end this request
    upstream.script("POST", "/v1/x-slow-head", Reply(headers_delay=5))
    with RawConn(gateway.port) as c:
        c.send(post("/v1/x-slow-head", chat_body(stream=stream)))
        [rec] = upstream.wait_for_requests(1)
        t_close = time.monotonic()
        if how == "reset":
            c.abort()
    closed_at = upstream.connection_closed_at(rec.conn_id, timeout=2.0)
    assert closed_at - t_close < 1.0, f"upstream closed {closed_at - t_close:.2f}s after client"


def test_client_half_close_after_request_gets_response_or_clean_close(fault_gateway, upstream):
    """SHUT_WR after the request (D5): either the response arrives complete, or the gateway
    treats the FIN as a disconnect (as nginx does) and closes, possibly mid-response when the
    answer was already on its way; never a crash or a hang."""
    with RawConn(fault_gateway.port) as c:
        c.send(request("GET", "/v1/models"))
        c.sock.shutdown(socket.SHUT_WR)
        try:
            resp = c.read_response(timeout=3.0)
        except RawTimeout:
            raise
        except AssertionError:  # RawClosed, or a body cut by the close
            assert c.is_closed(2.0)
        else:
            assert resp.status == 200
    assert exchange(fault_gateway.port, request("GET", "/healthz")).status == 200


# --------------------------------------------------------------------------- stale pooled conns


def _stale_on_reuse(ok_body: bytes) -> Callable[[Recorded], Reply]:
    """First request on a connection: a keep-alive answer. A second request on the same
    connection: close without answering (an upstream whose keep-alive timer just fired)."""
    seen: set[int] = set()
    lock = threading.Lock()

    def reply(rec: Recorded) -> Reply:
        with lock:
            reused = rec.conn_id in seen
            seen.add(rec.conn_id)
        if reused:
            return Reply(raw=b"")
        return Reply(headers=JSON_CT, body=ok_body)

    return reply


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_stale_pooled_connection_is_retried_transparently(fault_gateway, upstream, method):
    upstream.script(method, "/v1/x-stale", _stale_on_reuse(b'{"ok": true}'))
    data = request("GET", "/v1/x-stale") if method == "GET" else post("/v1/x-stale", b"{}")
    with RawConn(fault_gateway.port) as c:
        for _ in range(3):
            c.send(data)
            resp = c.read_response()
            assert resp.status == 200, resp.body
            assert resp.json() == {"ok": True}


def test_upstream_connection_close_reply_does_not_break_next_request(fault_gateway, upstream):
    upstream.script("GET", "/v1/x-close", Reply(headers=JSON_CT, body=b"{}", close=True))
    with RawConn(fault_gateway.port) as c:
        for _ in range(3):
            c.send(request("GET", "/v1/x-close"))
            assert c.read_response().status == 200
    recs = upstream.wait_for_requests(3)
    assert len({r.conn_id for r in recs}) == 3


def test_upstream_restart_does_not_break_next_request(gateway_factory):
    up = FakeUpstream().start()
    try:
        gw = gateway_factory(up.url)
        assert exchange(gw.port, request("GET", "/v1/models")).status == 200
        port = up.port
        up.stop()
        up = FakeUpstream(port=port).start()
        for _ in range(2):
            resp = exchange(gw.port, request("GET", "/v1/models"))
            assert resp.status == 200, resp.body
        assert "Traceback" not in gw.output()
    finally:
        up.stop()


# --------------------------------------------------------------------------- many random faults


def _gateway_fds_and_conns(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.num_fds(), len(proc.net_connections(kind="tcp"))


def _script_faults(upstream: FakeUpstream) -> None:
    upstream.script("POST", "/v1/f-reset", Reply(headers=SSE_CT, chunks=events(2), end="reset"))
    upstream.script("POST", "/v1/f-stall", Reply(headers=SSE_CT, chunks=events(2), end="stall"))
    upstream.script("POST", "/v1/f-close", Reply(headers=JSON_CT, chunks=[b"{"], end="close"))
    upstream.script("POST", "/v1/f-garbage", Reply(raw=b"garbage\r\n\r\n"))
    upstream.script("POST", "/v1/f-silent", Reply(headers_delay=30))
    upstream.script("POST", "/v1/f-hold", Reply(headers=SSE_CT, chunks=events(3), gate=_NEVER))
    upstream.script("POST", "/v1/f-ok", Reply(headers=SSE_CT, chunks=events(3)))


_NEVER = threading.Event()


def _one_faulty_request(port: int, up_port: int, kind: str) -> str:
    """Run one request of the given kind; return a short outcome label."""
    with RawConn(port, timeout=6.0) as c:
        if kind == "client-leaves-early":
            c.send(post("/v1/f-silent", chat_body()))
            c.abort()
            return "left"
        if kind == "client-leaves-mid-stream":
            c.send(post("/v1/f-hold", chat_body(stream=True)))
            resp = c.read_head()
            c.read_body_part()
            return f"{resp.status}-left"
        if kind == "half-request":
            c.send(post(CHAT, chat_body())[:-5])
            return "half"
        path = {"ok": "/v1/f-ok"}.get(kind, f"/v1/f-{kind}")
        c.send(post(path, chat_body(stream=True)))
        try:
            resp = c.read_response(allow_incomplete=True)
        except (RawClosed, RawTimeout) as exc:
            return f"no-response: {exc}"
        no_leak(bytes(c.raw_received), up_port)
        return str(resp.status)


def test_many_random_faults_leave_no_leaked_fds_or_connections(fault_gateway, upstream):
    pid = fault_gateway.proc.pid
    assert exchange(fault_gateway.port, request("GET", "/healthz")).status == 200
    base_fds, base_conns = _gateway_fds_and_conns(pid)
    _script_faults(upstream)
    kinds = [
        "ok",
        "reset",
        "stall",
        "close",
        "garbage",
        "silent",
        "client-leaves-early",
        "client-leaves-mid-stream",
        "half-request",
    ]
    rng = random.Random(20240601)
    plan = [rng.choice(kinds) for _ in range(100)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(
            pool.map(lambda k: (k, _one_faulty_request(fault_gateway.port, upstream.port, k)), plan)
        )
    bad = [(k, o) for k, o in outcomes if o.startswith("no-response")]
    assert not bad, bad
    assert all(o == "200" for k, o in outcomes if k == "ok"), outcomes
    # the gateway notices closed connections asynchronously: wait (bounded) for the counts
    deadline = time.monotonic() + 5.0
    while True:
        fds, conns = _gateway_fds_and_conns(pid)
        if (fds <= base_fds + 2 and conns <= base_conns + 2) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling psutil: there is no event to wait on
    assert fds <= base_fds + 2, f"fds: {base_fds} before, {fds} after 100 faulty requests"
    assert conns <= base_conns + 2, f"tcp connections: {base_conns} before, {conns} after"
    assert exchange(fault_gateway.port, request("GET", "/healthz")).status == 200
    assert fault_gateway.proc.poll() is None


def test_zz_gateway_output_has_no_traceback_and_no_secret(fault_gateway):
    out = fault_gateway.output()
    assert "Traceback" not in out, out
    assert_no_secret(out, secret=DEFAULT_API_KEY)


# --------------------------------------------------------------------------- upstream fuzz

_GOOD_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
    b'x-request-id: req_1\r\n\r\n{"ok": true}',
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events(2))
    + b"0\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\n{}",
]
_UP_INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"0", b"f", b"-", b"\xff", b"\r\n\r\n"]


@st.composite
def _mutated_responses(draw) -> bytes:
    data = draw(st.sampled_from(_GOOD_RESPONSES))
    # the status line has its own deterministic test (BAD_STATUS_LINES); mutate what follows
    return mutate(draw, data, _UP_INSERTS, start=data.index(b"\r\n") + 2)


@settings(
    max_examples=int(os.environ.get("H2_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=_mutated_responses())
def test_mutated_upstream_responses_reach_client_well_formed_or_as_502(
    fault_gateway, upstream, raw
):
    """Whatever bytes the upstream sends, the client sees a strictly valid HTTP/1.1 response
    (relayed, or a 502), or a body cut short with the connection closed; never a 500, never the
    upstream's address or the key; the gateway stays up."""
    upstream.reset()
    upstream.script("GET", "/v1/x-fuzz", Reply(raw=raw))
    with RawConn(fault_gateway.port, timeout=3.0) as c:
        c.send(request("GET", "/v1/x-fuzz"))
        resp = c.read_response(allow_incomplete=True)  # h11 raises on a malformed head
        if not resp.complete:
            assert c.is_closed(2.0), "a cut body must come with a closed connection"
        no_leak(bytes(c.raw_received), upstream.port)
    assert resp.status != 500, resp.body
    if resp.status == 502:
        assert_gateway_error(resp, 502, resp.json()["error"]["code"], upstream.port)
    assert exchange(fault_gateway.port, request("GET", "/healthz")).status == 200
