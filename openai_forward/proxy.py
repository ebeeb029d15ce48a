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
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from . import errors
from .access import AccessRules
from .accounting import CONVERSATION_PATHS, TOKEN_PATHS, USAGE_OPTION_PATHS, Account, Meter
from .admission import Charge, rate_headers, refusal
from .auth import (
    CREDENTIAL_HEADERS,
    ForwardKeys,
    allowed_model,
    allowed_route,
    strip_query_keys,
)
from .body import BodyError, RequestFacts, read_facts, with_include_usage
from .cache import DIRECTIVE_HEADER
from .caching import ResponseCache, Ticket
from .config import Config, access_rules
from .errors import GatewayError, new_request_id
from .headers import HOP_BY_HOP, connection_tokens, drop_named
from .http1 import Request
from .limits import Bucket
from .paths import PathError, canonicalize, split_target, with_v1
from .relay import Relay
from .routing import Route, Router
from .targets import Target, model_list, union_models
from .upstream import Pool

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("openai_forward")


# request fields that never go upstream: hop-by-hop, and the framing the gateway sets (and,
# while a cache is on, its directive header: see Proxy.__init__)
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"forwarded"}
FORWARD_KEY_DROP = REQUEST_DROP | CREDENTIAL_HEADERS | {b"openai-organization", b"openai-project"}

UPLOAD_PREFIXES = (
    "/v1/files",
    "/v1/uploads",
    "/v1/audio/",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/videos",
)

METRICS = object()  # req.ctx of a scrape of /metrics


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
        own = frozenset({DIRECTIVE_HEADER}) if self.cache.enabled else frozenset()
        self.request_drop = REQUEST_DROP | own
        self.forward_key_drop = FORWARD_KEY_DROP | own
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
        strip = self.forward_key_drop if req.identity is not None else self.request_drop
        if plain:
            strip = strip | {b"accept-encoding"}
            lines.append(b"accept-encoding: identity")
        for name, value in req.headers:
            lname = name.lower()
            if lname in strip:
                if lname == b"connection":
                    extra = connection_tokens(req.headers) or None
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
            lines = drop_named(lines, 2, extra)
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
            strict = req.has_body and self._strict_body(req, route)
            if req.has_body and self._wants_body(req, route, strict):
                # the body's model picks the upstream, is checked or is accounted for
                req.buffer_limit = req.body_limit
                req.want_body()
                if req.body_complete:
                    self._with_body(relay, route, strict)
                else:
                    req.on_body_done = lambda: self._with_body(relay, route, strict)
                return
            self._admit(relay, self.targets[route.default.name], None)
        except Exception:
            relay.internal_error()

    def _wants_body(self, req: Request, route: Route, strict: bool) -> bool:
        if strict:
            # an upload's model is a form field: not read. The token endpoints take JSON
            # only, so their bodies are read as JSON whatever they claim (no header scan)
            return req.path in TOKEN_PATHS or not _is_multipart(req)
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

    def _with_body(self, relay: Relay, route: Route, strict: bool) -> None:
        req = relay.req
        req.on_body_done = None
        try:
            body = b"".join(req.pending or ())
            acct = relay.acct
            meter = self.meter
            if (
                acct is not None
                and meter.conversing
                and req.path in CONVERSATION_PATHS
                and (meter.every_conversation or meter.converses(req, route))
            ):
                acct.log_body = body
                acct.capture_cap = self.meter.capture_cap
            if not strict:
                # accounting only: a body that is not a stream is not even parsed (the answer
                # names the model and the usage); a stream may need the usage option added
                target = self.targets[route.default.name]
                if self.cache.enabled and self.cache.wants_body(req):
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
            if self.cache.enabled and self.cache.wants_body(req):
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
