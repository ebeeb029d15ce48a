"""Shared harness: the fake upstream, the gateway as a real subprocess, and a secret scanner.

Fixtures (see /work/spec/FAKE_UPSTREAM.md):
    upstream         module scope, a started FakeUpstream; reset before every test
    gateway          module scope, a gateway in front of `upstream`; stopped at teardown, and its
                     output must hold no "Traceback"
    gateway_factory  function scope, start_gateway(...) with cleanup
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from fakeupstream import FakeUpstream

REPO = Path(__file__).resolve().parent.parent
DEFAULT_API_KEY = "sk-test-default-0123456789abcdef"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """A running gateway subprocess."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        log: IO[bytes],
        log_path: str,
        api_key: str | None,
    ) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self._log = log
        self._log_path = log_path
        self.database = ""  # the SQLite file with its usage rows (and keys)
        self.data_dir = ""

    def output(self) -> str:
        """Everything the gateway wrote to stdout and stderr so far."""
        return Path(self._log_path).read_bytes().decode("utf-8", "replace")

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait up to `timeout` s (then SIGKILL); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        """Stop, and remove the log file and the gateway's own data directory."""
        self.stop()
        Path(self._log_path).unlink(missing_ok=True)
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _get_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            s.sendall(head.encode())
            head = s.recv(4096)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


def start_gateway(
    upstream_url: str,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    workers: int = 1,
    api_key: str | None = DEFAULT_API_KEY,
) -> GatewayProcess:
    """Start `python -m openai_forward run` on a free port and wait until /healthz answers 200."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    full_env["OPENAI_BASE_URL"] = upstream_url
    if api_key is not None:
        full_env["OPENAI_API_KEY"] = api_key
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # the gateway runs in a directory of its own: its default database (usage rows) lands
    # there, never in the repository
    data_dir = tempfile.mkdtemp(prefix="gateway-data-")
    cmd = [
        sys.executable,
        "-m",
        "openai_forward",
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(args or []),
    ]
    fd, log_path = tempfile.mkstemp(prefix="gateway-", suffix=".log")
    log = os.fdopen(fd, "wb")
    proc = subprocess.Popen(
        cmd,
        cwd=data_dir,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    gw = GatewayProcess(proc, port, log, log_path, api_key)
    gw.database = os.path.join(
        data_dir, full_env.get("OPENAI_FORWARD_DATABASE", "openai-forward.db")
    )
    gw.data_dir = data_dir
    health = full_env.get("OPENAI_FORWARD_HEALTH_PATH", "/healthz")
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _get_status(port, health) == 200:
            return gw
        time.sleep(0.05)  # polling: the process offers no readiness event to wait on
    code = gw.stop(timeout=5)
    out = gw.output()
    Path(log_path).unlink(missing_ok=True)
    raise RuntimeError(
        f"gateway did not become ready on port {port} (exit code {code}): {cmd}\n{out}"
    )


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess[str]:
    """``python -m openai_forward ARGS`` with no OPENAI_* variable inherited, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    return subprocess.run(
        [sys.executable, "-m", "openai_forward", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- secret scanning


# Runs found in ordinary data (bytes(range(256)), hex digests...), not evidence of a leak.
_ORDINARY_RUNS = bytes(range(256)).decode("latin-1") + "0123456789abcdef"


def secret_fragments(secret: str = DEFAULT_API_KEY, min_len: int = 8) -> set[str]:
    """Every substring of `secret` of at least `min_len` characters, except ordinary runs
    like "0123456789" (the default key ends in one)."""
    return {
        secret[i:j]
        for i in range(len(secret))
        for j in range(i + min_len, len(secret) + 1)
        if secret[i:j] not in _ORDINARY_RUNS
    }


_FRAGMENTS = {DEFAULT_API_KEY: secret_fragments(DEFAULT_API_KEY)}


def assert_no_secret(*things: Any, secret: str = DEFAULT_API_KEY) -> None:
    """Fail if `secret` or any 8+ character piece of it appears in any of `things`.

    Accepts str, bytes, header lists/mappings, httpx/httpx2 responses (headers + body),
    exceptions (their str and any `.body` / `.response`), and lists/tuples of those.
    """
    frags = _FRAGMENTS.setdefault(secret, secret_fragments(secret))
    for text in _texts(things):
        found = secret if secret in text else next((f for f in frags if f in text), None)
        if found is not None:
            raise AssertionError(f"gateway's secret key (piece {found!r}) leaked: {text[:300]!r}")


def _texts(obj: Any) -> Iterator[str]:
    if obj is None:
        return
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        yield bytes(obj).decode("latin-1")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _texts(k)
            yield from _texts(v)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from _texts(item)
    elif isinstance(obj, BaseException):
        yield str(obj)
        yield from _texts(getattr(obj, "body", None))
        yield from _texts(getattr(obj, "response", None))
    elif hasattr(obj, "headers") and hasattr(obj, "status_code"):  # httpx / httpx2 Response
        yield from _texts(list(obj.headers.raw))
        if getattr(obj, "is_stream_consumed", True) and hasattr(obj, "_content"):
            yield from _texts(obj._content)
    else:
        yield repr(obj)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream().start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(autouse=True)
def _reset_upstream(request: pytest.FixtureRequest) -> Iterator[None]:
    if "upstream" not in request.fixturenames:
        yield
        return
    up: FakeUpstream = request.getfixturevalue("upstream")
    up.reset()
    yield
    errors, up.errors[:] = list(up.errors), []
    assert not errors, f"the fake upstream itself failed during this test: {errors!r}"


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    gw = start_gateway(upstream.url)
    try:
        yield gw
    finally:
        gw.stop()
        out = gw.output()
        gw.cleanup()
        assert "Traceback" not in out, f"gateway output has a traceback:\n{out}"


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def factory(upstream_url: str, **kwargs: Any) -> GatewayProcess:
        gw = start_gateway(upstream_url, **kwargs)
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            gw.cleanup()
