"""Usage accounting: one record per request, written once, whatever way the request ends.

A worker's :class:`Meter` owns the state store (limits), the admission policy and the
record writer. Each forwarded request gets an :class:`Account`: the relay feeds it the
response head and body (an observer that finds the upstream's usage without parsing what it
only forwards) and calls :meth:`Meter.finish` exactly once at the end, which settles the
limits with the real usage and queues the usage row (written to SQLite off the event loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .admission import Admission, Charge, settle_deltas, usage_cost
from .eventlog import Capture, EventLog, log_target
from .limitconfig import price_for
from .records import RecordWriter, usage_row
from .usage import KEEP, JsonUsage, StreamUsage, Usage

if TYPE_CHECKING:
    from .body import RequestFacts
    from .cache import Entry
    from .config import Config
    from .http1 import Request
    from .keystore import ForwardKey
    from .limitconfig import Price
    from .limits import Bucket, Decision
    from .metrics import Metrics

    Plan = tuple[list[Bucket], float, float, Price | None]

log = logging.getLogger("openai_forward")

# POST endpoints whose bodies and answers carry tokens
TOKEN_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
)
# whose conversations the conversation log can hold
CONVERSATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# where the gateway may add stream_options.include_usage to learn a stream's usage
USAGE_OPTION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class Account:
    """The accounting state of one request."""

    __slots__ = (
        "body",
        "cache",
        "capture",
        "capture_cap",
        "charge",
        "client_closed",
        "done",
        "encoding",
        "facts",
        "final",
        "hit",
        "key_id",
        "log_body",
        "observer",
        "path",
        "rate_lines",
        "request_id",
        "route",
        "sse",
        "started",
        "strip",
        "ts",
        "ttfb",
        "upstream",
    )

    def __init__(self, request_id: str, path: str, route: str, started: float) -> None:
        self.request_id = request_id
        self.ts = time.time()
        self.started = started
        self.path = path
        self.route = route
        self.body: bytes | None = None  # a token request's JSON body, parsed only if needed
        self.facts: RequestFacts | None = None
        self.observer: JsonUsage | StreamUsage | None = None
        self.strip = False  # the gateway asked for stream usage: hide it from the client
        self.charge: Charge | None = None
        self.rate_lines: list[bytes] | None = None
        self.ttfb: float | None = None
        self.upstream: str | None = None
        self.key_id: str | None = None
        self.client_closed = False
        self.done = False
        self.sse = False  # the answer is an event stream
        self.encoding: bytes | None = None  # its content-encoding, once it has begun
        self.cache: str | None = None  # "hit" or "miss" when the request took part
        self.hit: Entry | None = None  # the cache entry replayed instead of forwarding
        self.final: tuple[Usage, str | None] | None = None  # usage and model, once known
        self.log_body: bytes | None = None  # the body, when its conversation is logged
        self.capture_cap = 0  # answer bytes kept for the conversation log
        # the answer's pieces for the conversation log when its usage observer does not
        # keep them itself (an encoded answer, or one without an observer)
        self.capture: Capture | None = None

    def request_facts(self) -> RequestFacts | None:
        """The body's facts, parsed on first use (most requests never need them: the
        answer names its model and usage)."""
        if self.facts is None and self.body is not None:
            from .body import BodyError, read_facts

            try:
                self.facts = read_facts(self.body)
            except BodyError:
                self.body = None
        return self.facts

    def on_head(self, status: int, sse: bool, encoding: bytes) -> None:
        """The upstream answered: pick the observer that will find its usage (and keep the
        answer's pieces, when its conversation is logged)."""
        self.sse = sse
        self.encoding = encoding
        self.observer = None
        logged = self.log_body is not None
        if status >= 300 or (self.body is None and self.facts is None):
            if logged and status < 300:  # (an error's reply is not logged: nothing to keep)
                self.capture = Capture(self.capture_cap)
            return
        if sse:
            keep = self.capture_cap if logged and self.capture_cap > KEEP else KEEP
            self.observer = StreamUsage(self.strip, keep)
            return
        json = self.observer = JsonUsage(encoding, self.capture_cap if logged else 0)
        if logged and json.kept is None:  # encoded: the relay keeps the pieces as they come
            self.capture = Capture(self.capture_cap)


class Meter:
    """Usage records, limits and budgets of one worker."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        store: Any,
        metrics: Metrics | None = None,
    ) -> None:
        self.loop = loop
        self.config = config
        self.recording = config.usage
        self.writer = RecordWriter(config.database, interval=config.usage_flush_interval)
        self.events = EventLog(config)
        self.logging = self.events.active
        self.metrics = metrics
        # whether every request needs an Account (else only limited ones do)
        self.observing = self.recording or self.logging or metrics is not None
        self.capture_cap = config.conversation_max_bytes
        self.conversing = log_target(config.conversation_log) is not None
        self._chosen = bool(config.conversation_keys or config.conversation_routes)
        # every request to a conversation path is logged: no per-request choice to make
        self.every_conversation = self.conversing and not self._chosen
        self.admission = Admission(config)
        self.store = store
        # request ids: a random prefix per worker and a counter (cheap, and sequential in
        # the database's index)
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._settling: set[asyncio.Task[None]] = set()
        # concurrency leases held in a shared store, renewed while their requests run
        self.leases: dict[int, Decision] = {}
        self._renewing: asyncio.Task[None] | None = None

    def account(self, path: str, route: str) -> Account:
        """A new request's accounting state."""
        request_id = f"req_gw_{self._id_prefix}{next(self._ids):08x}"
        if self.metrics is not None:
            self.metrics.request_started()
        return Account(request_id, path, route, time.perf_counter())

    def converses(self, req: Request, route: Any) -> bool:
        """Whether the conversation log keeps this request (its route and key opted in)."""
        if not self.conversing or req.path not in CONVERSATION_PATHS:
            return False
        if not self._chosen:
            return True
        config = self.config
        if config.conversation_keys:
            identity = req.identity
            if identity is None or not (
                identity.name in config.conversation_keys or identity.id in config.conversation_keys
            ):
                return False
        if config.conversation_routes:
            from .auth import route_matches

            names = [t.name for t in route.targets]
            paths = (route.prefix.rstrip("/") + req.path,)
            return route_matches(config.conversation_routes, names, paths)
        return True

    def start(self) -> None:
        self.events.start(self.loop)
        if self.recording:
            self.writer.start(self.loop)
            # tiktoken may download its encodings: a daemon thread, never the event loop,
            # and never a reason to wait at exit
            threading.Thread(target=_preload_encodings, name="tiktoken", daemon=True).start()
        if self.store is not None and self.store.is_async:
            self._renewing = self.loop.create_task(self._renew_leases())

    def hold(self, decision: Decision) -> None:
        """Keep the concurrency leases of an admitted request alive until it settles."""
        store = self.store
        if (
            store is not None
            and store.is_async
            and any(s.bucket.kind == "concurrent" for s in decision.states)
        ):
            self.leases[id(decision)] = decision

    async def _renew_leases(self) -> None:
        """A lease expires LEASE_SECONDS after its last renewal (so a crashed instance's
        leases free themselves); a stream that lasts longer keeps its own."""
        from .admission import LEASE_SECONDS

        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if self.leases and self.store is not None:
                try:
                    await self.store.renew(list(self.leases.values()))
                except Exception as exc:
                    log.warning("could not renew concurrency leases: %s", type(exc).__name__)

    async def aclose(self) -> None:
        """Flush every pending row (graceful stop: no row lost) and close the store."""
        if self._renewing is not None:
            self._renewing.cancel()
        if self._settling:
            await asyncio.wait(self._settling, timeout=1.0)
        if self.recording:
            await self.writer.aclose()
        await self.events.aclose()
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()

    def has_budget(self, identity: ForwardKey) -> bool:
        return bool(self.admission.limits_of(identity)[1])

    async def load_seeds(self, ids: list[str]) -> None:
        """Budgets start from what the database says each key already spent this period."""
        from .admission import periods
        from .records import RecordStore

        if not ids or self.store is None or not os.path.exists(self.config.database):
            return
        span = periods(time.time())
        spans = [("d" + span.day, span.day_start), ("m" + span.month, span.month_start)]
        spans.append(("total", 0.0))

        def read() -> dict[str, float]:
            store = RecordStore(self.config.database)
            try:
                seeds: dict[str, float] = {}
                for period_id, since in spans:
                    for key_id, (tokens, cost) in store.spent(ids, since).items():
                        seeds[f"key:{key_id}|budget|tokens|{period_id}"] = float(tokens)
                        seeds[f"key:{key_id}|budget|cost|{period_id}"] = float(cost or 0.0)
                return seeds
            finally:
                store.close()

        try:
            self.admission.seeds = await self.loop.run_in_executor(None, read)
        except Exception as exc:
            log.warning("could not read past spending for budgets: %s", type(exc).__name__)

    # admission

    def plan(
        self, req: Request, facts: RequestFacts | None, body: bytes | None = None
    ) -> Plan | None:
        """The buckets a request fills and what it reserves; None when no limit applies."""
        plan = self.admission.buckets(req, facts, body)
        return plan if plan[0] else None

    # the end of a request

    def finish(
        self,
        req: Request,
        acct: Account,
        status: int,
        error_code: str | None = None,
        upstream_key: str | None = None,
    ) -> None:
        """Settle the limits and queue the usage row; runs once per request."""
        if acct.done:
            return
        acct.done = True
        usage, model = self._usage(acct, status)
        acct.final = usage, model
        hit = acct.hit is not None
        charge = acct.charge
        cost: float | None = None
        if charge is not None:
            price = charge.price
            if price is None and model is not None:
                price = price_for(self.config.prices, model)
            cost = usage_cost(price, usage) if price is not None and not hit else None
            self._settle(charge, 0 if hit else usage.total, cost or 0.0)
        elif self.config.prices and model is not None and not hit:
            cost = usage_cost(price_for(self.config.prices, model), usage)
        now = time.perf_counter()  # the loop clock ticks in ms: too coarse here
        metrics = self.metrics
        if metrics is not None:
            metrics.request_ended()
            if acct.sse:
                metrics.stream_ended()
            metrics.request(
                acct.route,
                acct.upstream or "",
                model or "",
                status,
                now - acct.started,
                None if acct.ttfb is None else acct.ttfb - acct.started,
                usage.prompt_tokens,
                usage.completion_tokens,
                acct.cache,
            )
        if not self.recording and not self.logging:
            return
        identity: ForwardKey | None = req.identity
        # the access log's line, nearly: see records.usage_row (a literal: a call costs more)
        row = {
            "time": acct.ts,
            "request_id": acct.request_id,
            "client_ip": req.client_ip or req.client.peer,
            "method": req.method,
            "path": acct.path,
            "route": acct.route,
            "status": status,
            "key_id": identity.id if identity is not None else None,
            "key_name": identity.name if identity is not None else None,
            "upstream": acct.upstream,
            "upstream_key": upstream_key,
            "model": model,
            "stream": 1 if acct.sse else 0,
            "ttfb_ms": None if acct.ttfb is None else (acct.ttfb - acct.started) * 1000,
            "duration_ms": (now - acct.started) * 1000,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "estimated": 1 if usage.estimated else 0,
            "cost": cost,
            "cache": acct.cache,
            "client_closed": 1 if acct.client_closed else 0,
            "error_code": error_code,
        }
        if self.recording:
            self.writer.add(row)
        if self.logging:
            # a logged conversation that got an answer: the writer reads it off the account
            self.events.add(row, acct if acct.encoding is not None and acct.log_body else None)

    def refused(self, req: Request, status: int, error_code: str, request_id: str) -> None:
        """A request answered with an error before it had an account (bad head, unknown
        key, no route, body too large): the access log and the metrics still see it."""
        if self.metrics is not None:
            route_name = req.ctx.prefix if req.ctx is not None else "unmatched"
            self.metrics.request(route_name, "", "", status, 0.0, None, 0, 0, None)
        if not self.logging:
            return
        identity: ForwardKey | None = req.identity
        target = (req.target or b"").split(b"?", 1)[0]  # a query may hold a key: not logged
        path = req.path or target.decode("latin-1")
        route = req.ctx.prefix if req.ctx is not None else ""
        row = usage_row(
            request_id,
            time.time(),
            identity.id if identity is not None else None,
            identity.name if identity is not None else None,
            req.client_ip or req.client.peer,
            route,
            path,
            None,
            None,
            None,
            status,
            0,
            0,
            0,
            0,
            False,
            False,
            False,
            None,
            0.0,
            None,
            error_code,
            method=req.method or b"-",
        )
        self.events.add(row, None)

    def _usage(self, acct: Account, status: int) -> tuple[Usage, str | None]:
        """The upstream's own figures when it gave them, else an estimate (marked so)."""
        facts = acct.facts
        model = facts.model if facts is not None else None  # parsed already: use it
        if acct.hit is not None:  # the tokens the entry's answer took: what the hit saved
            e = acct.hit
            saved = Usage(e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.reasoning_tokens)
            return saved, e.model
        observer = acct.observer
        found: Usage | None = None
        if isinstance(observer, StreamUsage):
            found = observer.usage
            model = model or observer.model
        elif isinstance(observer, JsonUsage):
            found, seen_model = observer.result()
            model = model or seen_model
        if found is not None:
            return found, model
        facts = acct.request_facts()
        if status >= 400 and not acct.client_closed and status != 499:
            # nothing was generated; the model is still the one the request named
            return Usage(), model or (facts.model if facts is not None else None)
        if facts is None:
            return Usage(), model  # not a token request, or not JSON
        model = model or facts.model
        try:
            return _estimate(acct, facts, model), model
        except Exception:  # an estimate is a nicety; the row must be written regardless
            log.exception("could not estimate the tokens of request %s", acct.request_id)
            return Usage(estimated=True), model

    def _settle(self, charge: Charge, tokens: float, cost: float) -> None:
        store = self.store
        if store is None or not charge.decision.allowed:
            return
        deltas = settle_deltas(charge, tokens, cost, self.admission.seeds)
        if self.leases:
            self.leases.pop(id(charge.decision), None)
        if not store.is_async:
            store.settle(charge.decision, deltas)
            return
        task = self.loop.create_task(store.settle(charge.decision, deltas))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)


def _preload_encodings() -> None:
    from .tokens import preload

    loaded = preload(["gpt-4o", "gpt-4"])  # o200k_base and cl100k_base
    log.debug("token estimates: %s", loaded)


def _estimate(acct: Account, facts: RequestFacts, model: str | None) -> Usage:
    from .tokens import count_text, estimate_prompt

    prompt = estimate_prompt(facts.obj, model)
    completion = 0
    observer = acct.observer
    if isinstance(observer, StreamUsage) and observer.seen_bytes:
        completion = count_text(observer.completion_text(), model)
        if observer.kept_bytes and observer.seen_bytes > observer.kept_bytes:
            completion = round(completion * observer.seen_bytes / observer.kept_bytes)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)
