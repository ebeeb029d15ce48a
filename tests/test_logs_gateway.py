"""Access log, conversation log, export and /metrics, through a real gateway and real clients."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import metricscrape
import openai
import pytest
from conftest import assert_no_secret, free_port, run_cli
from fakeupstream import Reply, sse
from metricscrape import total

CHAT = "/v1/chat/completions"
FK_ALICE = "fk-alice-0123456789abcdefghijklmnopqrstuv"
UPSTREAM_KEY = "sk-UPK7x9Q2mZr4Lw8Vb3Nc6Ty1Hq5Jd0"
ADMIN = "admin-token-5e4d3c2b1a09f8e7d6c5"
MESSAGES = [{"role": "user", "content": "hello there"}]


def write_config(tmp_path: Path, url: str, **top: Any) -> list[str]:
    doc = {
        "upstreams": [{"name": "openai", "base_url": url, "api_key": UPSTREAM_KEY}],
        "forward_keys": [{"name": "alice", "key": FK_ALICE}],
        "log_flush_interval": 0.05,
        **top,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))
    return ["--config", str(path)]


def wait_lines(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The file's JSON lines once there are at least ``n`` (a separate process: polled)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=FK_ALICE, max_retries=0, timeout=10)


ACCESS_FIELDS = {
    "time", "request_id", "client_ip", "method", "path", "route", "status", "key_id",
    "key_name", "upstream", "upstream_key", "model", "stream", "ttfb_ms", "duration_ms",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "estimated",
    "cost", "cache", "client_closed", "error_code",
}  # fmt: skip


def test_access_log_has_a_line_for_every_way_a_request_ends(gateway_factory, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = {
        "access_log": str(log_path),
        "forward_keys": [{"name": "alice", "key": FK_ALICE, "limits": {"rpm": 4}}],
    }
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    client = sdk(gw)
    # 1. a success
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # 2. an upstream error
    upstream.script("POST", "/v1/embeddings", Reply(status=500, body=b'{"error":{}}'))
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    # 3. an unknown key, in the query: refused before routing, and never written down
    r = httpx.post(gw.url + CHAT + "?api-key=fk-nobody-0123456789abcdefghijklmnop", json={})
    assert r.status_code == 401
    # 4. a client that leaves mid-stream
    gate = threading.Event()
    chunks = sse([{"choices": [{"index": 0, "delta": {"content": "hi"}}]}])
    upstream.script("POST", CHAT, Reply(headers=[("content-type", "text/event-stream")],
                                        chunks=chunks[:1], end="stall", gate=None))  # fmt: skip
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw.url + CHAT, json=body, headers=headers, timeout=10) as s:
        next(s.iter_raw())  # the first event arrived; now leave
    gate.set()
    upstream.reset()
    # 5. and 6.: the fourth request of the minute passes, the fifth is refused
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited_error:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    lines = wait_lines(log_path, 6)
    assert len(lines) == 6, "\n".join(json.dumps(x) for x in lines)
    for line in lines:
        assert set(line) == ACCESS_FIELDS
    by_status: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_status.setdefault(line["status"], []).append(line)
    ok = next(x for x in by_status[200] if not x["stream"])
    assert ok["key_name"] == "alice" and ok["upstream"] == "openai" and ok["route"] == "/"
    assert ok["model"] and ok["prompt_tokens"] > 0 and ok["completion_tokens"] > 0
    assert ok["method"] == "POST" and ok["path"] == CHAT and ok["ttfb_ms"] > 0
    assert ok["upstream_key"].startswith("key-") and ok["time"].endswith("Z")
    failed = by_status[500][0]
    assert failed["upstream"] == "openai" and failed["path"] == "/v1/embeddings"
    assert failed["model"] == "text-embedding-3-small"  # the request's: no answer named one
    refused = by_status[401][0]
    assert refused["error_code"] == "invalid_api_key" and refused["key_id"] is None
    assert refused["path"] == CHAT and refused["client_ip"] == "127.0.0.1"
    left = next(x for x in by_status[200] if x["stream"])
    assert left["client_closed"] is True and left["error_code"] == "client_closed"
    limited = by_status[429][0]
    assert limited["error_code"] == "rate_limit_exceeded" and limited["key_name"] == "alice"
    assert limited["model"] == "gpt-4o"
    # a client's report of an error names the line: the same id in x-request-id
    assert limited_error.value.response.headers["x-request-id"] == limited["request_id"]
    assert r.headers["x-request-id"] == refused["request_id"]
    assert len({x["request_id"] for x in lines}) == 6
    text = log_path.read_text()
    assert_no_secret(text, gw.output(), secret=FK_ALICE)
    assert_no_secret(text, gw.output(), secret=UPSTREAM_KEY)
    assert "fk-nobody" not in text


def test_streams_are_marked_even_when_no_body_is_read(gateway_factory, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = {"access_log": str(log_path), "usage": False}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    list(sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    (line,) = wait_lines(log_path, 1)
    assert line["stream"] is True and line["status"] == 200


def test_console_format_for_a_terminal(gateway_factory, upstream, tmp_path):
    cfg = {"access_log": "stdout", "access_log_format": "console"}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    deadline = time.monotonic() + 10
    while " 200 POST /v1/chat/completions key=alice" not in gw.output():
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.02)
    line = next(x for x in gw.output().splitlines() if " 200 POST " in x)
    assert "-> openai" in line and "tokens=" in line and "ms" in line


def test_access_log_to_stdout_and_a_file_at_once(gateway_factory, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = {"access_log": f"stdout, {log_path}"}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    (line,) = wait_lines(log_path, 1)
    deadline = time.monotonic() + 10
    while line["request_id"] not in gw.output():
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.02)
    shown = next(x for x in gw.output().splitlines() if line["request_id"] in x)
    assert json.loads(shown) == line  # not a terminal: JSON on stdout too


def test_control_characters_cannot_forge_a_line(gateway_factory, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, access_log=str(log_path))
    )
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    body = {"model": 'gpt\n{"status":200,"forged":true}\r\x1b[2J', "messages": MESSAGES}
    httpx.post(gw.url + CHAT, json=body, headers=headers, timeout=10)
    lines = wait_lines(log_path, 1)
    assert len(lines) == 1 and "forged" not in lines[0]
    assert lines[0]["model"] == body["model"]


TOOL_CALLS = [
    {"index": 0, "id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": ""}},
    {"index": 1, "id": "call_b", "type": "function",
     "function": {"name": "get_time", "arguments": ""}},
]  # fmt: skip


def tool_stream() -> list[bytes]:
    """A stream that calls two tools at once, their arguments in many small pieces."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    first = {"role": "assistant", "tool_calls": TOOL_CALLS}
    events: list[dict[str, Any] | str] = [{**base, "choices": [{"index": 0, "delta": first}]}]
    for piece in ['{"ci', 'ty": "Par', 'is"}']:
        call = {"index": 0, "function": {"arguments": piece}}
        events.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    for piece in ['{"tz"', ': "CET"}']:
        call = {"index": 1, "function": {"arguments": piece}}
        events.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12}})
    return sse(events)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize(
    "last, usage_asked",
    [
        ([b"data: [DONE]\n\n"], False),
        # the final event split over two reads (0.05 s apart): in the gateway's strip mode
        # (it asked for the usage itself) a partial line is held, a finished one is not
        ([b"data: [DONE]\n", b"\n"], False),
        ([b"data: [DO", b"NE]\n\n"], True),  # the client asked: every piece passes as it is
    ],
    ids=["one-piece", "blank-line-apart", "split-mid-line"],
)
def test_a_client_that_hangs_up_after_done_got_the_whole_answer(
    gateway_factory, upstream, tmp_path, last, usage_asked
):
    # The openai SDKs close the response as soon as they read "data: [DONE]"; an upstream's
    # last chunk terminator can come later. Here it never comes ("stall"), so the SDK always
    # hangs up first: the answer is still complete, not a client disconnect.
    conv, access = tmp_path / "conversations.jsonl", tmp_path / "access.jsonl"
    chunks = tool_stream()[:-1] + last
    delay = 0.05 if len(last) > 1 else 0.0
    head = [("content-type", "text/event-stream")]
    reply = Reply(headers=head, chunks=chunks, chunk_delay=delay, end="stall")
    upstream.script("POST", CHAT, reply)
    cfg = {"conversation_log": str(conv), "access_log": str(access)}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage_asked else {}
    stream = sdk(gw).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=TOOLS, stream=True, **options
    )
    received = [chunk for chunk in stream if chunk.choices]  # (not the usage chunk)
    assert received[-1].choices[0].finish_reason == "tool_calls"

    (line,) = wait_lines(access, 1)
    assert (line["status"], line["client_closed"], line["error_code"]) == (200, False, None)
    assert (line["prompt_tokens"], line["completion_tokens"], line["estimated"]) == (30, 12, False)
    (record,) = wait_lines(conv, 1)
    assert record["reply"]["truncated"] is False
    assert record["reply"]["choices"][0]["finish_reason"] == "tool_calls"
    out = tmp_path / "train.jsonl"
    done = run_cli("logs", "export", "--file", str(conv), "--output", str(out))
    assert "exported 1 of 1" in done.stderr, done.stderr


