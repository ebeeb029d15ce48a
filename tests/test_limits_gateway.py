"""Rate limits, concurrency limits and budgets end to end: requests released together against
a real gateway (one worker, two workers, two gateways sharing Redis)."""

from __future__ import annotations

import asyncio
import json
import threading
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
MESSAGES = [{"role": "user", "content": "hello there"}]
FK_ALICE = "fk-alice-0123456789abcdefghijklmnopqrstuv"
FK_BOB = "fk-bob-00123456789abcdefghijklmnopqrstuvw"


def write_config(tmp_path: Path, url: str, **top: Any) -> list[str]:
    doc = {"upstreams": [{"name": "openai", "base_url": url, "api_key": "sk-up-123"}], **top}
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))
    return ["--config", str(path)]


async def _burst(urls: list[str], n: int, body: dict[str, Any], key: str) -> list[httpx.Response]:
    """``n`` requests released together, spread over ``urls`` in turn."""
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        gate = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await gate.wait()
            return await client.post(urls[i % len(urls)] + CHAT, json=body, headers=headers)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*tasks))


def burst(urls: list[str], n: int, key: str = FK_ALICE, **body: Any) -> list[httpx.Response]:
    return asyncio.run(_burst(urls, n, {"model": "gpt-4o", "messages": MESSAGES, **body}, key))


def assert_rate_refusal(r: httpx.Response, kind: str = "requests") -> None:
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == kind and err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
    assert r.headers["x-ratelimit-limit-" + kind]
    assert r.headers["x-ratelimit-remaining-" + kind] == "0"
    assert r.headers["x-ratelimit-reset-" + kind]


RPM_10 = {
    "forward_keys": [{"name": "alice", "key": FK_ALICE}],
    "limits": [{"scope": "key", "rpm": 10}],
}


def test_fifty_requests_released_together_against_rpm_10(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **RPM_10))
    responses = burst([gw.url], 50)
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(429) == 40
    assert len(upstream.requests) == 10
    for r in responses:
        if r.status_code == 429:
            assert_rate_refusal(r)
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "10"
    assert int(ok.headers["x-ratelimit-remaining-requests"]) < 10


def test_rpm_holds_exactly_across_two_workers(gateway_factory, upstream, tmp_path):
    gw = gateway_factory(
        upstream.url, workers=2, args=write_config(tmp_path, upstream.url, **RPM_10)
    )
    codes = [r.status_code for r in burst([gw.url], 50)]
    assert codes.count(200) == 10 and codes.count(429) == 40
    assert len(upstream.requests) == 10


def test_rpm_holds_exactly_across_two_gateways_sharing_redis(
    gateway_factory,
    upstream,
    tmp_path,
    redis_server,
):
    redis_server.flush()
    # a generous timeout: this test is about sharing, not about the fallback when Redis is slow
    cfg = {**RPM_10, "state": redis_server.url, "state_timeout": 5}
    args = write_config(tmp_path, upstream.url, **cfg)
    one = gateway_factory(upstream.url, args=args)
    two = gateway_factory(upstream.url, args=args)
    codes = [r.status_code for r in burst([one.url, two.url], 50)]
    for gw in (one, two):
        assert "counted per instance" not in gw.output()
    assert codes.count(200) == 10 and codes.count(429) == 40
    assert len(upstream.requests) == 10
    keys = redis_server.client().keys("*")
    assert keys and all(redis_server.client().pttl(k) > 0 for k in keys)  # nothing kept forever


def test_the_sdk_sees_a_rate_limit_error_with_openais_shape(gateway_factory, upstream, tmp_path):
    cfg = {**RPM_10, "limits": [{"scope": "key", "rpm": 1}]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FK_ALICE, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body["type"] == "requests"
    assert 50 <= float(caught.value.response.headers["retry-after"]) <= 60


def test_each_key_has_its_own_bucket_and_ip_rules_use_the_real_peer(
    gateway_factory, upstream, tmp_path
):
    cfg = {
        "forward_keys": [{"name": "alice", "key": FK_ALICE}, {"name": "bob", "key": FK_BOB}],
        "limits": [{"scope": "key", "rpm": 2}, {"scope": "ip", "rpm": 5}],
    }
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    alice = [r.status_code for r in burst([gw.url], 4, key=FK_ALICE)]
    bob = [r.status_code for r in burst([gw.url], 4, key=FK_BOB)]
    assert alice.count(200) == 2 and bob.count(200) == 2
    with httpx.Client(timeout=10) as client:  # a spoofed X-Forwarded-For changes nothing
        r = client.post(
            gw.url + CHAT,
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"authorization": f"Bearer {FK_BOB}", "x-forwarded-for": "203.0.113.9"},
        )
    assert r.status_code == 429  # bob's own limit still refuses it
    assert len(upstream.requests) == 4


def test_concurrent_limit_counts_streams_until_they_end(gateway_factory, upstream, tmp_path):
    gate = threading.Event()
    upstream.script(
        "POST",
        CHAT,
        Reply(headers=[("content-type", "text/event-stream")], chunks=sse([{"x": 1}]), gate=gate),
    )
    cfg = {**RPM_10, "limits": [{"scope": "key", "concurrent": 2}]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    headers = {"authorization": f"Bearer {FK_ALICE}"}
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=10, headers=headers) as client:
        with (
            client.stream("POST", CHAT, json=body) as first,
            client.stream("POST", CHAT, json=body) as second,
        ):
            upstream.wait_for_requests(2)
            third = httpx.post(gw.url + CHAT, json=body, headers=headers, timeout=10)
            assert third.status_code == 429
            assert third.json()["error"]["message"].startswith("Too many requests in flight")
            gate.set()
            first.read()
            second.read()
        fourth = client.post(CHAT, json=body)
    assert fourth.status_code == 200


