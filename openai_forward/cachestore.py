"""The response cache's stores: one async interface, picked by URL, and the CLI over it.

Backends: ``cachesqlite.SqliteCache`` (a file of its own, the default) and
``cacheredis.RedisCache`` (shared by every instance using one Redis). Both keep this
contract, checked by tests/cache_contract.py:

* ``get(key, now=None)``: the entry, or None when absent, expired by ``now``, unreadable, or
  the backend is failing. ``put(key, entry, ttl, now=None)``: store for ``ttl`` seconds,
  replacing any entry; dropped when the backend fails. Neither raises for a backend failure
  nor waits on it for long; one WARNING is logged per outage. ``now`` is unix seconds, by
  default the store's ``clock``.
* ``delete(key)``; ``clear() -> int`` (entries removed; the counts stay) and ``stats()``,
  which raise ``CacheError`` (administration should hear of a failure).
* ``stats()``: ``backend``, ``entries`` and ``bytes`` (what is stored, including expired
  entries not yet removed), ``hits`` and ``misses``: totals over the store's life across
  every process using it (SQLite folds a process's counts in within a second or 64 lookups
  and at ``aclose``; Redis counts each lookup, and loses the counts with its data).
* ``aclose()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import urlsplit

from .cache import Entry

if TYPE_CHECKING:
    from .cacheredis import RedisCache
    from .cachesqlite import SqliteCache

DEFAULT_MAX_BYTES = 1 << 30
REDIS_SCHEMES = ("redis", "rediss", "unix")


class CacheError(Exception):
    """The cache cannot be opened or administered; the message is fit to show a user."""


class CacheStore(Protocol):
    """What the proxy and the CLI use of either store."""

    async def get(self, key: bytes, now: float | None = None) -> Entry | None: ...

    async def put(self, key: bytes, entry: Entry, ttl: float, now: float | None = None) -> None: ...

    async def delete(self, key: bytes) -> None: ...

    async def count_hits(self, n: int) -> None: ...

    async def clear(self) -> int: ...

    async def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def is_redis_url(url_or_path: str) -> bool:
    """True for a redis://, rediss:// or unix:// URL (anything else names a file)."""
    return urlsplit(url_or_path).scheme in REDIS_SCHEMES


def open_cache(
    url_or_path: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 0.25,
    prefix: str = "ofw:cache:",
    clock: Callable[[], float] = time.time,
) -> SqliteCache | RedisCache:
    """A ``RedisCache`` for a Redis URL (``prefix``, ``timeout``), else a ``SqliteCache`` on
    the file ``url_or_path`` (``max_bytes``). ``CacheError`` if the file is unusable,
    ``ValueError`` for a bad URL, or a Redis URL without the redis package."""
    if is_redis_url(url_or_path):
        try:
            from .cacheredis import RedisCache
        except ImportError:
            raise ValueError(
                "a Redis cache needs the redis package: pip install 'openai-forward[redis]'"
            ) from None
        return RedisCache(url_or_path, prefix=prefix, timeout=timeout, clock=clock)
    from .cachesqlite import SqliteCache

    return SqliteCache(url_or_path, max_bytes, clock)


# ------------------------------------------------------------------------- the CLI


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``cache stats|clear`` to ``subparsers`` (what ``add_subparsers()`` returned)."""
    cache = subparsers.add_parser("cache", help="response cache: entries, size, hits; clear it")
    cache.add_argument("action", choices=("stats", "clear"))
    cache.add_argument("--cache", metavar="PATH|URL", help="cache file or Redis URL")
    cache.add_argument("--json", action="store_true", help="JSON for machines")
    cache.add_argument("--config", help="YAML configuration file (or OPENAI_FORWARD_CONFIG)")
    return cache


def command(
    action: str,
    target: str,
    *,
    as_json: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    prefix: str = "ofw:cache:",
    out: TextIO = sys.stdout,
) -> int:
    """Run ``cache stats`` or ``cache clear`` on ``target`` (file or Redis URL; ``max_bytes``
    and ``prefix`` as configured) and print the outcome; 0 on success, 1 when the cache
    cannot be read or cleared. A cache file that does not exist reads as empty and is not
    created."""
    if not is_redis_url(target) and not os.path.exists(target):
        return _show(action, _absent(action, target), as_json, out)
    try:
        result = asyncio.run(_act(action, target, max_bytes, prefix))
    except (CacheError, ValueError) as exc:
        print(f"openai-forward: {exc}", file=sys.stderr)
        return 1
    return _show(action, result, as_json, out)


def _absent(action: str, target: str) -> dict[str, Any]:
    if action == "clear":
        return {"cleared": 0}
    return {"backend": "sqlite", "path": target, "entries": 0, "bytes": 0, "hits": 0, "misses": 0}


async def _act(action: str, target: str, max_bytes: int, prefix: str) -> dict[str, Any]:
    store = open_cache(target, max_bytes=max_bytes, prefix=prefix, timeout=5.0)
    try:
        if action == "clear":
            return {"cleared": await store.clear()}
        return await store.stats()
    finally:
        await store.aclose()


def _show(action: str, result: dict[str, Any], as_json: bool, out: TextIO) -> int:
    if as_json:
        print(json.dumps(result, indent=2), file=out)
    elif action == "clear":
        print(f"cleared {result['cleared']} entries", file=out)
    else:
        width = max(map(len, result))
        for name, value in result.items():
            print(f"{name.ljust(width)}  {value}", file=out)
    return 0
