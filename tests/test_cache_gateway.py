"""The response cache through a real gateway: the openai SDK, raw streams, Redis shared by two
gateways, the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import run_cli
from fakeupstream import Reply, sse
from redisserver import redis_server  # noqa: F401
from usagedb import wait_rows

CHAT = "/v1/chat/completions"
FK_ALICE = "fk-alice-0123456789abcdefghijklmnopqrstuv"
FK_BOB = "fk-bob-00123456789abcdefghijklmnopqrstuvw"
MESSAGES = [{"role": "user", "content": "What is a gateway?"}]
HEADER = "x-openai-forward-cache"


def write_config(tmp_path: Path, url: str, **top: Any) -> list[str]:
    doc = {
        "upstreams": [{"name": "openai", "base_url": url, "api_key": "sk-up-0123456789abcdef"}],
        "forward_keys": [{"name": "alice", "key": FK_ALICE}, {"name": "bob", "key": FK_BOB}],
        "cache_mode": "on",
        "usage_flush_interval": 0.05,
        **top,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))
    return ["--config", str(path)]


def sdk(gw: Any, key: str = FK_ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


def ask(client: openai.OpenAI, **extra: Any) -> tuple[str | None, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, **extra
    )
    return raw.headers.get(HEADER), raw.parse()


def chat_requests(upstream: Any) -> list[Any]:
    return [r for r in upstream.requests if r.path == CHAT]


def answer_with(upstream: Any, text: str) -> None:
    """Script the upstream's chat answer: one choice whose content is ``text``."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    completion = {"object": "chat.completion", "model": "gpt-4o", "choices": [choice]}
    body = json.dumps(completion).encode()
    upstream.script("POST", CHAT, Reply(headers=[("content-type", "application/json")], body=body))


def test_a_second_identical_request_is_served_without_the_upstream(
    gateway_factory, upstream, tmp_path
):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    client = sdk(gw)
    first_state, first = ask(client)
    second_state, second = ask(client)
    assert (first_state, second_state) == ("miss", "hit")
    assert second.model_dump() == first.model_dump()
    assert len(chat_requests(upstream)) == 1
    rows = wait_rows(gw.database, 2)
    assert [r["cache_hit"] for r in rows] == [0, 1]
    # the hit's row holds the tokens it saved, and costs nothing upstream
    assert rows[1]["prompt_tokens"] == first.usage.prompt_tokens
    assert rows[1]["completion_tokens"] == first.usage.completion_tokens
    assert rows[1]["upstream"] == "openai"


