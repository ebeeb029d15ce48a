"""Processes: Ctrl-C stops every worker, SIGTERM drains in-flight streams, dead workers return."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from conftest import free_port
from fakeupstream import Reply, sse

SSE_HEADERS = [("Content-Type", "text/event-stream")]


def _children(pid: int, n: int, timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        kids = psutil.Process(pid).children()
        if len(kids) == n or time.monotonic() > deadline:
            assert len(kids) == n, kids
            return kids
        time.sleep(0.02)  # polling: fork gives no event to wait on


def _wait_ready(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling: the process offers no readiness event
    raise AssertionError("gateway did not become ready")


def _start_two_workers(upstream, tmp_path, stderr):
    """The gateway with two workers in its own process group (as a terminal's foreground
    job), its usage database in ``tmp_path``; returns the process and its port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_BASE_URL"] = upstream.url
    cmd = [sys.executable, "-m", "openai_forward", "run", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    return proc, port


def test_ctrl_c_to_the_process_group_stops_every_worker(upstream, tmp_path):
    proc, port = _start_two_workers(upstream, tmp_path, subprocess.PIPE)
    try:
        _wait_ready(port)
        workers = _children(proc.pid, 2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(15) == 0
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert alive == []
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stderr.close()


def test_sigterm_lets_an_in_flight_stream_finish_and_refuses_new_connections(
    gateway_factory, upstream
):
    events = [{"n": i} for i in range(6)]
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(headers=SSE_HEADERS, chunks=sse(events), chunk_delay=0.2),
    )
    gw = gateway_factory(upstream.url)
    received: list[str] = []
    first = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={}, timeout=10) as resp:
            for line in resp.iter_lines():
                if line:
                    received.append(line)
                    first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(5)
    gw.proc.send_signal(signal.SIGTERM)
    reader.join(10)
    assert not reader.is_alive()
    assert received == [f'data: {{"n":{i}}}' for i in range(6)] + ["data: [DONE]"]
    assert gw.proc.wait(10) == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", gw.port), timeout=2):
        pass
    assert "Traceback" not in gw.output()


def test_a_worker_that_dies_is_replaced(gateway_factory, upstream):
    gw = gateway_factory(upstream.url, workers=2)
    first, second = _children(gw.proc.pid, 2)
    first.kill()
    psutil.wait_procs([first], timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = {p.pid for p in psutil.Process(gw.proc.pid).children()}
        if len(pids) == 2 and first.pid not in pids:
            break
        time.sleep(0.05)  # polling: the supervisor's fork gives no event to wait on
    assert len(pids) == 2 and second.pid in pids and first.pid not in pids
    for _ in range(10):
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{gw.url}/v1/models").status_code == 200
    assert gw.stop() == 0


def test_a_bad_request_pipelined_behind_a_stream_waits_for_the_stream_to_finish(gateway, upstream):
    from rawhttp import RawConn, request

    events = [{"n": i} for i in range(3)]
    upstream.script(
        "POST", "/v1/x-slow", Reply(headers=SSE_HEADERS, chunks=sse(events), chunk_delay=0.1)
    )
    good = request("POST", "/v1/x-slow", [("Content-Type", "application/json")], body=b"{}")
    bad = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    with RawConn(gateway.port) as conn:
        conn.send(good + bad)
        first = conn.read_response(method="POST")
        assert first.status == 200
        assert first.body.count(b"data: ") == 4  # the whole stream, not cut by the error
        second = conn.read_response()
        assert second.status == 400
        assert second.json()["error"]["code"] == "invalid_request"
        assert conn.is_closed(2.0)
    assert [r.path for r in upstream.requests] == ["/v1/x-slow"]


def test_hundreds_of_slowloris_connections_do_not_starve_real_clients(gateway_factory, upstream):
    """TESTING A16 (iii): 300 connections sending a head that never ends hold no worker
    hostage; real clients are served meanwhile and the slow ones are cut at the deadline."""
    gw = gateway_factory(upstream.url, env={"OPENAI_FORWARD_HEADER_TIMEOUT": "2"})
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        started = time.monotonic()
        statuses = []
        for i in range(30):
            with httpx.Client(timeout=5) as client:  # a new connection each time
                statuses.append(client.get(f"{gw.url}/v1/models?i={i}").status_code)
        assert statuses == [200] * 30
        assert len(upstream.requests) == 30  # nothing of the slow ones went upstream
        closed = 0
        for s in slow:
            s.settimeout(max(0.1, started + 6 - time.monotonic()))
            try:
                data = s.recv(65536)  # the 408, then EOF; or EOF at once
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed == 300
    finally:
        for s in slow:
            s.close()


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(upstream, tmp_path):
    """SIGKILL of the supervisor tells nobody: its workers, handed to init, notice within
    about a second, drain and exit, so the port is free for the next start."""
    proc, port = _start_two_workers(upstream, tmp_path, subprocess.DEVNULL)
    try:
        _wait_ready(port)
        workers = _children(proc.pid, 2)
        proc.kill()
        proc.wait(5)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], "workers kept serving after their supervisor died"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
        proc.wait(5)
