"""Usage accounting end to end: a real gateway, the openai SDK, the fake upstream, and the
usage rows read back from the gateway's SQLite file."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import DEFAULT_API_KEY, assert_no_secret, run_cli
from fakeupstream import Reply, sse
from usagedb import rows, wait_rows

FAST = {"OPENAI_FORWARD_USAGE_FLUSH_INTERVAL": "0.05"}
MESSAGES = [{"role": "user", "content": "tell me about the weather in four words"}]
PROMPT_WORDS = 8  # the fake upstream counts a prompt token per word of the last user message


@pytest.fixture
def gw(gateway_factory, upstream):
    return gateway_factory(upstream.url, env=FAST)


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=DEFAULT_API_KEY, max_retries=0)


def _normal(data: bytes) -> bytes:
    """An SSE body with the per-request id and timestamp blanked, to compare two answers."""
    data = re.sub(rb'"id":"[^"]*"', b'"id":"x"', data)
    return re.sub(rb'"created":\d+', b'"created":0', data)


def test_a_chat_completion_is_recorded_with_the_upstreams_usage(gw, upstream):
    reply = sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    (row,) = wait_rows(gw.database, 1)
    assert reply.usage is not None
    assert row["prompt_tokens"] == reply.usage.prompt_tokens == PROMPT_WORDS
    assert row["completion_tokens"] == reply.usage.completion_tokens
    assert row["model"] == "gpt-4o"
    assert row["status"] == 200 and row["error_code"] is None
    assert row["stream"] == 0 and row["estimated"] == 0 and row["client_closed"] == 0
    assert row["path"] == "/v1/chat/completions" and row["upstream"] == "default"
    assert row["ttfb_ms"] is not None and 0 <= row["ttfb_ms"] <= row["duration_ms"]


def test_a_stream_is_counted_and_the_client_sees_no_extra_chunk(gw, upstream):
    stream = sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the usage-only chunk (choices: []) never arrives
    (sent,) = upstream.requests
    assert sent.json()["stream_options"] == {"include_usage": True}  # asked for by the gateway
    (row,) = wait_rows(gw.database, 1)
    assert row["stream"] == 1 and row["estimated"] == 0
    assert row["prompt_tokens"] == PROMPT_WORDS
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert row["completion_tokens"] == len(text.split())


def test_the_relayed_stream_is_byte_for_byte_what_the_client_would_have_seen(gw, upstream):
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {DEFAULT_API_KEY}"}
    with httpx.Client(timeout=10) as client:
        direct = client.post(upstream.url + "/v1/chat/completions", json=body, headers=headers)
        via = client.post(gw.url + "/v1/chat/completions", json=body)
    assert b'"usage"' not in direct.content  # the client did not ask for usage...
    assert _normal(via.content) == _normal(direct.content)  # ...and gets none, nothing else
    assert wait_rows(gw.database, 1)[0]["completion_tokens"] > 0


def test_a_client_that_asks_for_stream_usage_gets_it_unchanged(gw, upstream):
    stream = sdk(gw).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    (row,) = wait_rows(gw.database, 1)
    assert row["prompt_tokens"] == chunks[-1].usage.prompt_tokens
    assert row["completion_tokens"] == chunks[-1].usage.completion_tokens


def test_a_client_that_leaves_mid_stream_is_recorded_as_such_with_an_estimate(gw, upstream):
    words = [f"word{i} " for i in range(200)]
    events = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
        }
        for w in words
    ]
    chunks = sse(events)
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(headers=[("content-type", "text/event-stream")], chunks=chunks, chunk_delay=0.01),
    )
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
        ) as resp,
    ):
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data:")
            if got == 20:
                break  # leave: the response is closed with 180 chunks still to come
    (row,) = wait_rows(gw.database, 1)
    assert row["client_closed"] == 1 and row["error_code"] == "client_closed"
    assert row["status"] == 200 and row["stream"] == 1
    assert row["estimated"] == 1
    assert row["prompt_tokens"] > 0
    assert 20 <= row["completion_tokens"] < 200


def test_an_upstream_error_is_recorded_without_tokens(gw, upstream):
    body = b'{"error": {"message": "boom", "type": "server_error", "code": null}}'
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=500, headers=[("content-type", "application/json")], body=body),
    )
    with pytest.raises(openai.InternalServerError):
        sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    (row,) = wait_rows(gw.database, 1)
    assert row["status"] == 500
    assert row["prompt_tokens"] == row["completion_tokens"] == 0
    assert row["model"] == "gpt-4o"  # the request's, though no answer named one


def test_embeddings_and_responses_are_counted(gw, upstream):
    client = sdk(gw)
    emb = client.embeddings.create(model="text-embedding-3-small", input="one two three")
    resp = client.responses.create(model="gpt-4o", input="count these five words please")
    streamed = list(
        client.responses.create(model="gpt-4o", input="and these four too", stream=True)
    )
    found = wait_rows(gw.database, 3)
    by_path = {}
    for row in found:
        by_path.setdefault(row["path"], []).append(row)
    (emb_row,) = by_path["/v1/embeddings"]
    assert emb_row["prompt_tokens"] == emb.usage.prompt_tokens and emb_row["estimated"] == 0
    plain, stream = by_path["/v1/responses"]
    assert resp.usage is not None
    assert plain["prompt_tokens"] == resp.usage.input_tokens
    assert plain["completion_tokens"] == resp.usage.output_tokens
    done = [e for e in streamed if e.type == "response.completed"]
    assert done and stream["stream"] == 1
    assert stream["prompt_tokens"] == done[0].response.usage.input_tokens


def test_a_body_that_is_not_json_is_forwarded_for_the_upstream_to_judge(gw, upstream):
    with httpx.Client(timeout=10) as client:
        r = client.post(
            gw.url + "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 400  # the fake upstream's own answer
    (sent,) = upstream.requests
    assert sent.body == b"{not json"
    assert wait_rows(gw.database, 1)[0]["status"] == 400


def test_usage_off_records_nothing_and_forwards_the_body_untouched(gateway_factory, upstream):
    gw = gateway_factory(upstream.url, env={**FAST, "OPENAI_FORWARD_USAGE": "false"})
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=10) as client:
        client.post(gw.url + "/v1/chat/completions", json=body).raise_for_status()
    (sent,) = upstream.requests
    assert "stream_options" not in sent.json()
    time.sleep(0.2)  # several flush intervals: nothing may appear
    assert rows(gw.database) == []


def test_the_usage_command_reports_what_was_recorded(gw, upstream):
    client = sdk(gw)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    found = wait_rows(gw.database, 4)
    assert len(found) == 4
    out = run_cli("usage", "--by", "model", "--json", "--database", gw.database)
    assert out.returncode == 0, out.stderr
    report = {r["model"]: r for r in json.loads(out.stdout)}
    assert report["gpt-4o"]["requests"] == 3 and report["gpt-4o-mini"]["requests"] == 1
    assert report["gpt-4o"]["prompt_tokens"] == 3 * PROMPT_WORDS
    table = run_cli("usage", "--by", "model", "--database", gw.database)
    assert table.returncode == 0 and "gpt-4o-mini" in table.stdout


def test_sigterm_under_load_loses_no_row(gateway_factory, upstream):
    """Every request the upstream answered has its row after a graceful stop."""
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_USAGE_FLUSH_INTERVAL": "5"})
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            headers=[("content-type", "text/event-stream")],
            chunks=sse([{"x": 1}] * 5),
            chunk_delay=0.02,
        ),
    )
    stop = threading.Event()
    done: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        gw.url + "/v1/chat/completions",
                        json={"model": "gpt-4o", "messages": MESSAGES},
                    )
                    done.append(r.status_code)
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    upstream.wait_for_requests(40, timeout=10)
    gw.proc.send_signal(signal.SIGTERM)  # well inside the 5 s flush interval
    stop.set()
    for t in threads:
        t.join(10)
    assert gw.proc.wait(15) == 0
    found = rows(gw.database)
    assert len(found) == len(upstream.requests) >= 40
    assert len({r["request_id"] for r in found}) == len(found)


def test_usage_rows_hold_no_secret(gw, upstream):
    sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    wait_rows(gw.database, 1)
    for suffix in ("", "-wal"):
        with open(gw.database + suffix, "rb") as fh:
            assert_no_secret(fh.read())


def test_an_upstream_with_stream_usage_off_gets_the_body_untouched_and_is_estimated(
    gateway_factory, upstream, tmp_path
):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        json.dumps(
            {
                "upstreams": [{"name": "plain", "base_url": upstream.url, "stream_usage": False}],
                "usage_flush_interval": 0.05,
            }
        )
    )
    gw = gateway_factory(upstream.url, args=["--config", str(cfg)])
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=10) as client:
        sent_bytes = json.dumps(body).encode()
        r = client.post(
            gw.url + "/v1/chat/completions",
            content=sent_bytes,
            headers={"content-type": "application/json", "authorization": "Bearer sk-own"},
        )
    assert r.status_code == 200 and b'"usage"' not in r.content
    (sent,) = upstream.requests
    assert sent.body == sent_bytes  # not a byte changed
    (row,) = wait_rows(gw.database, 1)
    assert row["estimated"] == 1 and row["completion_tokens"] > 0 and row["upstream"] == "plain"


def test_a_stream_whose_usage_the_gateway_asks_for_comes_uncompressed(gw, upstream):
    """An upstream that compresses what the client accepts: the gateway, which must read
    the stream to take its usage out, asks it for an uncompressed answer; so the client
    (the SDK sends ``Accept-Encoding: gzip``) never sees the usage chunk it did not ask
    for, and the row holds the upstream's own figures, not an estimate."""
    import gzip

    def answer(rec):
        events = [
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
            }
            for w in ("Fine ", "and ", "sunny")
        ]
        if (rec.json().get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
            events.append({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
                           "choices": [], "usage": usage})  # fmt: skip
        data = b"".join(sse(events))
        headers = [("content-type", "text/event-stream")]
        if "gzip" in (rec.header("accept-encoding") or ""):
            return Reply(headers=[*headers, ("content-encoding", "gzip")], body=gzip.compress(data))
        return Reply(headers=headers, chunks=[data])

    upstream.script("POST", "/v1/chat/completions", answer)
    stream = sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Fine and sunny"
    assert all(c.usage is None and c.choices for c in chunks)
    (sent,) = upstream.requests
    assert sent.headers_named("accept-encoding") == ["identity"]
    assert sent.json()["stream_options"] == {"include_usage": True}
    (row,) = wait_rows(gw.database, 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (11, 7, 0)