def raw_stream(gw: Any, body: dict[str, Any]) -> tuple[httpx.Headers, bytes]:
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    with httpx.stream("POST", gw.url + CHAT, json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        return r.headers, b"".join(r.iter_raw())


def test_a_stream_replays_the_original_events_in_order(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    first_head, first = raw_stream(gw, body)
    second_head, second = raw_stream(gw, body)
    assert first_head[HEADER] == "miss" and second_head[HEADER] == "hit"
    assert second == first and first.rstrip().endswith(b"data: [DONE]")
    assert second_head["content-type"].startswith("text/event-stream")
    assert len(chat_requests(upstream)) == 1
    # and through the SDK, which parses every event of the replay
    chunks = list(sdk(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len(chat_requests(upstream)) == 1


def test_a_stream_the_sdk_closed_after_done_is_stored(gateway_factory, upstream, tmp_path):
    # The SDK hangs up once it reads "data: [DONE]"; the upstream's chunk terminator never
    # comes here ("stall"). The answer was complete: it is stored, and the next ask is a hit.
    events = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("A ", "gate")]
    sse_head = [("content-type", "text/event-stream")]
    upstream.script("POST", CHAT, Reply(headers=sse_head, chunks=sse(events), end="stall"))
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    client = sdk(gw)
    texts, states = [], []
    for _ in range(2):
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        ) as raw:
            states.append(raw.headers.get(HEADER))
            chunks = list(raw.parse())
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert states == ["miss", "hit"] and texts == ["A gate", "A gate"]
    assert len(chat_requests(upstream)) == 1


def test_a_paced_replay_keeps_the_original_rhythm(gateway_factory, upstream, tmp_path):
    events = [{"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]} for i in range(4)]
    reply = Reply(
        headers=[("content-type", "text/event-stream")], chunks=sse(events), chunk_delay=0.1
    )
    upstream.script("POST", CHAT, reply)
    cfg = {"cache_replay_pace": 1.0}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    _, first = raw_stream(gw, body)
    started = time.monotonic()
    head, second = raw_stream(gw, body)
    assert head[HEADER] == "hit" and second == first
    assert time.monotonic() - started >= 0.3  # four events 0.1 s apart, as recorded


def test_what_changes_the_answer_changes_the_key(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    alice, bob = sdk(gw), sdk(gw, FK_BOB)
    assert ask(alice, temperature=0.2)[0] == "miss"
    assert ask(alice, temperature=0.2)[0] == "hit"
    assert ask(alice, temperature=0.7)[0] == "miss"  # another temperature
    assert ask(bob, temperature=0.2)[0] == "miss"  # another tenant never reads alice's
    assert ask(alice, temperature=0.2, extra_headers={HEADER: "bypass"})[0] is None
    assert ask(alice, temperature=0.2, extra_body={"caching": "refresh"})[0] == "miss"
    assert len(chat_requests(upstream)) == 5


def test_a_shared_cache_serves_every_tenant(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, cache_shared=True))
    assert ask(sdk(gw))[0] == "miss"
    assert ask(sdk(gw, FK_BOB))[0] == "hit"
    assert len(chat_requests(upstream)) == 1


def test_a_request_can_ask_for_caching(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, cache_mode="request")
    )
    client = sdk(gw)
    assert ask(client)[0] is None  # nobody asked: the cache stays out of it
    assert ask(client, extra_body={"caching": True})[0] == "miss"
    assert ask(client, extra_body={"caching": True})[0] == "hit"
    assert ask(client, extra_headers={HEADER: "on"})[0] == "hit"
    forwarded = chat_requests(upstream)
    assert len(forwarded) == 2
    assert all("caching" not in json.loads(r.body) for r in forwarded)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, extra_body={"caching": "sometimes"})
    assert caught.value.code == "invalid_cache_directive"
    assert len(chat_requests(upstream)) == 2


def test_errors_and_broken_streams_are_not_stored(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    client = sdk(gw)
    upstream.script("POST", CHAT, Reply(status=500, body=b'{"error":{"message":"boom"}}'))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            ask(client)
    assert len(chat_requests(upstream)) == 2
    # a stream the upstream cuts off
    cut = sse([{"choices": [{"index": 0, "delta": {"content": "par"}}]}])[:1]
    sse_head = [("content-type", "text/event-stream")]
    upstream.script("POST", CHAT, Reply(headers=sse_head, chunks=cut, end="reset"))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    for _ in range(2):  # the gateway ends the stream with an error event, never [DONE]
        with httpx.stream("POST", gw.url + CHAT, json=body, headers=headers, timeout=10) as r:
            assert r.headers[HEADER] == "miss"
            assert b"[DONE]" not in r.read()
    # a stream its client leaves
    upstream.script("POST", CHAT, Reply(headers=sse_head, chunks=cut, end="stall"))
    body["temperature"] = 0.5
    for _ in range(2):
        with httpx.stream("POST", gw.url + CHAT, json=body, headers=headers, timeout=10) as r:
            assert r.headers[HEADER] == "miss"
            next(r.iter_raw())
    assert len(chat_requests(upstream)) == 6


def test_hits_do_not_hold_up_other_requests(gateway_factory, upstream, tmp_path):
    big = "x" * (1 << 20)
    answer_with(upstream, big)
    # no memory tier: every hit reads the SQLite file, on the store's thread
    cfg = {"cache_memory_bytes": 0}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    assert ask(sdk(gw))[0] == "miss"

    async def run() -> tuple[list[httpx.Response], float]:
        headers = {"authorization": f"Bearer {FK_ALICE}"}
        body = {"model": "gpt-4o", "messages": MESSAGES}
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as c:
            hits = [asyncio.create_task(c.post(gw.url + CHAT, json=body, headers=headers))
                    for _ in range(20)]  # fmt: skip
            worst = 0.0
            while not all(t.done() for t in hits):
                started = time.monotonic()
                assert (await c.get(gw.url + "/healthz")).status_code == 200
                worst = max(worst, time.monotonic() - started)
            return await asyncio.gather(*hits), worst

    responses, worst = asyncio.run(run())
    assert all(r.headers[HEADER] == "hit" and len(r.content) > len(big) for r in responses)
    assert len(chat_requests(upstream)) == 1
    # the store reads on its own thread: a health check waits for no 1 MiB read
    assert worst < 1.0, f"a health check took {worst:.3f} s during the hits"


@pytest.mark.usefixtures("redis_server")
def test_two_gateways_share_a_redis_cache(gateway_factory, upstream, tmp_path, redis_server):
    cfg = {"cache_store": redis_server.url}
    one = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    two = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    assert ask(sdk(one))[0] == "miss"
    assert ask(sdk(two))[0] == "hit"
    assert len(chat_requests(upstream)) == 1


def test_the_cli_shows_and_clears_the_cache(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))
    ask(sdk(gw))
    ask(sdk(gw))
    cache = str(Path(gw.data_dir) / "cache.db")
    assert gw.stop() == 0  # a worker adds its hit counts to the file at the latest at exit
    stats = json.loads(run_cli("cache", "stats", "--cache", cache, "--json").stdout)
    assert stats["entries"] == 1 and stats["hits"] == 1 and stats["misses"] == 1
    cleared = run_cli("cache", "clear", "--cache", cache)
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(run_cli("cache", "stats", "--cache", cache, "--json").stdout)["entries"] == 0


def test_a_clear_reaches_running_workers_within_the_memory_ttl(gateway_factory, upstream, tmp_path):
    cfg = {"cache_memory_ttl": 0.2}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    assert ask(sdk(gw))[0] == "miss"
    assert ask(sdk(gw))[0] == "hit"  # from the worker's memory
    cleared = run_cli("cache", "clear", "--cache", str(Path(gw.data_dir) / "cache.db"))
    assert cleared.returncode == 0, cleared.stderr
    deadline = time.monotonic() + 10
    while ask(sdk(gw))[0] == "hit":  # each hit renews nothing: the memory copy ages out
        assert time.monotonic() < deadline, "the cleared entry is still served"
        time.sleep(0.05)
    assert len(chat_requests(upstream)) == 2


def test_embeddings_are_cached_and_large_answers_are_not(gateway_factory, upstream, tmp_path):
    cfg = {"cache_max_entry_bytes": 4096}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    client = sdk(gw)

    def embed(text: str) -> str | None:
        raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=text)
        raw.parse()
        return raw.headers.get(HEADER)

    assert embed("a") == "miss" and embed("a") == "hit"
    embeddings = [r for r in upstream.requests if r.path == "/v1/embeddings"]
    assert len(embeddings) == 1
    big = "x" * 8000
    answer_with(upstream, big)
    assert ask(client)[0] == "miss" and ask(client)[0] == "miss"  # over the cap: relayed only
    assert len(chat_requests(upstream)) == 2


def test_a_responses_api_stream_is_replayed(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url))

    def events() -> list[str]:
        with (
            sdk(gw) as client,
            client.responses.create(model="gpt-4o", input="hi", stream=True) as stream,
        ):
            return [e.type for e in stream]

    first = events()
    assert first[-1] == "response.completed"
    assert events() == first
    assert len([r for r in upstream.requests if r.path == "/v1/responses"]) == 1
