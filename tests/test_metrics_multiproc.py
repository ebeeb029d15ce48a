"""Metrics across real forked workers, as the supervisor runs them: one scrape shows the sums,
a dead worker's live gauges leave while its counters stay, and the directory's life.

Each worker is a forked child that owns one ``Metrics`` and runs the commands the test sends
on a pipe (every wait bounded); children still alive at the end are killed by PID.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import sys
import warnings
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from openai_forward import __version__, metrics, metricsdir
from openai_forward.metrics import Metrics

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")

WAIT = 20.0  # seconds any child may take to answer
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _serve(conn: Connection) -> None:
    """The child: one Metrics, then run ("method", args) commands until ("exit", ())."""
    m = Metrics()
    while True:
        method, args = conn.recv()
        if method == "exit":
            return
        if method == "teardown":
            metrics.teardown()
            conn.send(None)
            continue
        conn.send(getattr(m, method)(*args))


class Worker:
    """A forked worker driven over a pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a process with threads; the gateway's
            # supervisor forks too, and these children only touch the metrics.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        assert self._conn.poll(WAIT), f"worker {self.pid} did not answer {method}"
        return self._conn.recv()

    def scrape(self) -> Samples:
        body, _ = self.call("render", None)
        out: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[s.name, frozenset(s.labels.items())] = s.value
        return out

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(WAIT)
        assert self.proc.exitcode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(WAIT)
        self._conn.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Three workers forked after setup, as the supervisor does; teardown removes the dir."""
    metrics.setup(3, None)
    directory = metricsdir.directory()
    assert directory is not None
    started: list[Worker] = []
    try:
        started.extend(Worker() for _ in range(3))
        yield started
    finally:
        for w in started:
            w.close()
        metrics.teardown()
    assert not os.path.exists(directory)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


ROUTE = {"route": "/v1/chat/completions", "upstream": "openai"}
SERIES = {**ROUTE, "model": "gpt-4o"}


def record(w: Worker, n: int, status: int = 200, cache: str | None = "miss") -> None:
    for _ in range(n):
        w.call(
            "request", "/v1/chat/completions", "openai", "gpt-4o", status, 0.2, 0.05, 10, 3, cache
        )


def test_one_scrape_shows_the_sum_over_every_worker(workers: list[Worker]) -> None:
    for i, w in enumerate(workers):
        record(w, i + 1)  # 1 + 2 + 3
        w.call("upstream_error", "openai", "timeout")
        w.call("limited", "ip", "requests")
        for _ in range(i + 1):
            w.call("request_started")
        w.call("stream_started")
        w.call("flush")
    s = workers[1].scrape()
    assert value(s, "openai_forward_requests_total", **SERIES, status="200") == 6
    assert value(s, "openai_forward_request_duration_seconds_count", **ROUTE) == 6
    assert value(s, "openai_forward_request_duration_seconds_bucket", **ROUTE, le="0.25") == 6
    assert value(s, "openai_forward_request_duration_seconds_sum", **ROUTE) == pytest.approx(1.2)
    assert value(s, "openai_forward_ttfb_seconds_count", **ROUTE) == 6
    tokens = {"upstream": "openai", "model": "gpt-4o"}
    assert value(s, "openai_forward_tokens_total", **tokens, direction="prompt") == 60
    assert value(s, "openai_forward_tokens_total", **tokens, direction="completion") == 18
    assert value(s, "openai_forward_cache_requests_total", result="miss") == 6
    errors = "openai_forward_upstream_errors_total"
    assert value(s, errors, upstream="openai", kind="timeout") == 3
    assert value(s, "openai_forward_limit_rejections_total", scope="ip", kind="requests") == 3
    assert value(s, "openai_forward_requests_in_flight") == 6
    assert value(s, "openai_forward_streams_in_flight") == 3
    assert value(s, "openai_forward_info", version=__version__) == 1
    # process figures would describe only the scraped worker: none are shown
    assert not [name for name, _ in s if name.startswith(("process_", "python_"))]


def test_key_state_shows_what_any_live_worker_sees(workers: list[Worker]) -> None:
    workers[0].call("key_pool", [("openai", "key-aaaaaaaa", "ready")])
    workers[1].call("key_pool", [("openai", "key-aaaaaaaa", "cooling")])
    workers[2].call("key_pool", [("openai", "key-aaaaaaaa", "cooling")])
    name = "openai_forward_upstream_key_state"
    s = workers[0].scrape()
    key = {"upstream": "openai", "key_id": "key-aaaaaaaa"}
    assert value(s, name, **key, state="ready") == 1
    assert value(s, name, **key, state="cooling") == 1
    assert value(s, name, **key, state="quarantined") == 0
    workers[0].kill()
    metrics.worker_died(workers[0].pid)
    s = workers[1].scrape()
    assert value(s, name, **key, state="ready") == 0
    assert value(s, name, **key, state="cooling") == 1


def test_a_dead_worker_leaves_the_live_gauges_but_not_the_counters(
    workers: list[Worker],
) -> None:
    first, second, _ = workers
    record(first, 2)
    record(second, 5, status=502, cache=None)
    second.call("request_started")
    second.call("request_started")
    second.call("stream_started")
    second.call("flush")
    first.call("request_started")
    s = first.scrape()
    assert value(s, "openai_forward_requests_in_flight") == 3
    second.kill()  # in the middle of its requests: it never ended them
    metrics.worker_died(second.pid)
    replacement = Worker()  # the supervisor's restart: same role, new pid
    workers.append(replacement)
    record(replacement, 1, status=502, cache=None)
    s = first.scrape()
    assert value(s, "openai_forward_requests_in_flight") == 1
    assert value(s, "openai_forward_streams_in_flight") == 0
    assert value(s, "openai_forward_requests_total", **SERIES, status="200") == 2
    assert value(s, "openai_forward_requests_total", **SERIES, status="502") == 5  # not flushed
    replacement.call("flush")
    s = first.scrape()
    assert value(s, "openai_forward_requests_total", **SERIES, status="502") == 6
    assert value(s, "openai_forward_request_duration_seconds_count", **ROUTE) == 8


def test_a_worker_shows_others_as_of_their_last_flush(workers: list[Worker]) -> None:
    record(workers[0], 4)
    s = workers[2].scrape()
    assert not value(s, "openai_forward_requests_total", **SERIES, status="200")
    workers[0].call("flush")
    s = workers[2].scrape()
    assert value(s, "openai_forward_requests_total", **SERIES, status="200") == 4


def test_a_worker_cannot_remove_the_shared_directory(workers: list[Worker]) -> None:
    directory = metricsdir.directory()
    assert directory is not None
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert workers[0].call("teardown") is None
    assert os.path.isdir(directory)
    record(workers[0], 1)
    workers[0].call("flush")
    s = workers[1].scrape()
    assert value(s, "openai_forward_requests_total", **SERIES, status="200") == 1


def test_an_empty_file_from_a_worker_killed_while_starting_does_not_fail_scrapes(
    workers: list[Worker],
) -> None:
    """prometheus_client creates a worker's file before sizing it; one killed in between
    leaves it empty for good, and the scrape must still show the others."""
    directory = metricsdir.directory()
    assert directory is not None
    open(os.path.join(directory, "counter_999999.db"), "wb").close()
    record(workers[0], 2)
    workers[0].call("flush")
    s = workers[1].scrape()
    assert value(s, "openai_forward_requests_total", **SERIES, status="200") == 2
