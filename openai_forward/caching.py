"""The response cache on the request path: which requests take part, their key, the lookup,
the replay of a hit and the store of a miss.

The pieces it puts together are pure (``cache.py``: keys, directives, entries, the recorder)
or I/O behind one interface (``cachestore.py``: SQLite or Redis). A request takes part when
the configuration turns caching on for its route and model (``cache_mode: on``) or the
request asks (``"caching": true`` in the body, or the ``x-openai-forward-cache`` header, with
``cache_mode`` ``request`` or ``on``). A lookup runs after admission, in a task: the store
reads on a thread (SQLite) or over the network (Redis), never on the event loop.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .auth import client_key_digest, route_matches
from .cache import BODY_MEMBER, DIRECTIVE_HEADER, Entry, Recorder, cache_directive, cache_key
from .cache import read_write as plan
from .errors import GatewayError

if TYPE_CHECKING:
    from .config import Config
    from .http1 import Request
    from .routing import Route
    from .targets import Target

log = logging.getLogger("openai_forward")

CACHE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}
)


@dataclass(slots=True)
class Ticket:
    """One request's part in the cache: its key, whether to look up and to store."""

    key: bytes
    read: bool
    write: bool
    recorder: Recorder | None = None


class ResponseCache:
    """The cache policy of one worker, and its store (opened after fork)."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.mode = config.cache_mode
        self.enabled = self.mode != "off"
        self.ttl = config.cache_ttl
        self.max_entry = config.cache_max_entry_bytes
        self.routes = config.cache_routes
        self.models = config.cache_models
        self.shared = config.cache_shared
        self.pace = config.cache_replay_pace
        self.store: Any = None
        if self.enabled:
            from .cachestore import open_cache

            self.store = open_cache(
                cache_location(config),
                max_bytes=config.cache_max_bytes,
                timeout=config.cache_timeout,
                prefix=config.cache_prefix,
            )
        self._saving: set[asyncio.Task[None]] = set()
        self.memory = Memory(config.cache_memory_bytes, config.cache_memory_ttl)
        self.memory_hits = 0
        self._counting: asyncio.Task[None] | None = None

    def wants_body(self, req: Request) -> bool:
        """Whether the request's body must be read to know its part in the cache."""
        return self.enabled and req.method == b"POST" and req.path in CACHE_PATHS

    def ticket(
        self,
        req: Request,
        route: Route,
        target: Target,
        body: bytes,
        obj: dict[str, Any] | None,
    ) -> tuple[Ticket | None, bytes | None]:
        """The request's ticket (None: no part in the cache) and the body to forward instead
        of the client's (without the ``caching`` member), or None to keep it.

        Raises GatewayError 400 for a ``caching`` value or header the gateway cannot read.
        A request to an upstream that is not of type openai takes no part and keeps its body
        and headers as they are."""
        if target.config.type != "openai":
            return None, None
        header = _header(req)
        if obj is None:
            if self.mode == "request" and header is None and body.find(b'"caching"') < 0:
                return None, None  # nobody asked: not even parsed
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None, None  # the upstream will say what is wrong with it
            if not isinstance(parsed, dict):
                return None, None
            obj = parsed
        try:
            directive = cache_directive(obj, header)
        except ValueError as exc:
            raise GatewayError(400, "invalid_cache_directive", str(exc), param="caching") from None
        forward = None
        if BODY_MEMBER in obj:
            forward = orjson.dumps({k: v for k, v in obj.items() if k != BODY_MEMBER})
        model = obj.get("model")
        enabled = self.mode == "on" and self._covers(req, route, model)
        read, write = plan(directive, enabled)
        if not (read or write):
            return None, forward
        tenant = None if self.shared else _tenant(req)
        path = req.path + ("?" + req.query if req.query else "")
        return Ticket(cache_key(target.name, path, tenant, obj), read, write), forward

    def _covers(self, req: Request, route: Route, model: object) -> bool:
        if self.routes:
            names = [t.name for t in route.targets]
            if not route_matches(self.routes, names, (route.prefix.rstrip("/") + req.path,)):
                return False
        if self.models:
            return type(model) is str and any(fnmatch.fnmatchcase(model, g) for g in self.models)
        return True

    def recall(self, ticket: Ticket) -> Entry | None:
        """The entry of ``ticket`` if this worker holds it in memory (no I/O); the store
        counts such hits with the next ``count`` (once a second)."""
        entry = self.memory.get(ticket.key, time.monotonic())
        if entry is not None:
            self.memory_hits += 1
        return entry

    def start(self) -> None:
        if self.store is not None and self.memory.max_bytes:
            self._counting = self.loop.create_task(self._count_every_second())

    async def _count_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.count()

    async def count(self) -> None:
        """Hand the store the hits this worker answered from memory since the last call."""
        hits, self.memory_hits = self.memory_hits, 0
        if hits:
            try:
                await self.store.count_hits(hits)
            except Exception as exc:
                log.warning("cache: could not count %d hits: %s", hits, exc)

    async def lookup(self, ticket: Ticket) -> Entry | None:
        """The entry of ``ticket`` from the store, or None (a miss, or a store that failed:
        logged). A found entry is kept in memory for the next lookups."""
        try:
            entry: Entry | None = await self.store.get(ticket.key)
        except Exception as exc:
            log.warning("cache lookup failed: %s", exc)
            return None
        if entry is not None:
            self.memory.put(ticket.key, entry, time.monotonic())
        return entry

    def save(self, ticket: Ticket, usage: Any, model: str | None) -> None:
        """Store what the recorder kept, if the response ended well; off the loop."""
        recorder = ticket.recorder
        ticket.recorder = None
        if recorder is None:
            return
        entry = recorder.entry(model, usage, int(time.time()))
        if entry is None:
            return
        self.memory.put(ticket.key, entry, time.monotonic())
        task = self.loop.create_task(self._put(ticket.key, entry))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _put(self, key: bytes, entry: Entry) -> None:
        try:
            await self.store.put(key, entry, self.ttl)
        except Exception as exc:
            log.warning("cache store failed: %s", exc)

    async def aclose(self) -> None:
        """Wait for the entries being stored, count the last hits, close the store."""
        if self._counting is not None:
            self._counting.cancel()
        if self._saving:
            await asyncio.wait(self._saving, timeout=5.0)
        if self.store is not None:
            await self.count()
        if self.store is not None:
            await self.store.aclose()


