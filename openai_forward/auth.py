"""Forward keys at request time: who is asking, and may they.

Each worker keeps every forward key in memory, indexed by SHA-256 digest, so a lookup is one
hash and one dict probe whatever the key (no comparison that leaks timing). Keys come from
the configuration and from the key store (SQLite), which a background task polls twice a
second: a key revoked from the CLI is refused by every worker within a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from urllib.parse import unquote

from .config import Config, ForwardKeyConfig, parse_expiry
from .errors import GatewayError
from .keystore import KEY_PREFIX, ForwardKey, KeyStore, KeyStoreError, display_prefix, key_digest

log = logging.getLogger("openai_forward")

# Where clients put a key: OpenAI's SDKs in Authorization, Azure's in api-key, others x-api-key.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"api-key", b"x-api-key"})
_PREFIX = KEY_PREFIX.encode()
POLL_SECONDS = 0.5


def declared_keys(entries: Sequence[ForwardKeyConfig]) -> dict[bytes, ForwardKey]:
    """The forward keys written in the configuration, by digest."""
    out: dict[bytes, ForwardKey] = {}
    for i, entry in enumerate(entries):
        where = f"forward_keys[{i}].expires"
        expires = parse_expiry(entry.expires, where) if entry.expires else None
        digest = key_digest(entry.key)
        out[digest] = ForwardKey(
            id=f"cfg_{entry.name}",
            name=entry.name,
            prefix=display_prefix(entry.key),
            digest=digest,
            models=entry.models,
            routes=entry.routes,
            expires_at=expires,
            source="config",
            limits=entry.limits,
            budget=entry.budget,
        )
    return out


def client_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, from Authorization (Bearer), api-key or x-api-key."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else value.strip()
        if lname == b"api-key" or lname == b"x-api-key":
            return value.strip()
    return None


def client_key_digest(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """SHA-256 (hex) of the key a request carries: who a client is, for its limits and its
    cache entries, without keeping the key. None when it carries none."""
    token = client_token(headers)
    return None if token is None else hashlib.sha256(token).hexdigest()


def query_token(query: str) -> bytes | None:
    """The first query parameter value that is a forward key."""
    for param in query.split("&"):
        value = param.partition("=")[2]
        if value.startswith(KEY_PREFIX):
            return unquote(value).encode()
    return None


def strip_query_keys(query: str) -> str:
    """The query without parameters whose value is a forward key."""
    if KEY_PREFIX not in query:
        return query
    return "&".join(p for p in query.split("&") if not p.partition("=")[2].startswith(KEY_PREFIX))


class ForwardKeys:
    """The forward keys one worker knows; ``identify`` is the hot-path call."""

    def __init__(self, config: Config) -> None:
        self.declared = declared_keys(config.forward_keys)
        self.keys: dict[bytes, ForwardKey] = dict(self.declared)
        self.database = config.database
        self.client_keys = config.client_keys
        self._version = -1
        self._ever = False  # the store has held a key (revoked ones count)
        self._task: asyncio.Task[None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keystore")
        self._store: KeyStore | None = None

    @property
    def required(self) -> bool:
        """Whether a request must carry a forward key."""
        if self.client_keys == "allow":
            return False
        # auto: from the first forward key on, revoking them all does not reopen the door
        return self.client_keys == "deny" or bool(self.keys) or self._ever

    def identify(
        self, headers: Sequence[tuple[bytes, bytes]], query: str = ""
    ) -> ForwardKey | None:
        """The forward key of a request, None for a client that brings its own upstream key
        (when that is allowed). Raises 401 invalid_api_key otherwise. A forward key in the
        query string (``?key=fk-...``, as some clients send keys) counts too."""
        token = client_token(headers)
        if token is None and KEY_PREFIX in query:
            token = query_token(query)
        if token is not None and token.startswith(_PREFIX):
            found = self.keys.get(key_digest(token))
            if found is None:
                raise _invalid("Incorrect API key provided.")
            if not found.active(time.time()):
                raise _invalid("This API key has expired.")
            return found
        if self.required:
            if token is None:
                raise _invalid("You didn't provide an API key.")
            raise _invalid("Incorrect API key provided.")
        return None

    # keeping up with the store

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._poll(loop))

    async def refresh(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload the store's keys if another process changed them."""
        version, stored, ever = await loop.run_in_executor(self._thread, self._read)
        if stored is not None:
            self.keys = {**stored, **self.declared}
            self._version = version
            self._ever = ever

    def _read(self) -> tuple[int, dict[bytes, ForwardKey] | None, bool]:
        if self._store is None:
            if not os.path.exists(self.database):
                return self._version, None, False  # created by the first `keys create`
            self._store = KeyStore(self.database)
        version = self._store.version()
        if version == self._version:
            return version, None, self._ever
        ever = bool(self._store.list(include_revoked=True))
        return version, self._store.load(), ever

    async def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        failed = False
        while True:
            try:
                await self.refresh(loop)
                failed = False
            except (KeyStoreError, OSError) as exc:
                if not failed:  # once per outage, not twice a second
                    log.error("cannot read forward keys from %s: %s", self.database, exc)
                failed = True
            await asyncio.sleep(POLL_SECONDS)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        store, self._store = self._store, None
        if store is not None:
            self._thread.submit(store.close)
        self._thread.shutdown(wait=False)


def allowed_route(key: ForwardKey, upstreams: Sequence[str], paths: Sequence[str]) -> bool:
    """A key scoped to routes may use the upstreams it names, and the paths under the path
    prefixes it names ("/v1/chat/completions", "/deepseek"), matched at segment boundaries
    against the request's canonical path as sent and as forwarded (with /v1)."""
    return not key.routes or route_matches(key.routes, upstreams, paths)


def route_matches(entries: Sequence[str], upstreams: Sequence[str], paths: Sequence[str]) -> bool:
    """Whether one of ``entries`` (upstream names, or path prefixes matched at segment
    boundaries) covers a request to ``upstreams`` at ``paths``."""
    for entry in entries:
        if not entry.startswith("/"):
            if entry in upstreams:
                return True
            continue
        base = entry.rstrip("/")
        if not base or any(p == base or p.startswith(base + "/") for p in paths):
            return True
    return False


def allowed_model(key: ForwardKey, model: str | None) -> bool:
    return not key.models or (
        model is not None and any(fnmatch.fnmatchcase(model, p) for p in key.models)
    )


def _invalid(message: str) -> GatewayError:
    return GatewayError(401, "invalid_api_key", message)
