"""End-to-end: the official openai SDK talks to the gateway, which talks to the fake upstream.

Every client here goes through a transport that scans each response (headers and body bytes)
for the gateway's own API key, so a leak fails the test that caused it.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from conftest import DEFAULT_API_KEY, GatewayProcess, assert_no_secret, free_port, start_gateway
from fakeupstream import (
    FakeUpstream,
    Recorded,
    Reply,
    chat_reply_text,
    completion_text,
    embedding_vector,
    image_bytes,
    speech_bytes,
    sse,
)

USER_KEY = "sk-user-QWERTYzxcvbn5544"
SDK_TIMEOUT = 10.0
KINDS = ["sync-v1", "sync-root", "async-v1", "async-root"]


# --------------------------------------------------------------------------- SDK plumbing


class _ScanStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream) -> None:
        self._inner = inner
        self._tail = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            assert_no_secret(self._tail + chunk)
            self._tail = chunk[-64:]
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _AsyncScanStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream) -> None:
        self._inner = inner
        self._tail = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            assert_no_secret(self._tail + chunk)
            self._tail = chunk[-64:]
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class ScanningTransport(httpx2.HTTPTransport):
    """Fails on any response header or body byte that carries the gateway's key."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        assert_no_secret(list(response.headers.raw))
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _ScanStream(response.stream)
        return response


class AsyncScanningTransport(httpx2.AsyncHTTPTransport):
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        assert_no_secret(list(response.headers.raw))
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _AsyncScanStream(response.stream)
        return response


def base_url(gw: GatewayProcess, kind: str) -> str:
    return gw.url + "/v1" if kind.endswith("-v1") else gw.url


def sync_client(gw: GatewayProcess, kind: str = "sync-v1", key: str = USER_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url(gw, kind),
        api_key=key,
        max_retries=0,
        timeout=SDK_TIMEOUT,
        http_client=httpx2.Client(transport=ScanningTransport()),
    )


def async_client(
    gw: GatewayProcess, kind: str = "async-v1", key: str = USER_KEY
) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url(gw, kind),
        api_key=key,
        max_retries=0,
        timeout=SDK_TIMEOUT,
        http_client=httpx2.AsyncClient(transport=AsyncScanningTransport()),
    )


def call(gw: GatewayProcess, kind: str, fn: Callable[[Any], Any], key: str = USER_KEY) -> Any:
    """Run `fn(client)` with a sync or async client of `kind`; streams are read to the end."""
    if kind.startswith("sync"):
        with sync_client(gw, kind, key) as client:
            out = fn(client)
            return list(out) if isinstance(out, openai.Stream) else out

    async def main() -> Any:
        async with async_client(gw, kind, key) as client:
            out = fn(client)
            if inspect.isawaitable(out):
                out = await out
            if isinstance(out, openai.AsyncStream):
                out = [item async for item in out]
            return out

    return asyncio.run(main())


def only_request(up: FakeUpstream, method: str, path: str) -> Recorded:
    """The one request the upstream got; it must be `method path` with the client's key."""
    reqs = up.wait_for_requests(1)
    assert len(reqs) == 1, [(r.method, r.target) for r in reqs]
    rec = reqs[0]
    assert (rec.method, rec.target) == (method, path)
    assert rec.headers_named("authorization") == [f"Bearer {USER_KEY}"]
    assert_no_secret(rec.headers)
    return rec


def words(text: str) -> int:
    return len(text.split())


kinds = pytest.mark.parametrize("kind", KINDS)


# --------------------------------------------------------------------------- resources


