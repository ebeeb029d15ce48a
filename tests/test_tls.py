"""An https upstream: certificates are verified, and a failed handshake is a clean 502."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trustme
from conftest import assert_no_secret


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(
            {"object": "list", "host": self.headers["Host"], "auth": self.headers["Authorization"]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_upstream(ca: trustme.CA) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_upstream_with_a_trusted_certificate_is_forwarded(
    gateway_factory, tls_upstream, ca, tmp_path: Path
):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = gateway_factory(tls_upstream, env={"SSL_CERT_FILE": str(ca_file)})
    resp = httpx.get(f"{gw.url}/models", timeout=10)
    assert resp.status_code == 200
    body = resp.json()
    assert body["host"] == tls_upstream.removeprefix("https://")
    assert body["auth"] == f"Bearer {gw.api_key}"


def test_untrusted_upstream_certificate_is_a_502_that_names_no_address(
    gateway_factory, tls_upstream
):
    gw = gateway_factory(tls_upstream, env={"OPENAI_FORWARD_CONNECT_TIMEOUT": "5"})
    resp = httpx.get(f"{gw.url}/v1/models", timeout=10)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_connect_error"
    assert resp.headers["x-request-id"].startswith("req_gw_")
    port = tls_upstream.rsplit(":", 1)[1]
    assert "localhost" not in resp.text and port not in resp.text
    assert_no_secret(resp)