class Memory:
    """Entries this worker stored or read lately, by key, so a hot entry is answered without
    a store round trip. Bounded by ``max_bytes`` (least recently used go first; entries over
    an eighth of it are not kept) and by ``ttl``: an entry is forgotten ``ttl`` seconds after
    it was kept, so a ``cache clear``, a refresh in another worker or the store's own expiry
    shows here within ``ttl``. ``max_bytes`` 0 keeps nothing."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.size = 0
        self._entries: OrderedDict[bytes, tuple[float, Entry, int]] = OrderedDict()

    def get(self, key: bytes, now: float) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: bytes, entry: Entry, now: float) -> None:
        size = entry.size + 256
        if size > self.max_bytes // 8:
            self._drop(key)
            return
        self._drop(key)
        self._entries[key] = (now + self.ttl, entry, size)
        self.size += size
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.size -= found[2]


def cache_location(config: Config) -> str:
    """Where the cache lives: ``cache_store``, or ``cache.db`` beside ``database``."""
    if config.cache_store:
        return config.cache_store
    return os.path.join(os.path.dirname(config.database), "cache.db")


def _header(req: Request) -> bytes | None:
    for name, value in req.headers:
        if name.lower() == DIRECTIVE_HEADER:
            return value
    return None


def _tenant(req: Request) -> str:
    """Whose entries these are: the forward key, else a digest of the client's own key."""
    identity = req.identity
    if identity is not None:
        return f"k:{identity.id}"
    return "c:" + (client_key_digest(req.headers) or "")


def replay_head(req: Request, entry: Entry, rate_lines: list[bytes] | None) -> bytes:
    """The response head of a hit: the entry's headers, ``hit``, its age, the gateway's
    rate-limit headers, and the framing and connection lines the client needs."""
    lines = [b"HTTP/1.1 200 OK"]
    lines.extend(name + b": " + value for name, value in entry.headers)
    lines.append(DIRECTIVE_HEADER + b": hit")
    lines.append(b"age: %d" % max(0, int(time.time()) - entry.created))
    if rate_lines:
        lines.extend(rate_lines)
    if entry.stream:
        lines.append(b"x-accel-buffering: no")
        if req.version == "1.1":
            lines.append(b"transfer-encoding: chunked")
    else:
        lines.append(b"content-length: %d" % len(entry.body))
    if not req.keep_alive or (entry.stream and req.version == "1.0"):
        lines.append(b"connection: close")
    elif req.version == "1.0":
        lines.append(b"connection: keep-alive")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def chunk(data: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if chunked else data
