"""Upstream key pools and IP rules, end to end: a real gateway, a fake upstream that judges keys."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import assert_no_secret
from fakeupstream import Recorded, Reply

GOOD, BAD, POOR = "sk-pool-good-7Tq2Lm9X", "sk-pool-bad-4Rw8Zp1K", "sk-pool-poor-6Yh3Vn5B"
CHAT = "/v1/chat/completions"
JSON = [("content-type", "application/json")]
OK = b'{"id": "c1", "object": "chat.completion", "choices": [], "usage": null}'


def judge(rec: Recorded) -> Reply:
    """The upstream's view of each key: GOOD works, BAD is revoked, POOR has no quota left."""
    auth = rec.header("authorization")
    if auth == f"Bearer {BAD}":
        return Reply(status=401, headers=JSON, body=b'{"error": {"code": "invalid_api_key"}}')
    if auth == f"Bearer {POOR}":
        quota = b'{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}'
        return Reply(status=429, headers=JSON, body=quota)
    return Reply(headers=JSON, body=OK)


def config(tmp_path: Path, url: str, keys: list[str], **top: object) -> list[str]:
    path = tmp_path / "gateway.yaml"
    doc = {"upstreams": [{"name": "openai", "base_url": url, "keys": keys}], **top}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return ["--config", str(path)]


def keys_seen(upstream) -> list[str]:
    return [r.header("authorization").removeprefix("Bearer ") for r in upstream.requests]


def post(gw, n: int = 1, **kw) -> list[httpx.Response]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        return [c.post(CHAT, json={"model": "gpt-4o", "messages": []}, **kw) for _ in range(n)]


def test_a_refused_key_is_quarantined_and_the_request_retried_on_another(
    gateway_factory, upstream, tmp_path
):
    upstream.script("POST", CHAT, judge)
    gw = gateway_factory(
        upstream.url, api_key=None, args=config(tmp_path, upstream.url, [BAD, GOOD])
    )
    responses = post(gw, 6)
    assert [r.status_code for r in responses] == [200] * 6
    seen = keys_seen(upstream)
    assert seen.count(BAD) == 1, seen  # tried once, then out of rotation
    assert seen.count(GOOD) == 6
    for r in responses:
        assert_no_secret(r, secret=BAD)
        assert_no_secret(r, secret=GOOD)
    assert BAD not in gw.output() and GOOD not in gw.output()


def test_insufficient_quota_takes_a_key_out_of_rotation(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, judge)
    gw = gateway_factory(
        upstream.url, api_key=None, args=config(tmp_path, upstream.url, [POOR, GOOD])
    )
    assert [r.status_code for r in post(gw, 6)] == [200] * 6
    assert keys_seen(upstream).count(POOR) == 1


def test_a_rate_limited_key_cools_down_for_its_retry_after(gateway_factory, upstream, tmp_path):
    def limited(rec: Recorded) -> Reply:
        if rec.header("authorization") == f"Bearer {BAD}":
            return Reply(status=429, headers=[*JSON, ("retry-after", "60")], body=b"{}")
        return Reply(headers=JSON, body=OK)

    upstream.script("POST", CHAT, limited)
    gw = gateway_factory(
        upstream.url, api_key=None, args=config(tmp_path, upstream.url, [BAD, GOOD])
    )
    assert [r.status_code for r in post(gw, 5)] == [200] * 5
    assert keys_seen(upstream).count(BAD) == 1


def test_when_every_key_is_out_the_gateway_answers_503_with_retry_after(
    gateway_factory, upstream, tmp_path
):
    upstream.script("POST", CHAT, judge)
    gw = gateway_factory(upstream.url, api_key=None, args=config(tmp_path, upstream.url, [BAD]))
    first, second = post(gw, 2)
    assert first.status_code == 401  # the upstream's own answer, relayed: no other key to try
    assert second.status_code == 503
    error = second.json()["error"]
    assert error["code"] == "no_upstream_key"
    assert int(second.headers["retry-after"]) >= 1
    assert len(upstream.requests) == 1  # the quarantined key is not sent again
    assert_no_secret(second, secret=BAD)


