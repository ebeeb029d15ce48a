"""An upstream body delimited by closing the connection: a clean close ends it, a reset
is a failure the client must see."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import httpx
import pytest

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"


@pytest.fixture
def close_upstream() -> Iterator[tuple[str, dict[str, bool]]]:
    """Answers each connection with a close-delimited event stream, then closes it cleanly
    or resets it, as ``mode["reset"]`` says."""
    mode = {"reset": False}
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                # read the whole body: closing with unread bytes would send a reset, not a FIN
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(HEAD + b"data: one\n\n")
                if mode["reset"]:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", mode
    stop.set()
    thread.join(5)
    server.close()


def test_a_clean_close_ends_the_body_and_the_client_gets_it_whole(gateway_factory, close_upstream):
    url, _ = close_upstream
    gw = gateway_factory(url)
    with httpx.Client(timeout=10) as client:
        resp = client.post(gw.url + "/v1/chat/completions", json={"stream": True})
    assert resp.status_code == 200
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.text == "data: one\n\n"


def test_a_reset_is_reported_as_an_error_event_not_a_short_answer(gateway_factory, close_upstream):
    url, mode = close_upstream
    mode["reset"] = True
    gw = gateway_factory(url)
    with httpx.Client(timeout=10) as client:
        resp = client.post(gw.url + "/v1/chat/completions", json={"stream": True})
    assert resp.status_code == 200
    assert resp.text.startswith("data: one\n\n")
    assert '"code":"upstream_disconnected"' in resp.text