def test_a_streamed_conversation_with_tool_calls_is_logged_and_exported(
    gateway_factory, upstream, tmp_path
):
    conv = tmp_path / "conversations.jsonl"
    upstream.script(
        "POST", CHAT, Reply(headers=[("content-type", "text/event-stream")], chunks=tool_stream())
    )
    cfg = {"conversation_log": str(conv), "access_log": "off", "conversation_keys": ["alice"]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
    ]
    stream = sdk(gw).chat.completions.create(
        model="gpt-4o", messages=messages, tools=TOOLS, stream=True
    )
    received = [chunk for chunk in stream]
    assert received[-1].choices[0].finish_reason == "tool_calls"

    (record,) = wait_lines(conv, 1)
    assert record["request"]["messages"] == messages and record["key_name"] == "alice"
    for secret in (UPSTREAM_KEY, FK_ALICE):
        assert_no_secret(conv.read_text(), gw.output(), secret=secret)
    choice = record["reply"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_time", '{"tz": "CET"}'),
    ]
    assert record["prompt_tokens"] == 30 and record["estimated"] is False

    out = tmp_path / "train.jsonl"
    done = run_cli("logs", "export", "--file", str(conv), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 1 of 1" in done.stderr
    (line,) = out.read_text().splitlines()
    example = json.loads(line)
    assert example["messages"][:2] == messages
    assistant = example["messages"][2]
    assert assistant["role"] == "assistant" and len(assistant["tool_calls"]) == 2
    assert example["tools"] == TOOLS
    assert (out.stat().st_mode & 0o777) == 0o600


def test_conversations_of_keys_not_opted_in_are_not_logged(gateway_factory, upstream, tmp_path):
    conv = tmp_path / "conversations.jsonl"
    access = tmp_path / "access.log"
    cfg = {"conversation_log": str(conv), "access_log": str(access), "conversation_keys": ["bob"]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(wait_lines(access, 1)) == 1  # the request has ended and was logged
    assert not conv.exists() or conv.read_text() == ""


def test_every_kind_of_answer_gets_the_reply_the_docs_promise(gateway_factory, upstream, tmp_path):
    """Whoever keeps the answer's pieces (the usage observer, or the relay for a compressed
    answer), the record holds: the answer itself, the reply read from a gzip answer, null
    for an error, ``{"truncated": true}`` past conversation_max_bytes, and a truncated
    stream's reply as a prefix."""
    import gzip

    conv = tmp_path / "conversations.jsonl"
    cfg = {"conversation_log": str(conv), "access_log": "off", "conversation_max_bytes": 4000}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    json_head = [("content-type", "application/json")]

    def answer(text: str) -> bytes:
        return json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            },
            indent=1,  # line breaks in it: the record still holds one line
        ).encode()

    def chunk(text: str) -> dict[str, Any]:
        return {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": text}}]}

    zipped = [*json_head, ("content-encoding", "gzip")]
    error = b'{"error":{"message":"no","type":"invalid_request_error"}}'
    event_stream = [("content-type", "text/event-stream")]
    cases: list[tuple[Reply, bool]] = [
        (Reply(headers=json_head, body=answer("plain")), False),
        (Reply(headers=zipped, body=gzip.compress(answer("zipped"))), False),
        (Reply(status=400, headers=json_head, body=error), False),
        (Reply(headers=json_head, body=answer("x" * 5000)), False),
        (Reply(headers=event_stream, chunks=sse([chunk("y" * 500)] * 12)), True),
    ]
    auth = {"authorization": f"Bearer {FK_ALICE}"}
    with httpx.Client(base_url=gw.url, headers=auth, timeout=10) as client:
        for n, (reply, stream) in enumerate(cases):
            upstream.script("POST", CHAT, reply)
            body: dict[str, Any] = {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": f"case {n}"}],
            }
            if stream:
                body["stream"] = True
            client.post(CHAT, json=body).read()
            wait_lines(conv, n + 1)
    replies = {r["request"]["messages"][0]["content"]: r["reply"] for r in wait_lines(conv, 5)}
    assert replies["case 0"] == json.loads(answer("plain"))
    assert replies["case 1"]["choices"][0]["message"]["content"] == "zipped"
    assert replies["case 2"] is None
    assert replies["case 3"] == {"truncated": True}
    streamed = replies["case 4"]
    assert streamed["truncated"] is True
    text = streamed["choices"][0]["message"]["content"]
    assert 0 < len(text) < 4000 and set(text) == {"y"}


def scrape(url: str, token: str | None = ADMIN) -> dict[str, float]:
    return metricscrape.scrape(url, token)


def test_metrics_add_up_across_two_workers(gateway_factory, upstream, tmp_path):
    cfg = {
        "metrics": True,
        "admin_token": ADMIN,
        "forward_keys": [{"name": "alice", "key": FK_ALICE, "limits": {"rpm": 30}}],
    }
    gw = gateway_factory(upstream.url, workers=2, args=write_config(tmp_path, upstream.url, **cfg))
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 401
    wrong = httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and ADMIN not in wrong.text
    client = sdk(gw)
    for _ in range(30):  # new connections: both workers take some
        with httpx.Client() as fresh:
            r = fresh.post(
                gw.url + CHAT,
                json={"model": "gpt-4o", "messages": MESSAGES},
                headers={"authorization": f"Bearer {FK_ALICE}"},
            )
            assert r.status_code == 200
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    deadline = time.monotonic() + 10
    while True:  # each worker hands its counts over once a second: wait for both's
        values = scrape(gw.url + "/metrics")
        done = total(values, "openai_forward_requests_total", status="200")
        refused = total(values, "openai_forward_requests_total", status="429")
        if (done, refused) == (30, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done == 30
    assert total(values, "openai_forward_requests_total", status="429") == 1
    assert total(values, "openai_forward_limit_rejections_total", scope="key") == 1
    assert total(values, "openai_forward_request_duration_seconds_count", upstream="openai") == 30
    assert total(values, "openai_forward_tokens_total", direction="prompt") > 0
    assert total(values, "openai_forward_requests_in_flight") == 0
    key_states = [k for k in values if k.startswith("openai_forward_upstream_key_state{")]
    assert key_states and all("key_id=key-" in k for k in key_states)
    assert_no_secret(json.dumps(values), secret=UPSTREAM_KEY)
    assert_no_secret(json.dumps(values), secret=FK_ALICE)


def test_metrics_on_their_own_address_need_no_token(gateway_factory, upstream, tmp_path):
    port = free_port()
    cfg = {"metrics": True, "metrics_listen": f"127.0.0.1:{port}"}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    deadline = time.monotonic() + 10
    while True:
        values = scrape(f"http://127.0.0.1:{port}/metrics", token=None)
        if total(values, "openai_forward_requests_total") == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total(values, "openai_forward_requests_total", route="/", upstream="openai") == 1
    other = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert other.status_code == 404
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # still listening after a bad request


def test_metrics_need_a_token_or_their_own_address(tmp_path):
    done = run_cli("check", env={"OPENAI_FORWARD_METRICS": "true"})
    assert done.returncode == 2
    assert "admin_token" in done.stderr and "metrics_listen" in done.stderr


def test_startup_banner_is_structured_and_masked(gateway_factory, upstream, tmp_path):
    conv = tmp_path / "conversations.jsonl"
    cfg = {"metrics": True, "admin_token": ADMIN, "conversation_log": str(conv)}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    line = next(x for x in gw.output().splitlines() if " startup {" in x)
    record = json.loads(line.split(" startup ", 1)[1])
    (route,) = record["routes"]
    assert route["upstream"] == "openai" and route["keys"][0].startswith("key-")
    assert record["forward_keys"]["in_config"] == ["cfg_alice"]
    assert record["logs"]["conversations"] == str(conv)
    assert record["metrics"] == "/metrics (admin token)"
    for secret in (UPSTREAM_KEY, FK_ALICE, ADMIN):
        assert_no_secret(gw.output(), secret=secret)
    assert record["logs"]["access"] == ["stdout"]


@pytest.mark.parametrize(
    ("settings", "secret"),
    [
        ({"state": "redis://127.0.0.1:1/0?password=STATE-pw-secret"}, "STATE-pw-secret"),
        ({"state": "unix:///run/redis.sock?db=2&PassWord=SOCK-pw-secret"}, "SOCK-pw-secret"),
        ({"state": "rediss://user:USER-pw-secret@redis.internal/0"}, "USER-pw-secret"),
        (
            {"cache_mode": "on", "cache_store": "unix:///tmp/r.sock?password=CACHE-pw-secret"},
            "CACHE-pw-secret",
        ),
    ],
)
def test_the_banner_masks_a_password_in_a_store_urls_query(settings, secret):
    from openai_forward.banner import banner
    from openai_forward.config import load

    record = json.dumps(banner(load({}, None, settings), "127.0.0.1", 8000))
    assert secret not in record
    assert "***" in record


def test_the_banner_says_null_for_logs_that_are_off_and_brackets_an_ipv6_address():
    from openai_forward.banner import banner
    from openai_forward.config import load

    config = load({}, None, {"access_log": "off", "conversation_log": "off"})
    record = banner(config, "::1", 8000)
    assert record["logs"]["access"] is None and record["logs"]["conversations"] is None
    assert record["listen"] == "http://[::1]:8000"
    assert banner(config, "0.0.0.0", 80)["listen"] == "http://0.0.0.0:80"


def test_a_chunked_body_past_the_limit_is_logged_as_the_413_the_client_got(
    gateway_factory, upstream, tmp_path
):
    """A chunked body's size is known only as it arrives, after the request was routed and
    its upstream request begun: the client gets 413, and the log says so (not 499)."""
    log_path = tmp_path / "access.log"
    cfg = {"access_log": str(log_path), "max_body_size": 1000}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]})

    def pieces():
        data = body.encode()
        for at in range(0, len(data), 512):
            yield data[at : at + 512]

    headers = {"authorization": f"Bearer {FK_ALICE}", "content-type": "application/json"}
    r = httpx.post(gw.url + CHAT, content=pieces(), headers=headers, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    (line,) = wait_lines(log_path, 1)
    assert (line["status"], line["error_code"]) == (413, "request_too_large")
    assert line["client_closed"] is False and line["key_name"] == "alice"
    assert line["request_id"] == r.headers["x-request-id"]
    # the connection is fine for the next request: a new one, and it is logged too
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert [x["status"] for x in wait_lines(log_path, 2)] == [413, 200]