def test_a_client_key_is_used_as_is_and_never_judged(gateway_factory, upstream, tmp_path):
    upstream.script("POST", CHAT, judge)
    gw = gateway_factory(upstream.url, api_key=None, args=config(tmp_path, upstream.url, [GOOD]))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=BAD, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[])
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert keys_seen(upstream) == [BAD, BAD]  # no pool key swapped in, no retry
    assert [r.status_code for r in post(gw, 1)] == [200]  # the pool key is still in rotation


@pytest.mark.parametrize(
    ("rules", "forwarded", "status"),
    [
        ({"deny_ips": ["127.0.0.1"]}, None, 403),
        ({"allow_ips": ["10.0.0.0/8"]}, None, 403),
        ({"allow_ips": ["127.0.0.0/8", "::1"]}, None, 200),
        # a spoofed X-Forwarded-For from a peer that is not a trusted proxy changes nothing
        ({"allow_ips": ["10.0.0.0/8"]}, "10.1.2.3", 403),
        ({"deny_ips": ["127.0.0.1"]}, "10.1.2.3", 403),
        # behind a trusted proxy the right-most untrusted entry is the client
        ({"allow_ips": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.1"]}, "10.1.2.3", 200),
        ({"deny_ips": ["10.1.2.3"], "trusted_proxies": ["127.0.0.1"]}, "10.1.2.3", 403),
        ({"allow_ips": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.1"]}, "10.9.9.9, 8.8.8.8", 403),
    ],
)
def test_ip_rules(gateway_factory, upstream, tmp_path, rules, forwarded, status):
    gw = gateway_factory(upstream.url, args=config(tmp_path, upstream.url, [GOOD], **rules))
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    [resp] = post(gw, 1, headers=headers)
    assert resp.status_code == status
    if status == 403:
        assert resp.json()["error"]["code"] == "ip_not_allowed"
        assert upstream.requests == []
    else:
        assert len(upstream.requests) == 1


def test_behind_a_trusted_proxy_the_resolved_client_is_forwarded(
    gateway_factory, upstream, tmp_path
):
    args = config(tmp_path, upstream.url, [GOOD], trusted_proxies=["127.0.0.1"], forwarded_for=True)
    gw = gateway_factory(upstream.url, args=args)
    [resp] = post(gw, 1, headers={"x-forwarded-for": "203.0.113.9"})
    assert resp.status_code == 200
    [rec] = upstream.requests
    assert rec.headers_named("x-forwarded-for") == ["203.0.113.9"]


def test_a_bad_ip_rule_is_refused_at_start_naming_the_setting(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("allow_ips: ['10.0.0.0/8', '10.0.0.300/8']\n")
    out = subprocess.run(
        [sys.executable, "-m", "openai_forward", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2
    assert "allow_ips[1]: '10.0.0.300/8' is not an IP address or network" in out.stderr


FORWARD = "fk-query-0123456789abcdefghijklmnopqrstuv"


@pytest.mark.parametrize("auth", ["bearer", "query:key"])
def test_a_forward_key_in_the_query_is_used_and_never_forwarded(
    gateway_factory, upstream, tmp_path, auth
):
    path = tmp_path / "gateway.yaml"
    doc = {
        "database": str(tmp_path / "keys.db"),
        "forward_keys": [{"name": "q", "key": FORWARD}],
        "upstreams": [{"name": "o", "base_url": upstream.url, "keys": [GOOD], "auth": auth}],
    }
    path.write_text(json.dumps(doc))
    # this fake accepts any key, wherever it is (the default one wants Authorization)
    upstream.script("GET", "/v1/models", Reply(headers=JSON, body=b'{"object": "list"}'))
    gw = gateway_factory(upstream.url, api_key=None, args=["--config", str(path)])
    ok = httpx.get(f"{gw.url}/v1/models?key={FORWARD}&limit=2", timeout=10)
    assert ok.status_code == 200
    [rec] = upstream.requests
    assert FORWARD not in rec.target and "fk-" not in rec.target
    assert_no_secret(rec.headers, rec.target, secret=FORWARD)
    if auth == "bearer":
        assert rec.header("authorization") == f"Bearer {GOOD}"
        assert rec.query == "limit=2"
    else:
        assert rec.query == f"limit=2&key={GOOD}"
    wrong = httpx.get(f"{gw.url}/v1/models?key=fk-unknown-000000000000000000000000000", timeout=10)
    assert wrong.status_code == 401
    assert len(upstream.requests) == 1
