"""The response cache under hostile conditions, through a real gateway and real sockets:
odd methods and HTTP versions, pipelining, clients that leave during a replay, bodies the
cache cannot read, compressed answers, revoked keys, concurrency, limits and secrets."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import assert_no_secret, run_cli
from fakeupstream import Reply, sse
from rawhttp import RawConn, request
from redisserver import redis_server  # noqa: F401
from usagedb import wait_rows

CHAT = "/v1/chat/completions"
FK_ALICE = "fk-alice-0123456789abcdefghijklmnopqrstuv"
UP_KEY = "sk-upHostile7Qw3Rt9Yp2Lk5Mn8Zx4Cv"
MESSAGES = [{"role": "user", "content": "What is a gateway?"}]
HEADER = "x-openai-forward-cache"
AUTH = [("Authorization", f"Bearer {FK_ALICE}"), ("Content-Type", "application/json")]
SSE_HEAD = [("content-type", "text/event-stream")]


def write_config(tmp_path: Path, url: str, **top: Any) -> list[str]:
    doc = {
        "upstreams": [{"name": "openai", "base_url": url, "api_key": UP_KEY}],
        "forward_keys": [{"name": "alice", "key": FK_ALICE}],
        "cache_mode": "on",
        "usage_flush_interval": 0.05,
        **top,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))
    return ["--config", str(path)]


def chat_requests(upstream: Any) -> list[Any]:
    return [r for r in upstream.requests if r.path == CHAT]


def body_of(**extra: Any) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": MESSAGES, **extra}).encode()


def post(gw: Any, body: bytes, key: str = FK_ALICE, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {key}", "content-type": "application/json", **headers}
    return httpx.post(gw.url + CHAT, content=body, headers=h, timeout=10)


def raw_post(port: int, body: bytes, version: str = "HTTP/1.1", **kw: Any) -> Any:
    with RawConn(port) as c:
        c.send(request("POST", CHAT, AUTH, body, version=version, **kw))
        resp = c.read_response("POST", timeout=10)
        return resp, c.is_closed(2.0)


def events(n: int) -> list[bytes]:
    return sse([{"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]} for i in range(n)])


# ------------------------------------------------------------------ methods and HTTP versions


def test_get_and_head_on_cacheable_paths_are_forwarded_without_the_cache(
    gateway_factory, upstream, tmp_path
):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    upstream.script("GET", CHAT, Reply(headers=[("content-type", "application/json")], body=b"{}"))
    upstream.script("HEAD", CHAT, Reply(headers=[("content-type", "application/json")], body=b"{}"))
    h = {"authorization": f"Bearer {FK_ALICE}"}
    for _ in range(2):
        got = httpx.get(gw.url + CHAT, headers=h, timeout=10)
        assert got.status_code == 200 and HEADER not in got.headers
        with RawConn(gw.port) as c:
            c.send(request("HEAD", CHAT, AUTH))
            head = c.read_response("HEAD")
            assert head.status == 200 and head.body == b"" and head.header(HEADER) is None
    assert [r.method for r in chat_requests(upstream)] == ["GET", "HEAD"] * 2


def test_an_http10_client_gets_a_cached_stream_close_delimited(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(3)))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = body_of(stream=True)
    first, first_closed = raw_post(gw.port, body, version="HTTP/1.0")
    second, second_closed = raw_post(gw.port, body, version="HTTP/1.0")
    assert first.header(HEADER) == "miss" and second.header(HEADER) == "hit"
    for resp, closed in ((first, first_closed), (second, second_closed)):
        assert resp.status == 200 and resp.complete
        assert resp.header("transfer-encoding") is None and not resp.chunked
        assert resp.body.rstrip().endswith(b"data: [DONE]")
        assert closed, "a close-delimited body must end with the connection"
    assert second.body == first.body
    assert len(chat_requests(upstream)) == 1


def test_an_http10_keep_alive_client_gets_a_framed_hit(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = body_of()
    post(gw, body)
    with RawConn(gw.port) as c:
        for _ in range(2):
            c.send(request("POST", CHAT, [*AUTH, ("Connection", "keep-alive")], body,
                           version="HTTP/1.0"))  # fmt: skip
            resp = c.read_response("POST", timeout=10)
            assert resp.header(HEADER) == "hit" and resp.complete
            assert resp.header("content-length") == str(len(resp.body))
        assert not c.is_closed(0.3)
    assert len(chat_requests(upstream)) == 1


def test_pipelined_hit_then_miss_on_one_connection(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    cached, fresh = body_of(), body_of(temperature=0.3)
    assert post(gw, cached).headers[HEADER] == "miss"
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, AUTH, cached) + request("POST", CHAT, AUTH, fresh))
        one = c.read_response("POST", timeout=10)
        two = c.read_response("POST", timeout=10)
        assert (one.header(HEADER), two.header(HEADER)) == ("hit", "miss")
        assert json.loads(one.body)["choices"] and json.loads(two.body)["choices"]
        # and the other way round: a miss first, then a hit, on the same connection
        c.send(request("POST", CHAT, AUTH, body_of(seed=7)) + request("POST", CHAT, AUTH, cached))
        three = c.read_response("POST", timeout=10)
        four = c.read_response("POST", timeout=10)
        assert (three.header(HEADER), four.header(HEADER)) == ("miss", "hit")
        assert four.body == one.body
        assert not c.is_closed(0.3)
    assert len(chat_requests(upstream)) == 3


def test_pipelined_stream_hits_keep_their_framing(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(3)))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = body_of(stream=True)
    first, _ = raw_post(gw.port, body)
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, AUTH, body) * 3)
        replies = [c.read_response("POST", timeout=10) for _ in range(3)]
    assert all(r.chunked and r.complete and r.body == first.body for r in replies)
    assert len(chat_requests(upstream)) == 1


# ------------------------------------------------------------------ a client that leaves


def test_a_client_leaving_a_paced_replay(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(6), chunk_delay=0.25))
    cfg = {"cache_replay_pace": 1.0}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = body_of(stream=True)
    first, _ = raw_post(gw.port, body)
    assert first.header(HEADER) == "miss"
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, AUTH, body))
        head = c.read_head("POST")
        assert head.header(HEADER) == "hit"
        c.read_body_part()
        c.abort()  # in the middle of the paced replay
    # the gateway serves others meanwhile, and the paced writes to the gone client do no harm
    other = post(gw, body_of(seed=1))
    assert other.status_code == 200 and other.headers[HEADER] == "miss"
    time.sleep(1.8)  # the replay would have gone on this long: let any late write happen
    assert post(gw, body_of(seed=1)).headers[HEADER] == "hit"
    rows = wait_rows(gw_db(gw), 4)
    hits = [r for r in rows if r["cache_hit"] == 1]
    left = [r for r in hits if r["client_closed"] == 1]
    assert len(left) == 1, rows
    assert left[0]["error_code"] == "client_closed" and left[0]["status"] == 200
    assert len(chat_requests(upstream)) == 2
    assert "Traceback" not in gw.output()


def gw_db(gw: Any) -> str:
    return gw.database


# ------------------------------------------------------------------ bodies the cache cannot read


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o", "caching": true, "messages": [',  # truncated
        b'[{"model": "gpt-4o", "caching": true}]',  # an array
        b'"caching"',  # a JSON string
        b'{"model": "gpt-4o", "caching": true}\xff',  # trailing invalid UTF-8
    ],
)
@pytest.mark.parametrize("mode", ["on", "request"])
def test_a_body_the_cache_cannot_read_is_forwarded_untouched(
    gateway_factory, upstream, tmp_path, body, mode
):
    upstream.script("POST", CHAT, Reply(status=400, body=b'{"error":{"message":"bad"}}'))
    cfg = {"cache_mode": mode}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    for _ in range(2):
        r = post(gw, body)
        assert r.status_code in (400, 200), r.text
        assert HEADER not in r.headers or r.status_code == 400
    forwarded = chat_requests(upstream)
    if forwarded:  # either the upstream judged it, byte for byte, or the gateway refused it
        assert all(f.body == body for f in forwarded)
    assert "Traceback" not in gw.output()


def general_gateway(gateway_factory: Any, upstream: Any, tmp_path: Path) -> Any:
    upstreams = [
        {"name": "openai", "base_url": upstream.url, "api_key": UP_KEY},
        {"name": "plain", "base_url": upstream.url, "route": "/plain", "type": "general"},
    ]
    cfg = {"upstreams": upstreams}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    upstream.script("POST", CHAT, Reply(headers=[("content-type", "application/json")], body=b"{}"))
    return gw


def post_general(gw: Any, body: bytes) -> httpx.Response:
    h = {"authorization": f"Bearer {FK_ALICE}", "content-type": "application/json"}
    return httpx.post(gw.url + "/plain" + CHAT, content=body, headers=h, timeout=10)


def test_a_general_upstream_gets_its_caching_member_judged_by_itself(
    gateway_factory, upstream, tmp_path
):
    gw = general_gateway(gateway_factory, upstream, tmp_path)
    sent = b'{"model":"m","caching":"sometimes"}'
    r = post_general(gw, sent)
    assert r.status_code == 200, r.text
    assert [f.body for f in chat_requests(upstream)] == [sent]


def test_a_general_upstream_gets_its_body_untouched(gateway_factory, upstream, tmp_path):
    gw = general_gateway(gateway_factory, upstream, tmp_path)
    sent = b'{"model": "m", "caching": true, "x": 1}'
    assert post_general(gw, sent).status_code == 200
    assert [f.body for f in chat_requests(upstream)] == [sent]


def test_duplicate_caching_members_are_not_ambiguous(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    dup = b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"caching":"bypass",'
    dup += b'"caching":true}'
    for _ in range(2):
        r = post(gw, dup)
        assert r.status_code in (200, 400)
    assert all(b'"caching"' not in f.body for f in chat_requests(upstream))


# ------------------------------------------------------------------ what must not be stored


def test_a_gzip_answer_is_relayed_and_not_stored(gateway_factory, upstream, tmp_path):
    completion = {"object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "zip"}, "finish_reason": "stop"}
    ]}  # fmt: skip
    packed = gzip.compress(json.dumps(completion).encode())
    head = [("content-type", "application/json"), ("content-encoding", "gzip")]
    upstream.script("POST", CHAT, Reply(headers=head, body=packed))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    for _ in range(2):
        with RawConn(gw.port) as c:
            c.send(request("POST", CHAT, AUTH, body_of()))
            resp = c.read_response("POST", timeout=10)
        assert resp.status == 200 and resp.header(HEADER) == "miss"
        assert resp.header("content-encoding") == "gzip" and resp.body == packed
    forwarded = chat_requests(upstream)
    assert len(forwarded) == 2
    assert all(f.header("accept-encoding") == "identity" for f in forwarded)


def test_the_cache_header_is_never_forwarded(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    for value in ("on", "refresh", "bypass", "off"):
        assert post(gw, body_of(), **{HEADER: value}).status_code == 200
    assert all(f.header(HEADER) is None for f in chat_requests(upstream))


# ------------------------------------------------------------------ keys and tenants


def create_key(db: Path, name: str) -> str:
    done = run_cli("keys", "--database", str(db), "create", "--name", name, cwd=db.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_revoked_key_gets_no_hit(gateway_factory, upstream, tmp_path):
    db = tmp_path / "keys.db"
    key = create_key(db, "carol")
    cfg = {"database": str(db), "forward_keys": [], "client_keys": "deny"}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = body_of()
    assert post(gw, body, key=key).headers[HEADER] == "miss"
    assert post(gw, body, key=key).headers[HEADER] == "hit"  # now in the worker's memory too
    done = run_cli("keys", "--database", str(db), "revoke", "carol", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 5
    while True:
        r = post(gw, body, key=key)
        if r.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the store is followed by polling: no event to wait on
    assert r.status_code == 401 and HEADER not in r.headers
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert len(chat_requests(upstream)) == 1


def test_a_client_with_its_own_key_does_not_read_another_clients_entry(
    gateway_factory, upstream, tmp_path
):
    cfg = {"forward_keys": [], "client_keys": "allow", "upstreams": [
        {"name": "openai", "base_url": upstream.url}]}  # fmt: skip
    gw = gateway_factory(
        upstream.url, api_key=None, args=write_config(tmp_path, upstream.url, **cfg)
    )
    body = body_of()
    assert post(gw, body, key="sk-client-one-0123456789abcd").headers[HEADER] == "miss"
    assert post(gw, body, key="sk-client-one-0123456789abcd").headers[HEADER] == "hit"
    assert post(gw, body, key="sk-client-two-0123456789abcd").headers[HEADER] == "miss"
    assert len(chat_requests(upstream)) == 2


# ------------------------------------------------------------------ concurrency and limits


def test_thirty_identical_first_requests_all_complete(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(4), chunk_delay=0.02))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = body_of(stream=True)
    headers = {"authorization": f"Bearer {FK_ALICE}", "content-type": "application/json"}

    async def one(c: httpx.AsyncClient) -> tuple[str, bytes]:
        async with c.stream("POST", gw.url + CHAT, content=body, headers=headers) as r:
            assert r.status_code == 200
            return r.headers[HEADER], await r.aread()

    async def run() -> list[tuple[str, bytes]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=20, limits=limits) as c:
            return await asyncio.gather(*(one(c) for _ in range(30)))

    results = asyncio.run(run())
    bodies = {b for _, b in results}
    assert len(bodies) == 1, "every answer must be the same complete stream"
    assert next(iter(bodies)).rstrip().endswith(b"data: [DONE]")
    assert {s for s, _ in results} <= {"hit", "miss"}
    misses = sum(s == "miss" for s, _ in results)
    assert misses == len(chat_requests(upstream))
    # afterwards: one entry, a hit
    assert post(gw, body).headers[HEADER] == "hit"


def test_hits_count_against_the_rate_limit(gateway_factory, upstream, tmp_path):
    cfg = {"forward_keys": [{"name": "alice", "key": FK_ALICE, "limits": {"rpm": 3}}]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = body_of()
    states = [post(gw, body).headers.get(HEADER) for _ in range(3)]
    assert states == ["miss", "hit", "hit"]
    limited = post(gw, body)
    assert limited.status_code == 429 and HEADER not in limited.headers
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(chat_requests(upstream)) == 1


# ------------------------------------------------------------------ secrets at rest


def test_the_sqlite_cache_holds_no_key(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    post(gw, body_of())
    post(gw, body_of(stream=True))
    post(gw, body_of(), key="fk-wrong-0123456789abcdefghijklmnopq")
    assert gw.stop() == 0
    files = sorted(Path(gw.data_dir).glob("cache.db*"))
    assert files
    for f in files:
        data = f.read_bytes()
        assert_no_secret(data, secret=FK_ALICE)
        assert_no_secret(data, secret=UP_KEY)
    conn = sqlite3.connect(files[0])
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    finally:
        conn.close()
    assert tables


@pytest.mark.usefixtures("redis_server")
def test_the_redis_cache_holds_no_key(gateway_factory, upstream, tmp_path, redis_server):
    redis_server.flush()
    cfg = {"cache_store": redis_server.url}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    assert post(gw, body_of()).headers[HEADER] == "miss"
    assert post(gw, body_of(stream=True)).status_code == 200
    client = redis_server.client()
    deadline = time.monotonic() + 5
    while len(list(client.scan_iter(count=1000))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the store writes in the background
    names = list(client.scan_iter(count=1000))
    assert names
    dump: list[bytes] = []
    for name in names:
        dump.append(name)
        kind = client.type(name)
        if kind == b"string":
            dump.append(client.get(name) or b"")
        elif kind == b"hash":
            dump.extend(k + v for k, v in client.hgetall(name).items())
        assert client.ttl(name) != -1 or kind == b"hash", f"{name!r} never expires"
    blob = b"\n".join(dump)
    assert_no_secret(blob, secret=FK_ALICE)
    assert_no_secret(blob, secret=UP_KEY)


# ------------------------------------------------------------------ paced replays, connections


def test_a_request_pipelined_behind_a_paced_replay_waits_its_turn(
    gateway_factory, upstream, tmp_path
):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(4), chunk_delay=0.15))
    cfg = {"cache_replay_pace": 1.0}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = body_of(stream=True)
    first, _ = raw_post(gw.port, body)
    upstream.reset()
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, AUTH, body) + request("GET", "/v1/models", AUTH))
        replay = c.read_response("POST", timeout=10)
        listing = c.read_response("GET", timeout=10)
    assert replay.header(HEADER) == "hit" and replay.body == first.body
    assert listing.status == 200 and json.loads(listing.body)["object"] == "list"


def test_connection_close_on_a_hit_closes(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = body_of()
    post(gw, body)
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, [*AUTH, ("Connection", "close")], body))
        resp = c.read_response("POST")
        assert resp.header(HEADER) == "hit" and resp.closes
        assert c.is_closed(2.0)


def test_sigterm_during_a_paced_replay_lets_it_finish(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=events(6), chunk_delay=0.2))
    cfg = {"cache_replay_pace": 1.0, "shutdown_timeout": 10}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = body_of(stream=True)
    first, _ = raw_post(gw.port, body)
    with RawConn(gw.port, timeout=15) as c:
        c.send(request("POST", CHAT, AUTH, body))
        head = c.read_head("POST")
        assert head.header(HEADER) == "hit"
        c.read_body_part()
        gw.proc.send_signal(signal.SIGTERM)
        resp = c.read_body(head, timeout=10)
    assert resp.complete and first.body.endswith(resp.body), resp.error
    assert gw.proc.wait(15) == 0
    rows = wait_rows(gw.database, 2)
    assert [r["cache_hit"] for r in rows] == [0, 1]


def test_a_chunked_request_body_with_a_caching_member(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, cache_mode="request")
    )
    body = body_of(caching=True)
    framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    head = [*AUTH, ("Transfer-Encoding", "chunked")]
    states = []
    with RawConn(gw.port) as c:
        for _ in range(2):
            c.send(request("POST", CHAT, head, framed, content_length=False))
            resp = c.read_response("POST", timeout=10)
            assert resp.status == 200, resp.body
            states.append(resp.header(HEADER))
    assert states == ["miss", "hit"]
    (sent,) = chat_requests(upstream)
    assert "caching" not in sent.json() and not sent.chunked
    assert sent.header("content-length") == str(len(sent.body))


# ------------------------------------------------------------------ cache off, broken answers


def test_with_the_cache_off_the_body_member_is_forwarded_untouched(
    gateway_factory, upstream, tmp_path
):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, cache_mode="off"))
    sent = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "caching": 5}'
    r = post(gw, sent)
    assert r.status_code == 200 and HEADER not in r.headers
    assert [f.body for f in chat_requests(upstream)] == [sent]


def test_with_the_cache_off_the_header_is_forwarded_untouched(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, cache_mode="off"))
    assert post(gw, body_of(), **{HEADER: "on"}).status_code == 200
    (sent,) = chat_requests(upstream)
    assert sent.header(HEADER) == "on"


def test_an_answer_shorter_than_its_length_is_not_stored(gateway_factory, upstream, tmp_path):
    short = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n"
        b'{"object":"chat.completion","choices":['
    )
    upstream.script("POST", CHAT, Reply(raw=short))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    for _ in range(2):
        with RawConn(gw.port) as c:
            c.send(request("POST", CHAT, AUTH, body_of()))
            resp = c.read_response("POST", timeout=10, allow_incomplete=True)
        assert resp.header(HEADER) == "miss" and not resp.complete
    assert len(chat_requests(upstream)) == 2
