"""Prometheus metrics: one ``Metrics`` per worker process, summed over the workers at scrape.

With one worker the metrics live in this process's registry. With several, the supervisor
calls ``setup`` before it forks: prometheus_client then keeps every value in a per-pid mmap
file under a private directory, and ``render`` in whichever worker is scraped merges all the
files (counters and histograms summed, live gauges over the live workers only).

Recording is buffered: ``request`` adds to plain numbers in this process (under half a
microsecond, where prometheus_client's children cost 4 µs a request, 9 with mmap files), and
``flush`` hands the sums to prometheus_client. ``render`` flushes first, so one process is
exact at every scrape; with several workers, the others are as fresh as their last ``flush``.

The supervisor's part (``setup``, ``teardown``, ``worker_died``) is in ``metricsdir`` and
re-exported here. prometheus_client is imported only inside functions, after ``setup``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from . import __version__
from .keypool import COOLING, QUARANTINED, READY
from .metricsdir import FilesCollector, directory, setup, teardown, worker_died

__all__ = ["Metrics", "setup", "teardown", "worker_died"]

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM calls: a cached or tiny answer in milliseconds, a long generation in minutes.
LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)
MODEL_LABELS_MAX = 200
ROUTE_LABELS_MAX = 100
LABEL_CHARS_MAX = 100
OTHER = "other"
KEY_STATES = (READY, COOLING, QUARANTINED)
_GaugeMode = Literal["livesum", "livemax"]


class _Timings:
    """One histogram child and the observations not yet handed to it."""

    __slots__ = ("child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def flush(self) -> None:
        # Histogram has no public "observe n times": add to its per-bucket values (not
        # cumulative, as observe() keeps them) and its sum; tests check the exposition.
        buckets: list[Any] = self.child._buckets
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0


class _Series:
    """One (route, upstream, model, status): its counters and what is not flushed yet."""

    __slots__ = ("completion", "counters", "duration", "prompt", "requests", "ttfb")

    def __init__(
        self, counters: tuple[Counter, Counter, Counter], timings: tuple[_Timings, _Timings]
    ) -> None:
        self.counters = counters  # requests, prompt tokens, completion tokens
        self.duration, self.ttfb = timings
        self.requests = self.prompt = self.completion = 0

    def flush(self) -> None:
        requests, prompt, completion = self.counters
        requests.inc(self.requests)
        if self.prompt:
            prompt.inc(self.prompt)
        if self.completion:
            completion.inc(self.completion)
        self.requests = self.prompt = self.completion = 0


class Metrics:
    """The gateway's metrics in this worker; create one per process, after the fork, and use
    it from one thread (the event loop's): the buffers are plain numbers without locks.

    Recording methods never block and never raise for the label values they receive, except
    ``key_pool`` for an unknown state or a key id that looks like a secret. Label values other
    than ``model`` and ``route`` must come from small fixed sets (configured upstream names,
    error kinds named in code); ``model`` and ``route`` are capped per process.
    """

    def __init__(
        self, model_labels_max: int = MODEL_LABELS_MAX, route_labels_max: int = ROUTE_LABELS_MAX
    ) -> None:
        import prometheus_client as pc

        # A `_created` series per counter and histogram child would double the series, and
        # the multi-process files cannot hold them: leave them out in both modes alike.
        pc.disable_created_metrics()  # type: ignore[no-untyped-call]
        self._directory = directory()
        own = None if self._directory else pc.CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return pc.Counter(name, doc, labels, registry=own)

        def gauge(name: str, doc: str, mode: _GaugeMode, *labels: str) -> Gauge:
            return pc.Gauge(name, doc, labels, registry=own, multiprocess_mode=mode)

        def histogram(name: str, doc: str) -> Histogram:
            labels = ("route", "upstream")
            return pc.Histogram(name, doc, labels, registry=own, buckets=LATENCY_BUCKETS)

        self._requests = counter(
            "openai_forward_requests",
            "Requests answered, by route, upstream, model and HTTP status.",
            *("route", "upstream", "model", "status"),
        )
        self._duration = histogram(
            "openai_forward_request_duration_seconds",
            "Seconds from the request's arrival to the end of its answer.",
        )
        self._ttfb = histogram(
            "openai_forward_ttfb_seconds",
            "Seconds from the request's arrival to the upstream's first byte.",
        )
        self._tokens = counter(
            "openai_forward_tokens",
            "Tokens used, by upstream, model and direction (prompt or completion).",
            *("upstream", "model", "direction"),
        )
        cache = counter("openai_forward_cache_requests", "Cacheable requests, by result.", "result")
        self._cache_hit, self._cache_miss = cache.labels("hit"), cache.labels("miss")
        self._upstream_errors = counter(
            "openai_forward_upstream_errors",
            "Failed upstream attempts, by upstream and kind (connect, timeout, 5xx, 429, ...).",
            *("upstream", "kind"),
        )
        self._limited = counter(
            "openai_forward_limit_rejections",
            "Requests refused by a limit, by scope (key, ip, global, budget) and kind.",
            *("scope", "kind"),
        )
        # livesum: the gateway's total, and a dead worker's count disappears with it.
        self._in_flight_gauge = gauge(
            "openai_forward_requests_in_flight", "Requests being answered now.", "livesum"
        )
        self._streams_gauge = gauge(
            "openai_forward_streams_in_flight", "Streamed answers being relayed now.", "livesum"
        )
        # livemax: each worker has its own view of the pool; 1 means "at least one live
        # worker sees the key in this state", so a key cooling anywhere shows as cooling.
        self._key_state = gauge(
            "openai_forward_upstream_key_state",
            "1 for a key's current state (ready, cooling, quarantined), 0 for the others.",
            "livemax",
            *("upstream", "key_id", "state"),
        )
        info = gauge("openai_forward_info", "1; names the version.", "livemax", "version")
        info.labels(__version__).set(1)
        self._scrape = own or pc.CollectorRegistry()
        _add_collectors(self._scrape, self._directory)
        self._in_flight = self._streams = self._hits = self._misses = 0
        self._gauges_written = (0, 0)  # in flight, streams: a write only when they change
        self._models: dict[str, str] = {}
        self._models_max = model_labels_max
        self._routes: dict[str, str] = {}
        self._routes_max = route_labels_max
        self._series: dict[tuple[str, str, str, int], _Series] = {}
        self._timings: dict[tuple[str, str], tuple[_Timings, _Timings]] = {}
        self._errors: dict[tuple[str, str], Counter] = {}
        self._limits: dict[tuple[str, str], Counter] = {}
        self._keys: dict[tuple[str, str], tuple[str, tuple[Gauge, ...]]] = {}

    @property
    def multiprocess(self) -> bool:
        """True when the values are summed over the workers' files at scrape."""
        return self._directory is not None

    def request(
        self,
        route: str,
        upstream: str,
        model: str,
        status: int,
        duration_s: float,
        ttfb_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cache: str | None,
    ) -> None:
        """Record one answered request. ``model`` may be "" (none); past the per-process cap
        of distinct models (or routes), or longer than 100 characters, it counts as "other".
        ``ttfb_s`` None: no byte came from upstream. ``cache``: "hit", "miss" or None (not
        cacheable). Token counts of 0 or less record nothing."""
        label = self._models.get(model)
        if label is None:
            label = _admit(self._models, model, self._models_max)
        path = self._routes.get(route)
        if path is None:
            path = _admit(self._routes, route, self._routes_max)
        series = self._series.get((path, upstream, label, status))
        if series is None:
            series = self._new_series(path, upstream, label, status)
        series.requests += 1
        if prompt_tokens > 0:
            series.prompt += prompt_tokens
        if completion_tokens > 0:
            series.completion += completion_tokens
        timings = series.duration
        timings.counts[bisect_left(LATENCY_BUCKETS, duration_s)] += 1
        timings.total += duration_s
        if ttfb_s is not None:
            timings = series.ttfb
            timings.counts[bisect_left(LATENCY_BUCKETS, ttfb_s)] += 1
            timings.total += ttfb_s
        if cache is not None:
            if cache == "hit":
                self._hits += 1
            else:
                self._misses += 1

    def upstream_error(self, upstream: str, kind: str) -> None:
        """Count one failed upstream attempt; ``kind`` like "connect", "timeout", "5xx"."""
        counter = self._errors.get((upstream, kind))
        if counter is None:
            counter = self._errors[upstream, kind] = self._upstream_errors.labels(upstream, kind)
        counter.inc()

    def limited(self, scope: str, kind: str) -> None:
        """Count one request refused by a limit: ``scope`` "key" | "ip" | "global" | "budget",
        ``kind`` "requests" | "tokens" | "concurrent" | "quota"."""
        counter = self._limits.get((scope, kind))
        if counter is None:
            counter = self._limits[scope, kind] = self._limited.labels(scope, kind)
        counter.inc()

    def request_started(self) -> None:
        """One more request in flight; pair with exactly one ``request_ended``."""
        self._in_flight += 1

    def request_ended(self) -> None:
        """One request fewer in flight."""
        self._in_flight -= 1

    def stream_started(self) -> None:
        """One more streamed answer in flight; pair with exactly one ``stream_ended``."""
        self._streams += 1

    def stream_ended(self) -> None:
        """One streamed answer fewer in flight."""
        self._streams -= 1

    def key_pool(self, states: Iterable[tuple[str, str, str]]) -> None:
        """Set the key-state gauges from the whole current pool view: (upstream, key id,
        state) per key, state in ready | cooling | quarantined. Keys absent from ``states``
        drop out (all 0 in multi-process mode). Raises ``ValueError`` for another state, or a
        key id that looks like a secret (longer than 32 characters, or starting "sk-")."""
        seen = set()
        for upstream, key_id, state in states:
            seen.add((upstream, key_id))
            self._set_key(upstream, key_id, state)
        for gone in self._keys.keys() - seen:
            self._drop_key(gone)

    def flush(self) -> None:
        """Hand what was recorded since the last flush to prometheus_client (in multi-process
        mode: write it to this worker's files). Call about once a second and before the
        worker exits; ``render`` calls it too."""
        for series in self._series.values():
            if series.requests:
                series.flush()
        for pair in self._timings.values():
            for timings in pair:
                if timings.total or any(timings.counts):
                    timings.flush()
        if self._gauges_written != (self._in_flight, self._streams):
            self._in_flight_gauge.set(self._in_flight)
            self._streams_gauge.set(self._streams)
            self._gauges_written = (self._in_flight, self._streams)
        if self._hits:
            self._cache_hit.inc(self._hits)
            self._hits = 0
        if self._misses:
            self._cache_miss.inc(self._misses)
            self._misses = 0

    def render(self, accept_header: bytes | None) -> tuple[bytes, bytes]:
        """``flush``, then ``exposition``: the answer to a scrape, on the event loop."""
        self.flush()
        return self.exposition(accept_header)

    def exposition(self, accept_header: bytes | None) -> tuple[bytes, bytes]:
        """(body, Content-Type) as of the last ``flush``: OpenMetrics when the Accept header
        asks for it, else the Prometheus text format. Safe to run in another thread while
        the loop records (it reads prometheus_client's values and files, not the buffers).
        Multi-process mode parses every worker's files: milliseconds, growing with workers
        and series."""
        from prometheus_client.exposition import choose_encoder

        accept = accept_header.decode("latin-1") if accept_header else ""
        encoder, content_type = choose_encoder(accept)
        return encoder(self._scrape), content_type.encode("latin-1")

    def _new_series(self, route: str, upstream: str, model: str, status: int) -> _Series:
        timings = self._timings.get((route, upstream))
        if timings is None:
            timings = self._timings[route, upstream] = (
                _Timings(self._duration.labels(route, upstream)),
                _Timings(self._ttfb.labels(route, upstream)),
            )
        counters = (
            self._requests.labels(route, upstream, model, str(status)),
            self._tokens.labels(upstream, model, "prompt"),
            self._tokens.labels(upstream, model, "completion"),
        )
        series = self._series[route, upstream, model, status] = _Series(counters, timings)
        return series

    def _set_key(self, upstream: str, key_id: str, state: str) -> None:
        if state not in KEY_STATES:
            raise ValueError(f"key state {state!r} is not one of {', '.join(KEY_STATES)}")
        known = self._keys.get((upstream, key_id))
        if known is not None and known[0] == state:
            return  # unchanged: in multi-process mode this spares three mmap writes
        if known is None:
            if len(key_id) > 32 or key_id.startswith("sk-"):
                raise ValueError("key_id looks like a secret: pass the key pool's ids")
            gauges = tuple(self._key_state.labels(upstream, key_id, s) for s in KEY_STATES)
        else:
            gauges = known[1]
        for name, gauge in zip(KEY_STATES, gauges, strict=True):
            gauge.set(1 if name == state else 0)
        self._keys[upstream, key_id] = (state, gauges)

    def _drop_key(self, key: tuple[str, str]) -> None:
        _, gauges = self._keys.pop(key)
        for state, gauge in zip(KEY_STATES, gauges, strict=True):
            gauge.set(0)  # what stays in this worker's file once the child is gone
            self._key_state.remove(*key, state)


def _add_collectors(registry: CollectorRegistry, directory: str | None) -> None:
    import prometheus_client as pc

    if directory is None:
        # One process: its own process and platform figures describe the whole gateway.
        pc.ProcessCollector(registry=registry)
        pc.PlatformCollector(registry=registry)
        pc.GCCollector(registry=registry)
    else:
        # Several: those figures would describe only the worker that was scraped.
        registry.register(FilesCollector(directory))


def _admit(seen: dict[str, str], value: str, cap: int) -> str:
    """The label for a value not seen yet: itself while under ``cap``, else "other"."""
    if len(seen) >= cap or len(value) > LABEL_CHARS_MAX:
        return OTHER
    seen[value] = value
    return value
