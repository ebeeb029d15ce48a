"""Metrics in one process: every metric as a scraper reads it, the label caps, the key-state
gauges, the content types, and the buffered histograms against prometheus_client's own."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from prometheus_client.values import MutexValue

from openai_forward import __version__, metrics, metricsdir
from openai_forward.metrics import LATENCY_BUCKETS, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def single_process() -> Iterator[None]:
    metrics.setup(1, None)
    yield
    metrics.teardown()


def scrape(m: Metrics) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels); the text must parse."""
    body, content_type = m.render(None)
    assert content_type.startswith(b"text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def chat(m: Metrics, **overrides: object) -> None:
    args: dict[str, object] = {
        "route": "/v1/chat/completions",
        "upstream": "openai",
        "model": "gpt-4o-mini",
        "status": 200,
        "duration_s": 0.3,
        "ttfb_s": 0.02,
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "cache": None,
    }
    args.update(overrides)
    m.request(**args)  # type: ignore[arg-type]


def test_a_request_shows_in_every_request_metric() -> None:
    m = Metrics()
    chat(m)
    chat(m, status=429, duration_s=2.0, ttfb_s=None, prompt_tokens=0, completion_tokens=0)
    s = scrape(m)
    route = {"route": "/v1/chat/completions", "upstream": "openai"}
    series = {**route, "model": "gpt-4o-mini"}
    assert value(s, "openai_forward_requests_total", **series, status="200") == 1
    assert value(s, "openai_forward_requests_total", **series, status="429") == 1
    duration = "openai_forward_request_duration_seconds"
    assert value(s, f"{duration}_count", **route) == 2
    assert value(s, f"{duration}_sum", **route) == pytest.approx(2.3)
    assert value(s, f"{duration}_bucket", **route, le="0.25") == 0
    assert value(s, f"{duration}_bucket", **route, le="0.5") == 1
    assert value(s, f"{duration}_bucket", **route, le="2.5") == 2
    assert value(s, f"{duration}_bucket", **route, le="+Inf") == 2
    # the 429 had no upstream byte: one time-to-first-byte observation, of 20 ms
    assert value(s, "openai_forward_ttfb_seconds_count", **route) == 1
    assert value(s, "openai_forward_ttfb_seconds_bucket", **route, le="0.01") == 0
    assert value(s, "openai_forward_ttfb_seconds_bucket", **route, le="0.025") == 1
    tokens = {"upstream": "openai", "model": "gpt-4o-mini"}
    assert value(s, "openai_forward_tokens_total", **tokens, direction="prompt") == 12
    assert value(s, "openai_forward_tokens_total", **tokens, direction="completion") == 5


def test_buckets_span_5_ms_to_2_minutes() -> None:
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 120.0
    m = Metrics()
    chat(m, duration_s=0.001)
    chat(m, duration_s=119.0)
    chat(m, duration_s=3600.0)
    s = scrape(m)
    route = {"route": "/v1/chat/completions", "upstream": "openai"}
    name = "openai_forward_request_duration_seconds_bucket"
    assert value(s, name, **route, le="0.005") == 1
    assert value(s, name, **route, le="60.0") == 1
    assert value(s, name, **route, le="120.0") == 2
    assert value(s, name, **route, le="+Inf") == 3


def test_cache_results_are_counted_and_uncacheable_requests_are_not() -> None:
    m = Metrics()
    chat(m, cache="hit")
    chat(m, cache="hit")
    chat(m, cache="miss")
    chat(m, cache=None)
    s = scrape(m)
    assert value(s, "openai_forward_cache_requests_total", result="hit") == 2
    assert value(s, "openai_forward_cache_requests_total", result="miss") == 1


def test_upstream_errors_and_limit_rejections_are_counted_by_their_labels() -> None:
    m = Metrics()
    m.upstream_error("openai", "timeout")
    m.upstream_error("openai", "timeout")
    m.upstream_error("azure", "5xx")
    m.limited("key", "requests")
    m.limited("budget", "quota")
    m.limited("key", "requests")
    s = scrape(m)
    errors = "openai_forward_upstream_errors_total"
    assert value(s, errors, upstream="openai", kind="timeout") == 2
    assert value(s, errors, upstream="azure", kind="5xx") == 1
    rejections = "openai_forward_limit_rejections_total"
    assert value(s, rejections, scope="key", kind="requests") == 2
    assert value(s, rejections, scope="budget", kind="quota") == 1


def test_in_flight_gauges_follow_starts_and_ends() -> None:
    m = Metrics()
    for _ in range(3):
        m.request_started()
    m.stream_started()
    m.stream_started()
    s = scrape(m)
    assert value(s, "openai_forward_requests_in_flight") == 3
    assert value(s, "openai_forward_streams_in_flight") == 2
    m.request_ended()
    m.stream_ended()
    m.stream_ended()
    s = scrape(m)
    assert value(s, "openai_forward_requests_in_flight") == 2
    assert value(s, "openai_forward_streams_in_flight") == 0


def test_distinct_models_past_the_cap_count_as_other() -> None:
    m = Metrics(model_labels_max=3)
    for i in range(6):
        chat(m, model=f"model-{i}")
    chat(m, model="model-1")  # already admitted: keeps its own label
    chat(m, model="x" * 101)  # too long to be a label even under the cap
    s = scrape(m)
    counts = {
        dict(labels)["model"]: v
        for (name, labels), v in s.items()
        if name == "openai_forward_requests_total"
    }
    assert counts == {"model-0": 1, "model-1": 2, "model-2": 1, "other": 4}


def test_distinct_routes_past_the_cap_count_as_other() -> None:
    m = Metrics(route_labels_max=2)
    for route in ("/v1/a", "/v1/b", "/v1/c", "/v1/d"):
        chat(m, route=route)
    routes = {
        dict(labels)["route"]
        for (name, labels), _ in scrape(m).items()
        if name == "openai_forward_request_duration_seconds_count"
    }
    assert routes == {"/v1/a", "/v1/b", "other"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=40))
