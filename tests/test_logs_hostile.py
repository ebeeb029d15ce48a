"""Access log, conversation log and /metrics under hostile conditions, through a real gateway:
huge and invalid bodies, clients that leave, SIGTERM under load, a log file moved away,
scrapes during load, and label values a client controls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import metricscrape
import pytest
from conftest import assert_no_secret
from fakeupstream import Reply, sse
from metricscrape import total
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import RawConn, request

CHAT = "/v1/chat/completions"
FK_ALICE = "fk-alice-0123456789abcdefghijklmnopqrstuv"
UPSTREAM_KEY = "sk-UPK7x9Q2mZr4Lw8Vb3Nc6Ty1Hq5Jd0"
ADMIN = "admin-token-5e4d3c2b1a09f8e7d6c5"
MESSAGES = [{"role": "user", "content": "hello there"}]
AUTH = [("Authorization", f"Bearer {FK_ALICE}"), ("Content-Type", "application/json")]
SSE_HEAD = [("content-type", "text/event-stream")]


def write_config(tmp_path: Path, url: str, **top: Any) -> list[str]:
    doc = {
        "upstreams": [{"name": "openai", "base_url": url, "api_key": UPSTREAM_KEY}],
        "forward_keys": [{"name": "alice", "key": FK_ALICE}],
        "log_flush_interval": 0.05,
        "usage_flush_interval": 0.05,
        **top,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))
    return ["--config", str(path)]


def read_lines(path: Path) -> list[bytes]:
    """The file's whole lines, split on LF only (JSON lines: a U+2028 in a string is not a
    line end, as ``str.splitlines`` would take it)."""
    if not path.exists():
        return []
    return path.read_bytes().split(b"\n")[:-1]


def wait_lines(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The file's JSON lines once there are at least ``n`` (another process: polled)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_lines(path)
        if len(lines) >= n or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def post(gw: Any, body: Any, timeout: float = 10) -> httpx.Response:
    h = {"authorization": f"Bearer {FK_ALICE}"}
    if isinstance(body, bytes):
        return httpx.post(gw.url + CHAT, content=body, headers=h, timeout=timeout)
    return httpx.post(gw.url + CHAT, json=body, headers=h, timeout=timeout)


# ------------------------------------------------------------------ bodies


def test_a_20mb_body_is_logged_within_bounds(gateway_factory, upstream, tmp_path):
    conv, access = tmp_path / "conv.jsonl", tmp_path / "access.log"
    cfg = {"conversation_log": str(conv), "access_log": str(access)}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    big = "y" * (20 * 1024 * 1024)
    r = post(gw, {"model": "gpt-4o", "messages": [{"role": "user", "content": big}]}, timeout=60)
    assert r.status_code == 200 and len(r.content) > len(big)  # the fake echoes it: 20 MB back
    (line,) = wait_lines(access, 1, timeout=30)
    assert line["status"] == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a 20 MB record: wait until its line is whole
        if conv.exists() and conv.stat().st_size and conv.read_bytes().endswith(b"\n"):
            break
        time.sleep(0.05)
    (record,) = [json.loads(x) for x in read_lines(conv)]
    assert len(record["request"]["messages"][0]["content"]) == len(big)
    assert record["reply"] == {"truncated": True}
    assert "Traceback" not in gw.output()


def test_invalid_utf8_and_odd_bytes_keep_every_line_valid_json(gateway_factory, upstream, tmp_path):
    access = tmp_path / "access.log"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, access_log=str(access))
    )
    bodies = [
        b'{"model":"gpt\xff\xfe","messages":[]}',
        b'{"model":"\xc0\xaf\xed\xa0\x80","messages":[]}',  # overlong, encoded surrogate
        b'{"model":"a\\u0000\\u001b[2J\\u2028b","messages":[]}',
    ]
    sent = 0
    for body in bodies:
        post(gw, body)
        sent += 1
    targets = [b"/v1/chat/completions\xff", b"/v1/%ff%fe", b"/v1/%ed%a0%80/x", b"/\x1b[2J"]
    for target in targets:
        with RawConn(gw.port) as c:
            c.send(request("POST", target.decode("latin-1"), AUTH, b"{}"))
            # no answer at all is also a way to refuse it; the line still counts
            with contextlib.suppress(AssertionError):
                c.read_response("POST", allow_incomplete=True)
        sent += 1
    lines = wait_lines(access, sent)
    raw = access.read_bytes()
    raw.decode("utf-8")  # the whole file is valid UTF-8
    assert len(lines) >= len(bodies), raw[-2000:]
    assert all(isinstance(x, dict) and "status" in x for x in lines)
    assert "Traceback" not in gw.output()


# ------------------------------------------------------------------ a client that leaves


def test_a_client_leaving_mid_stream_still_gets_a_conversation_record(
    gateway_factory, upstream, tmp_path
):
    conv, access = tmp_path / "conv.jsonl", tmp_path / "access.log"
    chunks = sse([{"choices": [{"index": 0, "delta": {"content": f"part{i} "}}]} for i in range(3)])
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=chunks[:2], end="stall"))
    cfg = {"conversation_log": str(conv), "access_log": str(access)}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}).encode()
    with RawConn(gw.port) as c:
        c.send(request("POST", CHAT, AUTH, body))
        resp = c.read_head("POST")
        c.read_until(resp, b"part1")
        c.abort()
    (line,) = wait_lines(access, 1)
    assert line["client_closed"] is True and line["status"] == 200
    (record,) = wait_lines(conv, 1)
    assert record["error_code"] == "client_closed" and record["client_closed"] is True
    choice = record["reply"]["choices"][0]
    assert choice["finish_reason"] is None
    assert choice["message"]["content"].startswith("part0 part1")
    assert "Traceback" not in gw.output()


# ------------------------------------------------------------------ stopping and files


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_writes_a_line_per_answer(gateway_factory, upstream, tmp_path, workers):
    access = tmp_path / "access.log"
    upstream.script(
        "POST",
        CHAT,
        Reply(headers=[("content-type", "application/json")], body=b"{}", headers_delay=0.5),
    )
    cfg = {"access_log": str(access), "log_flush_interval": 5.0, "shutdown_timeout": 10}
    gw = gateway_factory(
        upstream.url, workers=workers, args=write_config(tmp_path, upstream.url, **cfg)
    )
    answers: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        try:  # a client per request: new connections, spread over the workers
            r = post(gw, {"model": "gpt-4o", "messages": MESSAGES}, timeout=15)
        except httpx.HTTPError:
            return
        with lock:
            answers.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    upstream.wait_for_requests(20)
    gw.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert gw.proc.wait(20) == 0
    lines = [json.loads(x) for x in read_lines(access)]
    assert len(answers) == 20 and set(answers) == {200}
    assert len(lines) == len(answers)
    assert "Traceback" not in gw.output()


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_a_log_moved_away_is_reopened(gateway_factory, upstream, tmp_path, how):
    access = tmp_path / "access.log"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, access_log=str(access))
    )
    assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    assert len(wait_lines(access, 1)) == 1
    if how == "unlink":
        access.unlink()
    else:
        access.rename(tmp_path / "access.log.1")
    for _ in range(3):
        assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    lines = wait_lines(access, 3)
    assert len(lines) == 3
    if how == "rename":
        assert len(read_lines(tmp_path / "access.log.1")) == 1
    assert gw.proc.poll() is None and "Traceback" not in gw.output()


def test_a_log_directory_that_vanishes_drops_lines_without_crashing(
    gateway_factory, upstream, tmp_path
):
    logs = tmp_path / "logs"
    logs.mkdir()
    access = logs / "access.log"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, access_log=str(access))
    )
    assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    wait_lines(access, 1)
    for f in logs.iterdir():
        f.unlink()
    logs.rmdir()
    for _ in range(3):
        assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    deadline = time.monotonic() + 5
    while "cannot write" not in gw.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cannot write" in gw.output()
    logs.mkdir()
    assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    assert len(wait_lines(access, 1)) >= 1
    assert gw.proc.poll() is None and "Traceback" not in gw.output()


# ------------------------------------------------------------------ metrics


def scrape(url: str) -> dict[str, float]:
    return metricscrape.scrape(url + "/metrics", ADMIN)


def series(values: dict[str, float], prefix: str) -> list[str]:
    return [k for k in values if k.startswith(prefix + "{")]


METRICS = {"metrics": True, "admin_token": ADMIN, "access_log": "off"}


def test_scrapes_during_load_all_answer(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **METRICS))
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    body = {"model": "gpt-4o", "messages": MESSAGES}
    scrape_headers = {"authorization": f"Bearer {ADMIN}"}

    async def run() -> tuple[list[int], list[str]]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=60)) as c:
            work = [c.post(gw.url + CHAT, json=body, headers=headers) for _ in range(100)]
            scrapes = [c.get(gw.url + "/metrics", headers=scrape_headers) for _ in range(30)]
            done = await asyncio.gather(*work, *scrapes)
        return [r.status_code for r in done], [r.text for r in done[100:]]

    statuses, texts = asyncio.run(run())
    assert set(statuses) == {200}
    for text in texts:
        list(text_string_to_metric_families(text))  # every scrape parses
    values = scrape(gw.url)
    assert total(values, "openai_forward_requests_total", status="200") == 100
    assert total(values, "openai_forward_requests_in_flight") == 0
    assert_no_secret(json.dumps(values), secret=FK_ALICE)
    assert_no_secret(json.dumps(values), secret=ADMIN)


def test_unknown_paths_and_models_do_not_grow_the_series(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **METRICS))
    headers = {"authorization": f"Bearer {FK_ALICE}"}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=20)) as c:
            sem = asyncio.Semaphore(20)

            async def go(method: str, url: str, **kw: Any) -> None:
                async with sem:
                    await c.request(method, url, **kw)

            jobs = [go("GET", f"{gw.url}/x{secrets.token_hex(8)}") for _ in range(250)]
            jobs += [go("GET", f"{gw.url}/v1/{secrets.token_hex(8)}", headers=headers)
                     for _ in range(250)]  # fmt: skip
            jobs += [go("POST", gw.url + CHAT, headers=headers,
                        json={"model": "m-" + secrets.token_hex(8), "messages": MESSAGES})
                     for _ in range(300)]  # fmt: skip
            await asyncio.gather(*jobs)

    asyncio.run(run())
    values = scrape(gw.url)
    requests = series(values, "openai_forward_requests_total")
    assert total(values, "openai_forward_requests_total") == 800
    models = {k.split("model=", 1)[1].split(",", 1)[0] for k in requests}
    assert len(models) <= 202, len(models)
    assert len(requests) <= 220, len(requests)
    tokens = series(values, "openai_forward_tokens_total")
    assert len(tokens) <= 2 * 202


def test_a_replayed_stream_leaves_no_stream_in_flight(gateway_factory, upstream, tmp_path):
    chunks = sse([{"choices": [{"index": 0, "delta": {"content": "hi"}}]}])
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=chunks))
    cfg = {**METRICS, "cache_mode": "on"}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    states = [post(gw, body).headers["x-openai-forward-cache"] for _ in range(3)]
    assert states == ["miss", "hit", "hit"]
    values = scrape(gw.url)
    assert total(values, "openai_forward_cache_requests_total", result="hit") == 2
    assert total(values, "openai_forward_requests_in_flight") == 0
    assert total(values, "openai_forward_streams_in_flight") == 0


def test_metrics_scrape_with_odd_methods_and_tokens(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **METRICS))
    cases = [
        ("POST", [("Authorization", f"Bearer {ADMIN}")], 405),
        ("GET", [("Authorization", f"bearer {ADMIN}  ")], 200),
        ("GET", [("Authorization", f"Bearer {ADMIN[:-1]}")], 401),
        ("GET", [("Authorization", "Bearer " + "\u00e9".encode().decode("latin-1"))], 401),
        ("HEAD", [("Authorization", f"Bearer {ADMIN}")], 200),
    ]
    for method, headers, status in cases:
        with RawConn(gw.port) as c:
            c.send(request(method, "/metrics", headers))
            resp = c.read_response(method)
        assert resp.status == status, (method, headers, resp.body[:200])
        if method == "HEAD":
            assert resp.body == b""
        assert ADMIN not in resp.body.decode("latin-1")
    assert gw.proc.poll() is None and "Traceback" not in gw.output()


# ------------------------------------------------------------------ a model name JSON allows


def lone_surrogate_answer() -> Reply:
    """A 200 whose `model` is a lone surrogate escape: valid JSON text (RFC 8259 allows the
    escape), and what an OpenAI-compatible upstream does when it echoes the model asked for."""
    body = (
        b'{"id":"c1","object":"chat.completion","model":"\\ud800","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}'
    )
    return Reply(headers=[("content-type", "application/json")], body=body)


def test_an_answer_naming_a_lone_surrogate_model_keeps_the_access_log(
    gateway_factory, upstream, tmp_path
):
    access = tmp_path / "access.log"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, access_log=str(access))
    )
    upstream.script("POST", CHAT, lone_surrogate_answer())
    assert post(gw, {"model": "x", "messages": MESSAGES}).status_code == 200
    upstream.reset()
    for _ in range(3):
        assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    lines = wait_lines(access, 4, timeout=5)
    assert len(lines) == 4
    assert gw.stop() == 0 and "Traceback" not in gw.output()


def test_an_answer_naming_a_lone_surrogate_model_keeps_the_metrics(
    gateway_factory, upstream, tmp_path
):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **METRICS))
    upstream.script("POST", CHAT, lone_surrogate_answer())
    assert post(gw, {"model": "x", "messages": MESSAGES}).status_code == 200
    values = scrape(gw.url)
    assert total(values, "openai_forward_requests_total") == 1


def test_an_answer_naming_a_lone_surrogate_model_keeps_its_usage_row(
    gateway_factory, upstream, tmp_path
):
    from usagedb import wait_rows

    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, access_log="off"))
    upstream.script("POST", CHAT, lone_surrogate_answer())
    assert post(gw, {"model": "x", "messages": MESSAGES}).status_code == 200
    upstream.reset()
    assert post(gw, {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200
    assert gw.stop() == 0
    assert len(wait_rows(gw.database, 2, timeout=2)) == 2


# ------------------------------------------------------------------ rotation and hits


def test_two_workers_rotating_a_small_log_lose_and_split_no_line(
    gateway_factory, upstream, tmp_path
):
    access = tmp_path / "access.log"
    cfg = {"access_log": str(access), "log_max_bytes": 3000, "log_backups": 200}
    gw = gateway_factory(upstream.url, workers=2, args=write_config(tmp_path, upstream.url, **cfg))
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    body = {"model": "gpt-4o", "messages": MESSAGES}

    async def run() -> list[int]:
        async def one() -> int:
            async with httpx.AsyncClient(timeout=20) as c:  # a new connection: both workers
                return (await c.post(gw.url + CHAT, json=body, headers=headers)).status_code

        sem = asyncio.Semaphore(20)

        async def bounded() -> int:
            async with sem:
                return await one()

        return await asyncio.gather(*(bounded() for _ in range(200)))

    assert set(asyncio.run(run())) == {200}
    assert gw.stop() == 0
    files = [access, *tmp_path.glob("access.log.[0-9]*")]
    ids = []
    for f in files:
        data = f.read_bytes()
        assert not data or data.endswith(b"\n"), f
        for line in data.split(b"\n")[:-1]:
            ids.append(json.loads(line)["request_id"])
    assert len(ids) == 200 and len(set(ids)) == 200
    assert len(files) > 5  # it did rotate, many times


def test_a_replayed_stream_is_logged_as_a_stream_hit(gateway_factory, upstream, tmp_path):
    access, conv = tmp_path / "access.log", tmp_path / "conv.jsonl"
    chunks = sse([{"choices": [{"index": 0, "delta": {"content": "hi"}}]}])
    upstream.script("POST", CHAT, Reply(headers=SSE_HEAD, chunks=chunks))
    cfg = {"cache_mode": "on", "access_log": str(access), "conversation_log": str(conv)}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    assert [post(gw, body).headers["x-openai-forward-cache"] for _ in range(2)] == ["miss", "hit"]
    miss, hit = wait_lines(access, 2)
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert hit["stream"] is True and hit["status"] == 200 and hit["ttfb_ms"] is None
    assert hit["prompt_tokens"] == miss["prompt_tokens"]
    assert len(wait_lines(conv, 1)) == 1  # the hit had no upstream answer: no record