@kinds
def test_chat_completion_returns_the_upstream_answer(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    reply = call(
        gateway,
        kind,
        lambda c: c.chat.completions.create(model="gpt-4o-mini", messages=messages, user="u-1"),
    )
    expected = chat_reply_text("hi there")
    assert reply.choices[0].message.content == expected
    assert reply._request_id.startswith("req_")  # the upstream's x-request-id reaches the SDK
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == words(expected)
    rec = only_request(upstream, "POST", "/v1/chat/completions")
    assert rec.json() == {"model": "gpt-4o-mini", "messages": messages, "user": "u-1"}


@kinds
def test_chat_stream_assembles_the_upstream_content_and_usage(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    chunks = call(
        gateway,
        kind,
        lambda c: c.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me a story"}],
            stream=True,
            stream_options={"include_usage": True},
        ),
    )
    expected = chat_reply_text("stream me a story")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected
    assert len(chunks) > 3  # really streamed in pieces
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == words(expected)
    rec = only_request(upstream, "POST", "/v1/chat/completions")
    assert rec.json()["stream"] is True
    assert rec.json()["stream_options"] == {"include_usage": True}


def test_chat_stream_without_include_usage_has_no_usage_chunk(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    with sync_client(gateway) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        chunks = list(stream)
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["x-accel-buffering"] == "no"
    assert all(ch.usage is None for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


@kinds
def test_completion_returns_the_upstream_text(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    reply = call(
        gateway,
        kind,
        lambda c: c.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say this", max_tokens=7
        ),
    )
    assert reply.choices[0].text == completion_text("Say this")
    rec = only_request(upstream, "POST", "/v1/completions")
    assert rec.json() == {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this", "max_tokens": 7}


@kinds
def test_embeddings_decode_to_the_upstream_vectors(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    reply = call(
        gateway,
        kind,
        lambda c: c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"]),
    )
    assert [d.embedding for d in reply.data] == [
        embedding_vector("alpha"),
        embedding_vector("beta"),
    ]
    rec = only_request(upstream, "POST", "/v1/embeddings")
    body = rec.json()
    assert body["input"] == ["alpha", "beta"]
    assert body["model"] == "text-embedding-3-small"


@kinds
def test_image_generation_returns_the_upstream_image(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    reply = call(
        gateway,
        kind,
        lambda c: c.images.generate(prompt="a red fox", n=2, response_format="b64_json"),
    )
    assert [base64.b64decode(d.b64_json) for d in reply.data] == [
        image_bytes("a red fox", 0),
        image_bytes("a red fox", 1),
    ]
    rec = only_request(upstream, "POST", "/v1/images/generations")
    assert rec.json() == {"prompt": "a red fox", "n": 2, "response_format": "b64_json"}


@kinds
def test_audio_transcription_uploads_the_exact_file_bytes(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    audio = random.Random(7).randbytes(300_000)
    reply = call(
        gateway,
        kind,
        lambda c: c.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", audio, "audio/wav"), language="en"
        ),
    )
    assert reply.text == f"speech.wav {len(audio)} bytes"
    rec = only_request(upstream, "POST", "/v1/audio/transcriptions")
    parts = {p.name: p for p in rec.multipart()}
    assert parts["file"].filename == "speech.wav"
    assert parts["file"].data == audio
    assert parts["model"].data == b"whisper-1"
    assert parts["language"].data == b"en"


@kinds
def test_audio_speech_downloads_the_exact_bytes(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    reply = call(
        gateway,
        kind,
        lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input="Hello world"),
    )
    assert reply.content == speech_bytes("Hello world")
    assert reply.response.headers["content-type"] == "audio/mpeg"
    rec = only_request(upstream, "POST", "/v1/audio/speech")
    assert rec.json() == {"model": "tts-1", "voice": "alloy", "input": "Hello world"}


@kinds
def test_file_lifecycle_through_the_gateway(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    data = b'{"custom_id": "r1", "method": "POST"}\n' * 1000

    async def lifecycle_async(c: openai.AsyncOpenAI) -> tuple[Any, ...]:
        created = await c.files.create(file=("batch.jsonl", data), purpose="batch")
        listed = [f.id async for f in c.files.list()]
        got = await c.files.retrieve(created.id)
        content = (await c.files.content(created.id)).content
        deleted = await c.files.delete(created.id)
        return created, listed, got, content, deleted

    def lifecycle(c: openai.OpenAI) -> tuple[Any, ...]:
        created = c.files.create(file=("batch.jsonl", data), purpose="batch")
        listed = [f.id for f in c.files.list()]
        got = c.files.retrieve(created.id)
        content = c.files.content(created.id).content
        deleted = c.files.delete(created.id)
        return created, listed, got, content, deleted

    created, listed, got, content, deleted = call(
        gateway, kind, lifecycle if kind.startswith("sync") else lifecycle_async
    )
    assert (created.filename, created.bytes, created.purpose) == ("batch.jsonl", len(data), "batch")
    assert listed == [created.id]
    assert got.id == created.id
    assert content == data
    assert deleted.deleted is True
    reqs = upstream.wait_for_requests(5)
    fid = created.id
    assert [(r.method, r.target) for r in reqs] == [
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", f"/v1/files/{fid}"),
        ("GET", f"/v1/files/{fid}/content"),
        ("DELETE", f"/v1/files/{fid}"),
    ]
    assert all(r.headers_named("authorization") == [f"Bearer {USER_KEY}"] for r in reqs)
    parts = {p.name: p for p in reqs[0].multipart()}
    assert parts["file"].data == data
    assert parts["purpose"].data == b"batch"


@kinds
def test_models_list_and_retrieve(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    async def both_async(c: openai.AsyncOpenAI) -> tuple[list[str], str]:
        return [m.id async for m in c.models.list()], (await c.models.retrieve("gpt-4o")).id

    def both(c: openai.OpenAI) -> tuple[list[str], str]:
        return [m.id for m in c.models.list()], c.models.retrieve("gpt-4o").id

    ids, one = call(gateway, kind, both if kind.startswith("sync") else both_async)
    assert "gpt-4o-mini" in ids
    assert one == "gpt-4o"
    reqs = upstream.wait_for_requests(2)
    assert [(r.method, r.target) for r in reqs] == [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/gpt-4o"),
    ]
    assert all(r.body == b"" for r in reqs)


@kinds
def test_responses_create_non_stream(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    reply = call(
        gateway,
        kind,
        lambda c: c.responses.create(model="gpt-4o", input="tell me a joke", instructions="funny"),
    )
    assert reply.output_text == chat_reply_text("tell me a joke")
    assert reply.status == "completed"
    rec = only_request(upstream, "POST", "/v1/responses")
    assert rec.json() == {"model": "gpt-4o", "input": "tell me a joke", "instructions": "funny"}


@kinds
def test_responses_stream_delivers_every_event(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    events = call(
        gateway,
        kind,
        lambda c: c.responses.create(model="gpt-4o", input="count to three", stream=True),
    )
    expected = chat_reply_text("count to three")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == expected
    assert [e.sequence_number for e in events] == list(range(len(events)))
    rec = only_request(upstream, "POST", "/v1/responses")
    assert rec.json()["stream"] is True


@kinds
def test_batches_create_and_list(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    async def both_async(c: openai.AsyncOpenAI) -> tuple[Any, list[str]]:
        created = await c.batches.create(
            input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h"
        )
        return created, [b.id async for b in c.batches.list(limit=5)]

    def both(c: openai.OpenAI) -> tuple[Any, list[str]]:
        created = c.batches.create(
            input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h"
        )
        return created, [b.id for b in c.batches.list(limit=5)]

    created, listed = call(gateway, kind, both if kind.startswith("sync") else both_async)
    assert created.input_file_id == "file-abc"
    assert listed == [created.id]
    reqs = upstream.wait_for_requests(2)
    assert [(r.method, r.target) for r in reqs] == [
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches?limit=5"),
    ]
    assert reqs[0].json() == {
        "input_file_id": "file-abc",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }


def test_concurrent_async_streams_with_different_keys_do_not_mix(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    n = 12
    keys = [f"sk-user-{i:02d}-ZXCVBNmnbvcx" for i in range(n)]

    async def one(i: int) -> str:
        async with async_client(gateway, key=keys[i]) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"client number {i} says hello"}],
                stream=True,
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    texts = asyncio.run(main())
    assert texts == [chat_reply_text(f"client number {i} says hello") for i in range(n)]
    reqs = upstream.wait_for_requests(n)
    assert len(reqs) == n
    for rec in reqs:
        i = int(rec.json()["messages"][0]["content"].split()[2])
        assert rec.headers_named("authorization") == [f"Bearer {keys[i]}"]


# --------------------------------------------------------------------------- keys


def test_client_key_reaches_upstream_and_default_key_is_never_added(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    with sync_client(gateway, key=USER_KEY) as client:
        client.models.list()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    reqs = upstream.wait_for_requests(2)
    for rec in reqs:
        assert rec.headers_named("authorization") == [f"Bearer {USER_KEY}"]
        assert_no_secret(rec.headers, rec.body)


def test_request_without_authorization_gets_the_default_key(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    response = httpx.get(gateway.url + "/v1/models", timeout=SDK_TIMEOUT)
    assert response.status_code == 200
    assert response.json()["data"]
    assert_no_secret(response)
    [rec] = upstream.wait_for_requests(1)
    assert rec.headers_named("authorization") == [f"Bearer {DEFAULT_API_KEY}"]


def test_gateway_without_default_key_passes_the_upstream_401_through(
    gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream
) -> None:
    gw = gateway_factory(upstream.url, api_key=None)
    response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m"}, timeout=SDK_TIMEOUT)
    assert response.status_code == 401
    assert "You didn't provide an API key" in response.json()["error"]["message"]
    [rec] = upstream.wait_for_requests(1)
    assert rec.header("authorization") is None


# --------------------------------------------------------------------------- errors


def openai_error(status: int, message: str, type_: str, code: str | None) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Reply(
        status=status,
        headers=[
            ("content-type", "application/json"),
            ("x-request-id", "req_upstream_error_1"),
            ("retry-after", "20"),
        ],
        body=json.dumps(body, indent=2).encode(),
    )


INVALID = "invalid_request_error"
UPSTREAM_ERRORS = [
    (
        401,
        openai.AuthenticationError,
        "Incorrect API key provided: sk-u**5544.",
        INVALID,
        "invalid_api_key",
    ),
    (404, openai.NotFoundError, "The model 'gpt-9' does not exist", INVALID, "model_not_found"),
    (
        429,
        openai.RateLimitError,
        "Rate limit reached on requests per min (RPM)",
        "requests",
        "rate_limit_exceeded",
    ),
]


@pytest.mark.parametrize(("status", "exc_class", "message", "type_", "code"), UPSTREAM_ERRORS)
@pytest.mark.parametrize("kind", ["sync-v1", "async-root"])
def test_upstream_error_reaches_the_sdk_unchanged(
    status: int,
    exc_class: type[openai.APIStatusError],
    message: str,
    type_: str,
    code: str,
    kind: str,
    gateway: GatewayProcess,
    upstream: FakeUpstream,
) -> None:
    reply = openai_error(status, message, type_, code)
    upstream.script("POST", "/v1/chat/completions", reply)
    with pytest.raises(exc_class) as info:
        call(
            gateway,
            kind,
            lambda c: c.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            ),
        )
    err = info.value
    assert err.status_code == status
    assert message in err.message
    assert err.body == json.loads(reply.body)["error"]
    assert err.response.content == reply.body
    assert err.response.headers["x-request-id"] == "req_upstream_error_1"
    assert err.response.headers["retry-after"] == "20"
    assert_no_secret(err)
    only_request(upstream, "POST", "/v1/chat/completions")  # max_retries=0: exactly one attempt


def sse_headers() -> list[tuple[str, str]]:
    return [("content-type", "text/event-stream"), ("x-request-id", "req_stream")]


def chat_chunk(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


def read_stream_until_error(gw: GatewayProcess, kind: str) -> tuple[list[str], openai.APIError]:
    """Stream a chat completion; return the content pieces received before the raised APIError."""
    pieces: list[str] = []

    def consume_sync(c: openai.OpenAI) -> None:
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")

    async def consume_async(c: openai.AsyncOpenAI) -> None:
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as info:
        call(gw, kind, consume_sync if kind.startswith("sync") else consume_async)
    assert_no_secret(info.value)
    return pieces, info.value


@pytest.mark.parametrize("kind", ["sync-v1", "async-v1"])
def test_upstream_reset_mid_stream_raises_api_error_in_the_sdk(
    kind: str, gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    chunks = sse([chat_chunk("Hello"), chat_chunk(" wor")])[:2]
    upstream.script(
        "POST", "/v1/chat/completions", Reply(headers=sse_headers(), chunks=chunks, end="reset")
    )
    pieces, err = read_stream_until_error(gateway, kind)
    assert pieces == ["Hello", " wor"]  # what arrived before the reset was delivered
    assert isinstance(err.body, dict)
    assert err.body["code"] == "upstream_disconnected"
    assert err.body["type"] == "server_error"
    assert err.message


@pytest.fixture(scope="module")
def impatient_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    gw = start_gateway(upstream.url, env={"OPENAI_FORWARD_IDLE_TIMEOUT": "0.5"})
    try:
        yield gw
    finally:
        gw.cleanup()


@pytest.mark.parametrize("kind", ["sync-v1", "async-v1"])
def test_upstream_stalling_mid_stream_raises_api_error_after_idle_timeout(
    kind: str, impatient_gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    chunks = sse([chat_chunk("Hello")])[:1]
    upstream.script(
        "POST", "/v1/chat/completions", Reply(headers=sse_headers(), chunks=chunks, end="stall")
    )
    started = time.monotonic()
    pieces, err = read_stream_until_error(impatient_gateway, kind)
    elapsed = time.monotonic() - started
    assert pieces == ["Hello"]
    assert isinstance(err.body, dict)
    assert err.body["code"] == "upstream_timeout"
    assert 0.4 < elapsed < 5, elapsed
    [rec] = upstream.wait_for_requests(1)
    # the gateway gives up on the stalled upstream connection
    upstream.connection_closed_at(rec.conn_id, timeout=5)


def test_unreachable_upstream_gives_502_without_revealing_its_address(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    dead_port = free_port()  # nothing listens there
    gw = gateway_factory(f"http://127.0.0.1:{dead_port}")
    with sync_client(gw) as client, pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    err = info.value
    assert err.status_code == 502
    assert isinstance(err.body, dict)
    assert err.body["code"] == "upstream_connect_error"
    assert err.body["type"] == "server_error"
    assert err.response.headers.get("x-request-id")
    assert err.response.headers["content-type"].startswith("application/json")
    for text in (err.response.text, err.message):
        assert "127.0.0.1" not in text
        assert str(dead_port) not in text
    assert_no_secret(err)