def test_any_model_names_keep_the_exposition_parseable_and_bounded(models: list[str]) -> None:
    """Whatever clients send as a model (quotes, newlines, backslashes, any script): the
    scrape parses, every request is counted once, and there are at most cap + 1 labels."""
    m = Metrics(model_labels_max=5)
    for model in models:
        chat(m, model=model)
    s = scrape(m)
    counts = {
        dict(labels)["model"]: v
        for (name, labels), v in s.items()
        if name == "openai_forward_requests_total"
    }
    assert sum(counts.values()) == len(models)
    assert len(counts) <= 6
    admitted = set(counts) - {"other"}
    assert admitted <= set(models)


durations = st.one_of(
    st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: that bucket, as observe() does
    st.floats(min_value=-1.0, max_value=1e5, allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(durations, st.booleans()), min_size=1, max_size=60))
def test_buffered_histograms_equal_prometheus_observe(ops: list[tuple[float, bool]]) -> None:
    """Buckets, count and sum after buffering and flushing at any points are those of a
    prometheus_client Histogram that observed each value."""
    m = Metrics()
    registry = CollectorRegistry()
    reference = Histogram("ref_seconds", "", registry=registry, buckets=LATENCY_BUCKETS)
    for duration, flush in ops:
        chat(m, duration_s=duration)
        reference.observe(duration)
        if flush:
            m.flush()
    ours = scrape(m)
    theirs: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            theirs[s.name, frozenset(s.labels.items())] = s.value
    route = {"route": "/v1/chat/completions", "upstream": "openai"}
    name = "openai_forward_request_duration_seconds"
    for bound in [*LATENCY_BUCKETS, math.inf]:
        le = floatToGoString(bound)
        expected = value(theirs, "ref_seconds_bucket", le=le)
        assert value(ours, f"{name}_bucket", **route, le=le) == expected
    assert value(ours, f"{name}_count", **route) == len(ops)
    total = value(theirs, "ref_seconds_sum")
    scale = sum(abs(d) for d, _ in ops)  # the order of additions differs: rounding only
    assert value(ours, f"{name}_sum", **route) == pytest.approx(total, abs=1e-12 * scale + 1e-12)


