"""The gateway reaches its upstream through a real outbound proxy process (pproxy)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import free_port
from test_outbound import PASSWORD, USER, ProxyProcess


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    process = ProxyProcess("-l", f"http+socks5://127.0.0.1:0#{USER}:{PASSWORD}")
    yield process
    process.stop()


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_requests_go_through_the_configured_proxy(gateway_factory, upstream, proxy, scheme):
    url = f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}"
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_PROXY": url})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "via proxy"}]
    )
    assert reply.choices[0].message.content
    [rec] = upstream.wait_for_requests(1)
    assert rec.header("authorization") == "Bearer sk-client"
    proxy.wait_for_line(rf"127\.0\.0\.1:{upstream.port}")  # the proxy carried it
    assert PASSWORD not in gw.output()


def test_a_proxy_that_is_down_is_a_502_naming_no_proxy(gateway_factory, upstream):
    down = f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}"
    gw = gateway_factory(
        upstream.url, env={"OPENAI_FORWARD_PROXY": down, "OPENAI_FORWARD_CONNECT_TIMEOUT": "3"}
    )
    resp = httpx.get(gw.url + "/v1/models", timeout=10)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_connect_error"
    assert PASSWORD not in resp.text and USER not in resp.text
    assert upstream.requests == []
    assert PASSWORD not in gw.output()