def test_a_token_budget_holds_under_twenty_concurrent_requests(gateway_factory, upstream, tmp_path):
    """Each request reserves its prompt estimate + max_tokens. Admitted requests are held at
    the upstream until all 20 are either held or refused, so no reservation is settled early:
    the admitted ones must fit the budget at max_tokens (80) each, and the recorded spend
    stays within it."""
    gate = threading.Event()
    usage = {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}
    completion = {"object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": usage}
    reply = Reply(
        headers=[("content-type", "application/json")],
        body=json.dumps(completion).encode(),
        gate=gate,
    )
    upstream.script("POST", CHAT, reply)
    cfg = {
        "forward_keys": [{"name": "alice", "key": FK_ALICE, "budget": {"tokens_per_day": 500}}],
        "usage_flush_interval": 0.05,
    }
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 80}

    async def run() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {FK_ALICE}"}
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=20)) as c:
            tasks = [
                asyncio.create_task(c.post(gw.url + CHAT, json=body, headers=headers))
                for _ in range(20)
            ]
            deadline = time.monotonic() + 15
            while sum(t.done() for t in tasks) + len(upstream.requests) < 20:
                assert time.monotonic() < deadline, "requests neither refused nor forwarded"
                await asyncio.sleep(0.01)
            gate.set()
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(run())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert 1 <= len(ok) <= 500 // 80 and len(ok) + len(refused) == 20
    for r in refused:
        err = r.json()["error"]
        assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
        assert r.headers["x-should-retry"] == "false"
    spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in wait_rows(gw.database, 20))
    assert spent == 39 * len(ok) and spent <= 500
    assert len(upstream.requests) == len(ok)


def test_a_spending_budget_uses_the_price_table(gateway_factory, upstream, tmp_path):
    cfg = {
        "forward_keys": [{"name": "alice", "key": FK_ALICE, "budget": {"cost_total": 0.001}}],
        "prices": {"gpt-4o": {"input": 10, "output": 30}},
        "usage_flush_interval": 0.05,
    }
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    # each request reserves (prompt ~ 20 + 10 output) tokens: about $0.0005 at these prices
    codes = [r.status_code for r in burst([gw.url], 6, max_tokens=10)]
    assert 1 <= codes.count(200) <= 3 and codes.count(429) >= 3
    rows = wait_rows(gw.database, 6)
    assert sum(r["cost"] or 0 for r in rows) <= 0.001
    assert all(r["cost"] is not None for r in rows if r["status"] == 200)


def test_tokens_per_minute_are_reserved_then_settled(gateway_factory, upstream, tmp_path):
    cfg = {**RPM_10, "limits": [{"scope": "key", "tpm": 1000}]}
    gw = gateway_factory(upstream.url, args=write_config(tmp_path, upstream.url, **cfg))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FK_ALICE, max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=400
    )
    remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert remaining <= 600  # 400 output + the prompt estimate reserved
    # the fake answered with a handful of tokens: the unused reservation came back
    second = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=400
    )
    assert int(second.headers["x-ratelimit-remaining-tokens"]) > remaining - 400
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5000)
    assert caught.value.body["type"] == "tokens"


def test_keys_made_with_the_cli_carry_their_limits(gateway_factory, upstream, tmp_path):
    db = str(tmp_path / "keys.db")
    made = run_cli("keys", "create", "--name", "carol", "--rpm", "3", "--database", db)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_DATABASE": db})
    codes = [r.status_code for r in burst([gw.url], 8, key=key)]
    assert codes.count(200) == 3 and codes.count(429) == 5
    listed = run_cli("keys", "list", "--database", db)
    assert "rpm=3" in listed.stdout


def test_redis_down_falls_back_to_local_counting_without_hanging(
    gateway_factory, upstream, tmp_path
):
    from conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = gateway_factory(
        upstream.url, args=write_config(tmp_path, upstream.url, state=dead, **RPM_10)
    )
    responses = burst([gw.url], 15)
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(429) == 5  # still limited, per instance
    assert all(r.elapsed.total_seconds() < 2 for r in responses)
    assert "counted per instance" in gw.output()


def test_a_budget_survives_a_restart(gateway_factory, upstream, tmp_path):
    """Spending recorded before a restart still counts against the budget after it, from
    the very first request."""
    usage = {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}
    body = json.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": usage})
    upstream.script(
        "POST", CHAT, Reply(headers=[("content-type", "application/json")], body=body.encode())
    )
    cfg = {
        "forward_keys": [{"name": "alice", "key": FK_ALICE, "budget": {"tokens_total": 300}}],
        "database": str(tmp_path / "gateway.db"),
    }
    args = write_config(tmp_path, upstream.url, **cfg)
    first = gateway_factory(upstream.url, args=args)
    codes = [burst([first.url], 1, max_tokens=50)[0].status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # 200 spent, then 400: the third does not fit
    assert first.stop() == 0  # a graceful stop writes every row
    second = gateway_factory(upstream.url, args=args)
    again = burst([second.url], 1, max_tokens=50)[0]
    assert again.status_code == 429
    assert again.json()["error"]["code"] == "insufficient_quota"
    assert len(upstream.requests) == 2