def test_key_states_are_one_hot_and_follow_the_pool() -> None:
    m = Metrics()
    m.key_pool([("openai", "key-0badf00d", "ready"), ("openai", "key-12345678", "cooling")])
    s = scrape(m)
    name = "openai_forward_upstream_key_state"

    def states(key_id: str, samples: Samples) -> dict[str, float | None]:
        return {
            state: value(samples, name, upstream="openai", key_id=key_id, state=state)
            for state in ("ready", "cooling", "quarantined")
        }

    assert states("key-0badf00d", s) == {"ready": 1, "cooling": 0, "quarantined": 0}
    assert states("key-12345678", s) == {"ready": 0, "cooling": 1, "quarantined": 0}
    m.key_pool([("openai", "key-0badf00d", "quarantined")])  # the other key left the pool
    s = scrape(m)
    assert states("key-0badf00d", s) == {"ready": 0, "cooling": 0, "quarantined": 1}
    assert states("key-12345678", s) == {"ready": None, "cooling": None, "quarantined": None}


def test_key_pool_refuses_unknown_states_and_secret_looking_ids() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="not one of"):
        m.key_pool([("openai", "key-0badf00d", "broken")])
    secret = "sk-proj-0123456789abcdefABCDEF0123456789"
    with pytest.raises(ValueError, match="secret") as caught:
        m.key_pool([("openai", secret, "ready")])
    assert secret not in str(caught.value)
    with pytest.raises(ValueError, match="secret"):
        m.key_pool([("openai", "sk-1", "ready")])
    body, _ = m.render(None)
    assert b"sk-" not in body


def test_exposition_shows_what_was_flushed_and_render_flushes() -> None:
    m = Metrics()
    chat(m, cache="hit")
    m.request_started()
    body, _ = m.exposition(None)
    assert b'openai_forward_cache_requests_total{result="hit"} 0.0' in body
    assert b"openai_forward_requests_in_flight 0.0" in body
    m.flush()
    body, _ = m.exposition(None)
    assert b'openai_forward_cache_requests_total{result="hit"} 1.0' in body
    assert b"openai_forward_requests_in_flight 1.0" in body


def test_render_speaks_openmetrics_when_asked() -> None:
    m = Metrics()
    chat(m)
    accept = b"application/openmetrics-text; version=1.0.0, text/plain;q=0.5"
    body, content_type = m.render(accept)
    assert content_type.startswith(b"application/openmetrics-text")
    names = {f.name for f in openmetrics_families(body.decode())}
    assert {"openai_forward_requests", "openai_forward_request_duration_seconds"} <= names
    _, plain = m.render(b"text/plain")
    assert plain.startswith(b"text/plain")


def test_info_process_figures_and_no_created_series_in_one_process() -> None:
    m = Metrics()
    chat(m)
    assert not m.multiprocess
    s = scrape(m)
    assert value(s, "openai_forward_info", version=__version__) == 1
    names = {name for name, _ in s}
    assert "python_info" in names
    assert "process_cpu_seconds_total" in names or os.name != "posix"
    assert not [n for n in names if n.endswith("_created")]


def test_setup_for_one_worker_keeps_values_in_memory() -> None:
    os.environ[metricsdir.ENV] = "/nonexistent"
    metrics.setup(1, None)
    assert metricsdir.ENV not in os.environ
    assert prometheus_client.values.ValueClass is MutexValue
    assert metricsdir.directory() is None


def test_setup_for_workers_switches_the_value_class_even_after_import() -> None:
    """prometheus_client is imported by now: setup still makes new values mmap-backed, and
    teardown puts the in-memory ones back."""
    metrics.setup(2, None)
    try:
        directory = metricsdir.directory()
        assert directory is not None and os.environ[metricsdir.ENV] == directory
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert prometheus_client.values.ValueClass is not MutexValue
    finally:
        metrics.teardown()
    assert not os.path.exists(directory)
    assert metricsdir.ENV not in os.environ
    assert prometheus_client.values.ValueClass is MutexValue


def test_setup_with_a_directory_empties_only_its_metric_files(tmp_path: Path) -> None:
    target = os.path.join(tmp_path, "metrics")
    os.makedirs(target, mode=0o755)
    for name in ("counter_123.db", "gauge_livesum_123.db", "notes.txt"):
        with open(os.path.join(target, name), "w") as f:
            f.write("x")
    metrics.setup(4, target)
    try:
        assert sorted(os.listdir(target)) == ["notes.txt"]
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    finally:
        metrics.teardown()
    assert os.path.isdir(target)  # the caller's directory stays


def test_setup_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = os.path.join(tmp_path, "a-file")
    with open(target, "w") as f:
        f.write("x")
    with pytest.raises((ValueError, FileExistsError)):
        metrics.setup(2, target)
