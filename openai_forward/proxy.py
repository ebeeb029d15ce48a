"""The request path, top to bottom.

``Proxy.begin`` runs when a request head is complete: it makes the path canonical, answers
the health check and sets the body limit. ``Proxy.handle`` then forwards the request, still
inside the same parser callback when a pooled upstream connection is idle (a task only opens
new connections): it writes the filtered head and attaches the streaming body. From there a
:class:`Relay` copies the response to the client from inside the upstream parser's
callbacks, so a chunk reaches the client in the same loop iteration it arrived in, and the
relay's last callback hands the client connection back for its next request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from . import errors
from .access import AccessRules
from .accounting import TOKEN_PATHS, USAGE_OPTION_PATHS, Account, Meter
from .admission import Charge, rate_headers, refusal
from .auth import (
    CREDENTIAL_HEADERS,
    ForwardKeys,
    allowed_model,
    allowed_route,
    strip_query_keys,
)
from .body import BodyError, RequestFacts, read_facts, with_include_usage
from .cache import DIRECTIVE_HEADER, Entry, Recorder, paced
from .caching import ResponseCache, Ticket, chunk, replay_head
from .config import Config, access_rules
from .errors import GatewayError, new_request_id
from .http1 import Request
from .keypool import Key, error_code, retry_after
from .limits import Bucket
from .paths import PathError, canonicalize, split_target, with_v1
from .routing import Route, Router
from .targets import Target, model_list, union_models
from .upstream import Pool, UpstreamConnection

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("openai_forward")

# RFC 9110 §7.6.1 hop-by-hop fields, and the fields the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# the gateway's own request headers (the cache directive) are the gateway's alone
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"forwarded",
    b"x-openai-forward-cache",
}
FORWARD_KEY_DROP = REQUEST_DROP | CREDENTIAL_HEADERS | {b"openai-organization", b"openai-project"}

UPLOAD_PREFIXES = (
    "/v1/files",
    "/v1/uploads",
    "/v1/audio/",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/videos",
)

_NO_BODY_STATUS = frozenset({204, 304})
METRICS = object()  # req.ctx of a scrape of /metrics
# upstream failures by kind, for the metrics
_ERROR_KINDS = {
    "upstream_connect_error": "connect",
    "upstream_timeout": "timeout",
    "upstream_disconnected": "reset",
    "upstream_protocol_error": "protocol",
}
_KEY_FAILURES = frozenset({401, 403, 429})  # answers that say something about the key


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Field names listed in Connection headers that are not already hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens - HOP_BY_HOP)


def _drop_named(lines: list[bytes], start: int, names: frozenset[bytes]) -> list[bytes]:
    """``lines[start:]`` are "name: value" lines; drop those whose name is in ``names``."""
    kept = [ln for ln in lines[start:] if ln.split(b":", 1)[0].lower() not in names]
    return lines[:start] + kept


class Proxy:
    """The application the server protocol drives: one per worker, no per-request state."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        state: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.loop = loop
        self.targets: dict[str, Target] = {}
        for up in config.routes:
            proxy_url = up.proxy or config.proxy
            pool = Pool(up.upstream, config, loop, proxy_url or None)
            self.targets[up.name] = Target(up, pool, config.key_quarantine)
        for target in self.targets.values():
            target.fallbacks = tuple(self.targets[name] for name in target.config.fallbacks)
        self.router = Router(config.routes)
        self.health_path = config.health_path
        self.forwarded_for = config.forwarded_for
        self.body_limit = config.max_body_size
        self.upload_limit = config.max_upload_size
        self.max_fallbacks = config.max_fallbacks
        self.forward = ForwardKeys(config)
        self.rules: AccessRules = access_rules(config)
        self.check_ip = self.rules.active
        self.resolve_ip = self.check_ip or bool(config.trusted_proxies)
        self.meter = Meter(config, loop, state, metrics)
        self.cache = ResponseCache(config, loop)
        self._seeding: asyncio.Task[None] | None = None
        # /metrics on this port: only with an admin token (else it has its own address)
        self.metrics_path = config.metrics_path
        self.metrics_here = metrics is not None and not config.metrics_listen
        self.admin_token = config.admin_token.encode()
        self._ticking: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Background work of a running worker: following the forward-key store, writing
        usage records."""
        self.forward.start(self.loop)
        self.meter.start()
        self.cache.start()
        if self.meter.store is not None:
            self._seeding = self.loop.create_task(self._seed_budgets())
        if self.meter.metrics is not None:
            self._ticking = self.loop.create_task(self._tick_metrics())

    async def _tick_metrics(self) -> None:
        """Once a second: the key pools' state, and this worker's counts, to the metrics."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self.flush_metrics()
            except Exception:
                log.exception("metrics: could not update")

    def flush_metrics(self) -> None:
        metrics = self.meter.metrics
        if metrics is None:
            return
        now = self.loop.time()
        metrics.key_pool(
            (target.name, key.id, key.state(now))
            for target in self.targets.values()
            if target.keys is not None
            for key in target.keys.keys
        )
        metrics.flush()

    async def serve_metrics(self, req: Request) -> None:
        """Answer a scrape: this worker's counts flushed, then every worker's, rendered off
        the event loop (a multi-worker scrape reads every worker's files)."""
        metrics = self.meter.metrics
        assert metrics is not None
        accept = next((v for n, v in req.headers if n.lower() == b"accept"), None)
        try:
            self.flush_metrics()
            body, ctype = await self.loop.run_in_executor(None, metrics.exposition, accept)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("metrics: could not render")
            error = GatewayError(500, "internal_error", "The metrics could not be rendered.")
            req.client.write(error.response(new_request_id()))
            req.client.finish(req, reusable=True)
            return
        if req.client.transport is None:
            return
        req.responded = True
        head = b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncache-control: no-store\r\n" % ctype
        head += b"content-length: %d\r\n" % len(body)
        if not req.keep_alive:
            head += b"connection: close\r\n"
        req.client.write(head + b"\r\n" + (b"" if req.method == b"HEAD" else body))
        req.client.finish(req, reusable=req.keep_alive)

    def _metrics_request(self, req: Request) -> None:
        """Check a request for ``metrics_path``: the admin token, a GET."""
        token = None
        for name, value in req.headers:
            if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
        if token is None or not hmac.compare_digest(token, self.admin_token):
            raise GatewayError(
                401, "invalid_admin_token", "The metrics need the admin token as a bearer token."
            )
        if req.method not in (b"GET", b"HEAD"):
            raise GatewayError(405, "method_not_allowed", "Use GET for the metrics.")
        req.ctx = METRICS

    async def _seed_budgets(self) -> None:
        await self.forward.refresh(self.loop)
        budgeted = [k.id for k in self.forward.keys.values() if self.meter.has_budget(k)]
        await self.meter.load_seeds(budgeted)

    def refused(self, req: Request, error: GatewayError, request_id: str) -> None:
        """An error answered before forwarding began: logged and counted all the same."""
        try:
            self.meter.refused(req, error.status, error.code, request_id)
        except Exception:  # a log line must never break the answer
            log.exception("could not log a refused request")

    async def aclose(self) -> None:
        """Stop: flush the usage records and the metrics, then close connections and the key
        store."""
        if self._ticking is not None:
            self._ticking.cancel()
        try:
            self.flush_metrics()
        except Exception:
            log.exception("metrics: could not update")
        await self.cache.aclose()
        await self.meter.aclose()
        self.close()

    def close(self) -> None:
        self.forward.close()
        for target in self.targets.values():
            target.pool.close()

    # at end of headers, synchronously

    def begin(self, req: Request) -> bytes | None:
        """Check the head; return a complete response to send now, or None to forward."""
        try:
            path, query = split_target(req.target)
            path = canonicalize(path)
        except PathError as exc:
            raise errors.bad_request(str(exc), "invalid_path") from None
        if path == self.health_path and req.method in (b"GET", b"HEAD"):
            return _json_response(req, b"200 OK", b'{"status":"ok"}')
        if path == self.metrics_path and self.metrics_here:
            self._metrics_request(req)
            return None
        found = self.router.match(path)
        if found is None:
            raise GatewayError(404, "route_not_found", "No upstream serves this path.")
        if self.resolve_ip:
            req.client_ip = self.client_ip(req)
            if self.check_ip and not self.rules.allowed(req.client_ip):
                raise GatewayError(
                    403, "ip_not_allowed", "Requests from this address are not allowed."
                )
        route, rest = found
        identity = self.forward.identify(req.headers, query)
        forwarded = with_v1(rest) if route.openai else rest
        if identity is not None:
            names = [t.name for t in route.targets]
            as_sent = route.prefix.rstrip("/") + forwarded
            if not allowed_route(identity, names, (path, as_sent)):
                raise GatewayError(403, "route_not_allowed", "This API key may not use this path.")
            req.identity = identity
            query = strip_query_keys(query)  # the forward key stays here
        path = forwarded
        req.path = path
        req.query = query
        req.ctx = route
        req.body_limit = self.upload_limit if path.startswith(UPLOAD_PREFIXES) else self.body_limit
        if req.content_length is not None and req.content_length > req.body_limit:
            raise GatewayError(413, "request_too_large", "The request body is too large.")
        return None

    def client_ip(self, req: Request) -> str:
        """The client's address: the peer, or from X-Forwarded-For behind a trusted proxy."""
        forwarded = [v for n, v in req.headers if n.lower() == b"x-forwarded-for"]
        return self.rules.client_ip(req.client.peer, forwarded)

    def request_head(
        self,
        req: Request,
        target: Target,
        take_key: Callable[[], bytes | None],
        path: str | None = None,
        plain: bool = False,
    ) -> bytes:
        """The head sent upstream: filtered client headers, its Host, body framing, and a
        key: the client's own, or one from ``take_key`` when the client brought none.
        ``plain`` asks for an uncompressed answer (one to store in the cache)."""
        query = req.query.encode() if path is None else b""
        lines = [b"", target.host_line]
        credential: bytes | None = None
        extra: frozenset[bytes] | None = None
        # a forward key, and the account headers it could steer, stay here
        strip = FORWARD_KEY_DROP if req.identity is not None else REQUEST_DROP
        if plain:
            strip = strip | {b"accept-encoding"}
            lines.append(b"accept-encoding: identity")
        for name, value in req.headers:
            lname = name.lower()
            if lname in strip:
                if lname == b"connection":
                    extra = _connection_tokens(req.headers) or None
                continue
            if lname.find(b"_") >= 0 or lname.startswith(b"x-forwarded-"):
                continue
            if lname == b"authorization":
                credential = value
                if target.auth != "bearer":
                    continue  # re-sent below in the upstream's own scheme
            elif lname == target.header_name:
                credential = b""  # the client's key, already in this upstream's scheme
            lines.append(name + b": " + value)
        if extra is not None:
            lines = _drop_named(lines, 2, extra)
        query_key = target.query_key
        if (
            credential is None
            and query_key
            and any(p.startswith(query_key) for p in query.split(b"&"))
        ):
            credential = b""  # the client's key, already in this upstream's scheme
        if credential is None:
            key = take_key()
            header, param = target.credential(key) if key is not None else (None, None)
        elif credential and target.auth != "bearer":
            scheme, _, token = credential.partition(b" ")
            key = token.strip() if scheme.lower() == b"bearer" else credential
            header, param = target.credential(key)
        else:
            header = param = None
        if header is not None:
            lines.append(header)
        if param is not None:
            query = query + b"&" + param if query else param
        if self.forwarded_for and (req.client_ip or req.client.peer):
            lines.append(b"x-forwarded-for: " + (req.client_ip or req.client.peer).encode())
        if path is None:
            if req.chunked:
                lines.append(b"transfer-encoding: chunked")
            elif req.content_length is not None:
                lines.append(b"content-length: %d" % req.content_length)
        target_bytes = target.base + (path or req.path).encode()
        if query:
            target_bytes += b"?" + query
        method = b"GET" if path is not None else req.method
        lines[0] = method + b" " + target_bytes + b" HTTP/1.1"
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    # forwarding

    def handle(self, req: Request) -> None:
        """Forward ``req``. With a pooled connection at hand the request goes out now, in
        this callback; otherwise a task opens a connection first. Never raises.

        The policies, in order: model routing and scope (when the body says which model),
        admission (rate limits, budgets), then the upstream attempt(s)."""
        if req.ctx is METRICS:
            self.loop.create_task(self.serve_metrics(req))
            return
        relay = Relay(self, req)
        req.on_lost = relay.client_lost
        route: Route = req.ctx
        meter = self.meter
        try:
            if meter.observing or meter.admission.applies(req.identity):
                relay.acct = meter.account(req.path, route.prefix)
            if route.by_model and req.method == b"GET" and req.path == "/v1/models":
                relay.task = self.loop.create_task(self.list_models(relay, route))
                return
            if req.has_body and self._wants_body(req, route):
                # the body's model picks the upstream, is checked or is accounted for
                req.buffer_limit = req.body_limit
                req.want_body()
                if req.body_complete:
                    self._with_body(relay, route)
                else:
                    req.on_body_done = lambda: self._with_body(relay, route)
                return
            self._admit(relay, self.targets[route.default.name], None)
        except Exception:
            relay.internal_error()

    def _wants_body(self, req: Request, route: Route) -> bool:
        if self._strict_body(req, route):
            return not _is_multipart(req)  # an upload's model is a form field: not read
        # token endpoints take JSON: no need to look for an upload
        if req.method != b"POST" or req.path not in TOKEN_PATHS:
            return False
        meter = self.meter
        return meter.recording or self.cache.enabled or meter.converses(req, route)

    def _strict_body(self, req: Request, route: Route) -> bool:
        """Whether the request cannot go on without a valid JSON body to read."""
        identity = req.identity
        if route.by_model or (identity is not None and identity.models):
            return True
        admission = self.meter.admission
        return admission.applies(identity) and admission.needs_body(identity)

    def _with_body(self, relay: Relay, route: Route) -> None:
        req = relay.req
        req.on_body_done = None
        try:
            body = b"".join(req.pending or ())
            acct = relay.acct
            if acct is not None and self.meter.converses(req, route):
                acct.log_body = body
                acct.capture_cap = self.meter.capture_cap
            if not self._strict_body(req, route):
                # accounting only: a body that is not a stream is not even parsed (the answer
                # names the model and the usage); a stream may need the usage option added
                target = self.targets[route.default.name]
                if self.cache.wants_body(req):
                    body = self._take_part(relay, route, target, body, None)
                if acct is not None:
                    acct.body = body
                    if body.find(b'"stream"') >= 0:
                        self._ask_for_usage(req, acct, target, body)
                self._admit(relay, target, None)
                return
            try:
                facts = read_facts(body)
            except BodyError as exc:
                raise GatewayError(400, "invalid_json", str(exc)) from None
            model = facts.model
            if model is None and "model" in facts.obj:
                message = "'model' must be a string."
                raise GatewayError(400, "invalid_request", message, param="model")
            if req.identity is not None and not allowed_model(req.identity, model):
                raise GatewayError(
                    403,
                    "model_not_allowed",
                    f"This API key may not use the model '{(model or '')[:200]}'.",
                    param="model",
                )
            target = self.targets[route.pick(model).name]
            if self.cache.wants_body(req):
                forward = self._take_part(relay, route, target, body, facts.obj)
                if forward is not body:  # the caching member is gone
                    body, facts = forward, read_facts(forward)
            if acct is not None and req.path in TOKEN_PATHS:
                acct.body, acct.facts = body, facts
                self._ask_for_usage(req, acct, target, body)
            self._admit(relay, target, facts if req.path in TOKEN_PATHS else None)
        except GatewayError as exc:
            relay.fail_before_response(exc)
        except Exception:
            relay.internal_error()

    def _take_part(
        self, relay: Relay, route: Route, target: Target, body: bytes, obj: dict[str, Any] | None
    ) -> bytes:
        """The request's part in the cache (``relay.ticket``); the body to forward."""
        ticket, forward = self.cache.ticket(relay.req, route, target, body, obj)
        relay.ticket = ticket
        if ticket is not None and relay.acct is not None:
            relay.acct.cache = "miss"  # until a lookup finds it
        if forward is None:
            return body
        _replace_body(relay.req, forward)
        return forward

    def _forward(self, relay: Relay, target: Target) -> None:
        """Admitted: answer from the cache, or send the request upstream."""
        ticket = relay.ticket
        if ticket is None or not ticket.read:
            relay.begin(target)
            return
        entry = self.cache.recall(ticket)
        if entry is not None:  # held in this worker's memory: no store round trip
            relay.replay(target, entry)
            return
        relay.task = self.loop.create_task(self._lookup(relay, target, ticket))

    async def _lookup(self, relay: Relay, target: Target, ticket: Ticket) -> None:
        try:
            entry = await self.cache.lookup(ticket)
        except asyncio.CancelledError:
            return
        relay.task = None
        if relay.client.transport is None:
            return
        try:
            if entry is None:
                relay.begin(target)
            else:
                relay.replay(target, entry)
        except Exception:
            relay.internal_error()

    def _ask_for_usage(self, req: Request, acct: Account, target: Target, body: bytes) -> None:
        """A stream whose client did not ask for its usage: ask for it (and hide it later)."""
        if req.path not in USAGE_OPTION_PATHS:
            return
        config = target.config
        if config.type != "openai" or not config.stream_usage or not self.meter.recording:
            return
        facts = acct.request_facts()
        if facts is not None and facts.stream and not facts.include_usage:
            _replace_body(req, with_include_usage(body, facts))
            acct.strip = True

    def _admit(self, relay: Relay, target: Target, facts: RequestFacts | None) -> None:
        """Rate limits and budgets: reserve, then send; or refuse with 429."""
        meter = self.meter
        store = meter.store
        req = relay.req
        if store is None or not meter.admission.applies(req.identity):
            self._forward(relay, target)
            return
        seeding = self._seeding
        if seeding is not None and not seeding.done() and req.identity and req.identity.budget:
            # a budget must not be judged before the spending recorded so far is known
            relay.task = self.loop.create_task(self._admit_after(seeding, relay, target, facts))
            return
        acct = relay.acct
        plan = meter.plan(req, facts, acct.body if acct is not None else None)
        if plan is None:
            self._forward(relay, target)
            return
        if store.is_async:
            relay.task = self.loop.create_task(self._admit_later(relay, target, plan))
            return
        self._admitted(relay, target, plan, store.admit(plan[0]))

    async def _admit_after(
        self,
        seeding: asyncio.Task[None],
        relay: Relay,
        target: Target,
        facts: RequestFacts | None,
    ) -> None:
        try:
            await asyncio.shield(seeding)
        except asyncio.CancelledError:
            return
        except Exception:
            pass  # logged by the seeding itself; budgets then start from zero
        relay.task = None
        try:
            self._admit(relay, target, facts)
        except Exception:
            relay.internal_error()

    async def _admit_later(self, relay: Relay, target: Target, plan: Any) -> None:
        try:
            decision = await self.meter.store.admit(plan[0])
        except asyncio.CancelledError:
            return
        except Exception:
            relay.internal_error()
            return
        relay.task = None
        if relay.client.transport is None:
            return
        try:
            self._admitted(relay, target, plan, decision)
        except Exception:
            relay.internal_error()

    def _admitted(self, relay: Relay, target: Target, plan: Any, decision: Any) -> None:
        _, tokens, cost, price = plan
        acct = relay.acct
        if acct is not None:
            acct.charge = Charge(decision, tokens, cost, price)
        if not decision.allowed:
            metrics = self.meter.metrics
            if metrics is not None and decision.refused is not None:
                metrics.limited(*_limit_labels(decision.refused))
            relay.fail_before_response(refusal(decision))
            return
        if acct is not None:
            acct.rate_lines = rate_headers(decision.states) or None
        self.meter.hold(decision)
        self._forward(relay, target)

    async def list_models(self, relay: Relay, route: Route) -> None:
        """GET /v1/models on a shared route: the union of what its upstreams serve."""
        req = relay.req
        targets = [self.targets[t.name] for t in route.targets]
        now = self.loop.time()
        heads = [self.request_head(req, t, partial(t.any_key, now), "/v1/models") for t in targets]
        try:
            results = await asyncio.gather(
                *(t.pool.fetch(head) for t, head in zip(targets, heads, strict=True)),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            return
        models = union_models(route, targets, results)
        relay.task = None
        if not models and all(model_list(r) is None for r in results):
            relay.fail_before_response(errors.upstream_connect_error())
            return
        body = json.dumps({"object": "list", "data": models}, separators=(",", ":")).encode()
        req.on_lost = None
        req.responded = True
        relay.client.write(_json_response(req, b"200 OK", body))
        relay.account_end(200)
        relay.client.finish(req, reusable=True)


class Relay:
    """One request's journey: upstream attempt(s) and the copy of the response."""

    __slots__ = (
        "acct",
        "chunked",
        "client",
        "conn",
        "discard",
        "fell_back",
        "head",
        "keep_client",
        "key",
        "observe",
        "origin",
        "out",
        "proxy",
        "req",
        "retried",
        "reused",
        "sse",
        "status",
        "target",
        "task",
        "ticket",
        "tried_keys",
    )

    def __init__(self, proxy: Proxy, req: Request) -> None:
        self.proxy = proxy
        self.req = req
        self.client = req.client
        self.head = b""
        self.target: Target | None = None
        self.origin: Target | None = None  # the upstream picked first; its fallbacks count
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.out: list[bytes] = []
        self.chunked = False
        self.sse = False
        self.keep_client = True
        self.reused = False
        self.retried = False
        self.fell_back = 0
        self.key: Key | None = None  # the pool key this attempt carries
        self.tried_keys: list[Key] = []
        self.discard: bytearray | None = None  # a failed answer read and dropped, to retry
        self.observe: bytearray | None = None  # a relayed 429's body, to learn why
        self.acct: Account | None = None
        self.ticket: Ticket | None = None  # the request's part in the response cache
        self.status = 0

    def begin(self, target: Target) -> None:
        """Send the request to ``target``: now on an idle pooled connection, else once a new
        connection is open."""
        self.target = target
        if self.origin is None:
            self.origin = target
        try:
            plain = self.ticket is not None and self.ticket.write
            self.head = self.proxy.request_head(self.req, target, self._take_key, plain=plain)
        except GatewayError as exc:  # no key of this upstream is usable now
            if not self.fall_back(exc):
                self.fail_before_response(exc)
            return
        conn = target.pool.take()
        if conn is not None:
            self.start(conn, reused=True)
        else:
            self.task = self.proxy.loop.create_task(self.connect())

    def start(self, conn: UpstreamConnection, reused: bool) -> None:
        """Send the head and whatever body has arrived; the rest streams as it comes."""
        req = self.req
        self.conn = conn
        self.reused = reused
        self.client.on_write_pause = conn.client_paused
        conn.on_write_pause = self._upstream_write_pause
        conn.start(self.head, self, req.chunked, req.method == b"HEAD")
        req.attach(conn)
        conn.uncork()
        if self.client.write_paused:  # still full from the previous response
            conn.client_paused(True)

    async def connect(self) -> None:
        """Open a new upstream connection, then start; errors become the response."""
        assert self.target is not None
        pool = self.target.pool
        try:
            conn = await pool.connect()
        except GatewayError as exc:
            self.task = None
            self._count_error(exc)
            if not self.fall_back(exc):
                self.fail_before_response(exc)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            self.internal_error()
            return
        self.task = None
        if self.client.transport is None:  # the client left while we connected
            pool.release(conn)
            return
        try:
            self.start(conn, reused=False)
        except Exception:
            self.internal_error()

    def replay(self, target: Target, entry: Entry) -> None:
        """Answer with a cache entry instead of the upstream: its body, or its stream's
        events in order (paced when ``cache_replay_pace`` is set)."""
        req = self.req
        self.target = target
        acct = self.acct
        if acct is not None:
            acct.upstream = target.name
            acct.hit = entry
            acct.cache = "hit"
            acct.sse = entry.stream
        req.on_body_done = req.on_overflow = None
        req.detach()
        req.responded = True
        self.status = 200
        self.keep_client = req.keep_alive and not (entry.stream and req.version == "1.0")
        head = replay_head(req, entry, acct.rate_lines if acct is not None else None)
        if req.method == b"HEAD":
            self._replayed(head)
            return
        if entry.events is None:
            self._replayed(head + entry.body)
            return
        self.chunked = req.version == "1.1"
        pace = self.proxy.cache.pace
        groups = (
            paced(entry.events, pace) if pace > 0 else [(0.0, b"".join(d for _, d in entry.events))]
        )
        if len(groups) == 1:
            self._replayed(head + chunk(groups[0][1], self.chunked))
            return
        self.client.write(head)
        self.task = self.proxy.loop.create_task(self._replay_paced(groups))

    async def _replay_paced(self, groups: list[tuple[float, bytes]]) -> None:
        start = self.proxy.loop.time()
        try:
            for at, data in groups:
                wait = start + at - self.proxy.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.client.write(chunk(data, self.chunked))
        except asyncio.CancelledError:
            return
        self.task = None
        self._replayed(b"")

    def _replayed(self, data: bytes) -> None:
        if self.chunked:
            data += b"0\r\n\r\n"
        if data:
            self.client.write(data)
        self.account_end(200)
        self.req.on_lost = None
        self.client.finish(self.req, reusable=self.keep_client)

    def _can_fall_back(self) -> bool:
        origin = self.origin
        return (
            origin is not None
            and self.req.may_replay
            and self.fell_back < min(self.proxy.max_fallbacks, len(origin.fallbacks))
        )

    def fall_back(self, error: GatewayError | None = None) -> bool:
        """Try the next fallback upstream, if the budget and the request allow it. A body
        still arriving (the failure came first) is awaited, up to the replay limit."""
        if not self._can_fall_back():
            return False
        origin, target = self.origin, self.target
        assert origin is not None and target is not None
        nxt = origin.fallbacks[self.fell_back]
        self.fell_back += 1
        log.info("upstream %s failed before answering; trying %s", target.name, nxt.name)
        self._retry(nxt, error or errors.upstream_disconnected())
        return True

    def _retry(self, target: Target, error: GatewayError) -> None:
        """Send the request again (to another upstream, or with another key) once the whole
        body is here; a body that outgrows the replay limit meanwhile gets ``error``."""
        req = self.req
        req.detach()
        self._release_key()
        if req.body_complete:
            self._begin_again(target)
            return
        req.on_body_done = lambda: self._begin_again(target)
        req.on_overflow = lambda: self.fail_before_response(error)

    def _begin_again(self, target: Target) -> None:
        self.req.on_body_done = self.req.on_overflow = None
        self.retried = False
        self.chunked = self.sse = False
        self.keep_client = True
        self.discard = self.observe = None
        try:
            self.begin(target)
        except Exception:
            self.internal_error()

    # upstream keys

    def _take_key(self) -> bytes | None:
        assert self.target is not None
        pool = self.target.keys
        if pool is None:
            return None
        now = self.proxy.loop.time()
        key = pool.acquire(now, exclude=self.tried_keys)
        if key is None:
            wait = max(1, math.ceil(pool.ready_in(now)))
            raise GatewayError(
                503,
                "no_upstream_key",
                "Every upstream key is cooling down or out of rotation; try again later.",
                headers=((b"retry-after", b"%d" % wait),),
            )
        self.key = key
        return key.secret

    def _release_key(self) -> None:
        key = self.key
        if key is not None:
            self.key = None
            assert self.target is not None and self.target.keys is not None
            self.target.keys.release(key)

    def _key_failed(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Report a 401/403/429 against the pool key; True if another key will be tried."""
        key, target = self.key, self.target
        assert key is not None and target is not None and target.keys is not None
        pool = target.keys
        now = self.proxy.loop.time()
        pool.report(key, status, now, retry_after=retry_after(headers, time.time()))
        log.warning("upstream %s refused key %s with %d", target.name, key.id, status)
        self.tried_keys.append(key)
        if not self.req.may_replay or len(self.tried_keys) >= len(pool.keys):
            return False
        probe = pool.acquire(now, exclude=self.tried_keys)
        if probe is None:
            return False
        pool.release(probe)
        return True

    def _upstream_write_pause(self, paused: bool) -> None:
        if not self.req.body_complete:
            self.client.body_flow(resume=not paused)

    # Listener: called by the upstream connection

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.req
        if self.key is not None and status in _KEY_FAILURES:
            if self._key_failed(status, headers):
                self.discard = bytearray()  # read this answer, then try the next key
                return
            if status == 429:
                self.observe = bytearray()  # relayed; its body says whether quota is gone
        if (status == 429 or status >= 500) and self._can_fall_back():
            assert self.conn is not None
            self.conn.abort()  # this answer is dropped unread; the next upstream answers instead
            self.fall_back()
            return
        lines = [b"HTTP/1.1 %d %b" % (status, reason)]
        length = False
        encoding = b""
        extra: frozenset[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    extra = _connection_tokens(headers) or None
                continue
            if lname == b"content-length":
                length = True
            elif lname == b"content-type" and value[:17].lower() == b"text/event-stream":
                self.sse = True
            elif lname == b"content-encoding":
                encoding = value.strip().lower()
            lines.append(name + b": " + value)
        if extra is not None:
            lines = _drop_named(lines, 1, extra)
        self.status = status
        acct = self.acct
        if acct is not None:
            self._account_head(acct, status, encoding)
            if acct.rate_lines is not None:  # the gateway's limits are the client's limits
                lines = [ln for ln in lines if ln[:12].lower() != b"x-ratelimit-"]
                lines.extend(acct.rate_lines)
        if self.sse:
            lines.append(b"x-accel-buffering: no")
        ticket = self.ticket
        if ticket is not None:
            lines.append(DIRECTIVE_HEADER + b": miss")
            ticket.recorder = None
            if ticket.write and not self.fell_back:  # a fallback's answer is not the entry's
                recorder = Recorder(self.proxy.cache.max_entry)
                if recorder.head(status, headers):
                    ticket.recorder = recorder
        bodyless = req.method == b"HEAD" or status in _NO_BODY_STATUS
        if not bodyless and not length:
            if req.version == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked")
            else:
                self.keep_client = False
        if not req.keep_alive or not self.keep_client or self.client.closing:
            self.keep_client = False
            if req.version == "1.1":
                lines.append(b"connection: close")
        elif req.version == "1.0":
            lines.append(b"connection: keep-alive")
        lines.append(b"\r\n")
        req.responded = True
        self.out.append(b"\r\n".join(lines))

    def on_body(self, data: bytes) -> None:
        if self.discard is not None or self.observe is not None:
            self._keep_error_body(data)
            if self.discard is not None:
                return
        acct = self.acct
        if acct is not None:
            if acct.ttfb is None:
                acct.ttfb = time.perf_counter()
            if acct.capture is not None:
                acct.capture.keep(data)
            if acct.observer is not None:
                shown = acct.observer.feed(data)
                if shown is not None:
                    data = shown
                    if not data:
                        return  # held until its line ends
        ticket = self.ticket
        if ticket is not None and ticket.recorder is not None:
            ticket.recorder.feed(data, time.perf_counter())
        if self.chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _keep_error_body(self, data: bytes) -> None:
        kept = self.discard if self.discard is not None else self.observe
        assert kept is not None
        if len(kept) < 65536:
            kept += data[: 65536 - len(kept)]

    def _learn_quota(self, key: Key, body: bytes | bytearray) -> None:
        assert self.target is not None and self.target.keys is not None
        if error_code(bytes(body)) == "insufficient_quota":
            self.target.keys.report(key, 429, self.proxy.loop.time(), code="insufficient_quota")

    def on_complete(self) -> None:
        discard, self.discard = self.discard, None
        if discard is not None:  # a key was refused: try the next one
            assert self.target is not None
            key = self.tried_keys[-1]
            self._learn_quota(key, discard)
            self.key = None
            self._retry(self.target, errors.upstream_disconnected())
            return
        if self.observe is not None and self.key is not None:
            self._learn_quota(self.key, self.observe)
        acct = self.acct
        if acct is not None:
            tail = acct.observer.end() if acct.observer is not None else b""
            if tail:
                self.out.append(b"%x\r\n%b\r\n" % (len(tail), tail) if self.chunked else tail)
                if self.ticket is not None and self.ticket.recorder is not None:
                    self.ticket.recorder.feed(tail, time.perf_counter())
            self.account_end(self.status)
        ticket = self.ticket
        if ticket is not None and ticket.recorder is not None:
            usage, model = acct.final if acct is not None and acct.final else (None, None)
            self.proxy.cache.save(ticket, usage, model)
        self._release_key()
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self.req.on_lost = None
        self.client.finish(self.req, reusable=self.keep_client)

    def on_error(self, error: GatewayError, stale: bool) -> None:
        req = self.req
        self._count_error(error)
        if self.discard is not None:  # the refused key's answer broke off: next key anyway
            self.discard = None
            self.key = None
            assert self.target is not None
            self._retry(self.target, error)
            return
        if not req.responded:
            if stale and self.reused and not self.retried and req.replayable:
                # the upstream had closed this pooled connection while it was idle
                self.retried = True
                req.detach()
                log.info("retrying on a new connection after a stale pooled one")
                self.task = self.proxy.loop.create_task(self.connect())
            elif error.code == "upstream_timeout" or not self.fall_back(error):
                self.fail_before_response(error)
            return
        self.flush()
        self.account_end(self.status, error.code)
        self._release_key()
        req.on_lost = None
        log.warning("upstream failed mid-response: %s", error.code)
        if self.sse and self.chunked:
            event = error.sse_event()
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
        else:
            self.client.abort()
        self.client.finish(req, reusable=False)

    # accounting

    def _count_error(self, error: GatewayError) -> None:
        metrics = self.proxy.meter.metrics
        if metrics is not None and self.target is not None:
            kind = _ERROR_KINDS.get(error.code, error.code)
            metrics.upstream_error(self.target.name, kind)

    def _account_head(self, acct: Account, status: int, encoding: bytes) -> None:
        assert self.target is not None
        acct.upstream = self.target.name
        was_stream = acct.sse
        acct.on_head(status, self.sse, encoding)
        metrics = self.proxy.meter.metrics
        if metrics is not None:
            if self.sse and not was_stream:
                metrics.stream_started()
            if status == 429 or status >= 500:
                metrics.upstream_error(self.target.name, "429" if status == 429 else "5xx")

    def account_end(self, status: int, error_code: str | None = None) -> None:
        """Settle limits and record usage, once, however the request ended."""
        acct = self.acct
        if acct is not None and not acct.done:
            key = self.key
            if acct.upstream is None and self.target is not None:
                acct.upstream = self.target.name
            try:
                self.proxy.meter.finish(self.req, acct, status, error_code, key.id if key else None)
            except Exception:  # accounting must never break the relay
                acct.done = True
                log.exception("could not account for request %s", acct.request_id)

    # the client side

    def client_lost(self) -> None:
        """The client went away: drop the upstream request now; it is not the upstream's fault."""
        if self.acct is not None:
            self.acct.client_closed = True
            self.account_end(self.status if self.req.responded else 499, "client_closed")
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        self.req.on_body_done = self.req.on_overflow = None
        self._release_key()
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.conn is not None and self.conn.listener is self:
            self.conn.abort()

    def internal_error(self) -> None:
        log.exception("internal error while forwarding %s", self.req.path)
        self._drop_upstream()
        self.fail_before_response(
            GatewayError(500, "internal_error", "The gateway failed to handle the request.")
        )

    def fail_before_response(self, error: GatewayError) -> None:
        req = self.req
        self.account_end(self.status if req.responded else error.status, error.code)
        self._release_key()
        req.on_lost = req.on_body_done = req.on_overflow = None
        req.detach()
        if req.responded:
            self.client.abort()
            self.client.finish(req, reusable=False)
            return
        req.responded = True
        close = not req.body_complete or not req.keep_alive
        head_only = req.method == b"HEAD"
        # the id the access log and the usage row carry, so a client's report can be found
        request_id = self.acct.request_id if self.acct is not None else new_request_id()
        self.client.write(error.response(request_id, close=close, head_only=head_only))
        self.client.finish(req, reusable=not close)


def _limit_labels(bucket: Bucket) -> tuple[str, str]:
    """(scope, kind) of a refusing bucket, for the metrics."""
    if bucket.kind == "quota":
        return "budget", "quota"
    scope = bucket.name.split("|", 1)[0].split(":", 1)[0]
    if scope == "client":  # a client's own key, counted per key
        scope = "key"
    if bucket.kind == "concurrent":
        return scope, "concurrent"
    return scope, bucket.unit or "requests"


def _replace_body(req: Request, body: bytes) -> None:
    """Send ``body`` upstream instead of what the client sent (whole and already read)."""
    req.pending = [body]
    req.body_bytes = len(body)
    req.content_length = len(body)
    req.chunked = False


def _is_multipart(req: Request) -> bool:
    """Uploads: their model (if any) is a form field, not read by the gateway. Every other
    body is read as JSON when the model matters, whatever its Content-Type claims, so a
    client cannot slip past a model scope by mislabelling its body."""
    for name, value in req.headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"multipart/form-data"
    return False


def _json_response(req: Request, status: bytes, body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
        b"content-length: %d\r\n" % (status, len(body))
    )
    if req.version == "1.0" and req.keep_alive:
        head += b"connection: keep-alive\r\n"
    elif not req.keep_alive:
        head += b"connection: close\r\n"
    head += b"\r\n"
    return head if req.method == b"HEAD" else head + body
