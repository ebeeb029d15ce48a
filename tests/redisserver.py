"""A private redis-server for tests: never the machine's shared one.

Import the fixture into a test module with ``from redisserver import redis_server  # noqa: F401``.

    redis_server   module scope, a started RedisServer (tests call ``redis_server.flush()``)

``RedisServer`` runs ``redis-server`` on a free 127.0.0.1 port with no persistence, in a
temporary directory; ``stop``/``kill``/``restart`` simulate outages. Without redis-server on
PATH the tests are skipped, except under ``CI=true`` where they fail: CI must run them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from conftest import free_port

START_TIMEOUT = 10.0
T = TypeVar("T")


def redis_server_binary() -> str:
    """The path of redis-server; skip the test (fail it under CI=true) when there is none."""
    path = shutil.which("redis-server")
    if path is not None:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("redis-server not found, and CI=true: the Redis tests must run in CI")
    pytest.skip(
        "redis-server not found; install it (apt-get install redis-server, brew install redis) "
        "to run the Redis tests"
    )


class RedisServer:
    """One redis-server process on a fixed port (kept across restarts)."""

    def __init__(self, password: str | None = None, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.password = password
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait (bounded) until it answers PING."""
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", self.dir, "--logfile", "redis.log"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as c:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    c.ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)  # polling: redis-server offers no readiness event
        log = self._log()
        self.close()
        raise RuntimeError(f"redis-server did not answer on port {self.port}:\n{log}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server and wait for it (SIGKILL after ``timeout`` s)."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._end(signal.SIGKILL, 10)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, with empty memory."""
        self.stop()
        return self.start()

    def client(self) -> redis.Redis:
        """A sync client for inspection (close it, or use it in a ``with``)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2
        )

    def flush(self) -> None:
        """FLUSHALL: drop every key."""
        with self.client() as c:
            c.flushall()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _log(self) -> str:
        path = Path(self.dir, "redis.log")
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The WARNING messages captured so far."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def timed(aw: Awaitable[T]) -> tuple[T, float]:
    """``aw``'s result and how long it took, in seconds."""
    t = time.monotonic()
    result = await aw
    return result, time.monotonic() - t


@pytest.fixture
def redis_db(redis_server: RedisServer) -> RedisServer:
    """The module's redis-server, flushed: no state from earlier tests."""
    redis_server.flush()
    return redis_server


class SilentServer:
    """Accepts connections and reads, never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()
