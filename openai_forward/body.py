"""Facts the gateway needs from a JSON request body, read once and exactly.

Pure functions, no I/O. ``read_facts`` parses the body the way the upstream will see it:
any member the gateway acts on (``model``, ``stream``, ``n``, the ``max_*tokens`` limits,
``stream_options``, ``include_usage``) must occur at most once per object, so a client cannot
show the gateway one value and the upstream another (JSON parsers differ on which duplicate
wins). ``with_include_usage`` asks the upstream for the streamed usage event while keeping
every other byte of the body as the client sent it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

# Names the gateway reads; a repeat of any of them, at any depth, refuses the body.
WATCHED = frozenset(
    {
        "model",
        "stream",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "stream_options",
        "include_usage",
    }
)
# Every raw "name" of WATCHED. Without a \u00 escape (the only way JSON can spell an ASCII
# letter differently; no other escape yields a letter or "_") a repeated member shows up as a
# repeated raw "name".
# The alternatives are factored by their first letters, so that at most quotes of a body the
# regex fails on one byte instead of trying eight names (a third of the cost of the scan).
_NAMES = re.compile(
    rb'"(?:m(?:odel|ax_(?:tokens|completion_tokens|output_tokens))|s(?:tream(?:_options)?)'
    rb'|n|include_usage)"'
)
_ESCAPE = re.compile(rb"\\u00")  # a regex finds this literal faster than bytes.find
_FLAG = b'"stream_options":{"include_usage":true}'


class BodyError(ValueError):
    """The request body cannot be read; the message is safe to show a client."""


@dataclass(slots=True)
class RequestFacts:
    """What the gateway acts on. ``obj`` is the parsed body (do not mutate)."""

    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    n: int
    obj: dict[str, Any]


def read_facts(body: bytes) -> RequestFacts:
    """Parse a JSON request body into RequestFacts.

    Raises BodyError for invalid JSON (a UTF-8 BOM, NaN and lone surrogates included), a top
    level that is not an object, or a watched member name repeated within one object. Values
    of the wrong type are not errors: they read as absent (the upstream judges them).
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BodyError("the request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BodyError("the request body must be a JSON object")
    if _may_repeat(body):
        _refuse_repeats(body)
    return _facts(obj)


def _may_repeat(body: bytes) -> bool:
    # A lone backslash is found with memchr; most bodies have none, or only \n escapes.
    if body.find(b"\\") >= 0 and _ESCAPE.search(body):
        return True
    found = _NAMES.findall(body)
    return len(set(found)) < len(found)


def _refuse_repeats(body: bytes) -> None:
    # Only reached for bodies orjson accepted, so json accepts them too; this pass exists
    # to see member names before a dict collapses them.
    try:
        json.loads(body.decode("utf-8"), object_pairs_hook=_check_pairs)
    except RecursionError:
        raise BodyError("the request body is nested too deeply") from None


def _check_pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in WATCHED:
            if name in seen:
                raise BodyError(f"the request body repeats the member {name!r}")
            seen.add(name)


def _facts(obj: dict[str, Any]) -> RequestFacts:
    # orjson gives exact types, so `type(x) is int` also keeps bools out, and is cheaper.
    get = obj.get
    model = get("model")
    options = get("stream_options")
    n = get("n")
    # the first of the max_*tokens names that is set (inline: a call costs more than this);
    # null reads as absent: SDKs send it for "not set", and the next name may be set
    most = get("max_completion_tokens")
    if most is None:
        most = get("max_tokens")
        if most is None:
            most = get("max_output_tokens")
    return RequestFacts(  # positional: measurably cheaper than keywords on this path
        model if type(model) is str else None,
        get("stream") is True,
        type(options) is dict and options.get("include_usage") is True,
        most if type(most) is int and most >= 0 else None,
        n if type(n) is int and n >= 1 else 1,
        obj,
    )


def with_include_usage(body: bytes, facts: RequestFacts) -> bytes:
    """``body`` with ``stream_options.include_usage`` set to true.

    ``facts`` must come from ``read_facts(body)``. Without ``stream_options`` the member is
    inserted first, right after the opening brace, and every other byte is kept. With an
    object ``stream_options`` the whole body is re-serialised compactly (rare). With a
    ``stream_options`` that is not an object, or a flag already true, the body is returned
    unchanged.
    """
    obj = facts.obj
    if "stream_options" not in obj:
        # Only whitespace can precede the opening brace of a body read_facts accepted.
        after = body.index(b"{") + 1
        return body[:after] + _FLAG + (b"," if obj else b"") + body[after:]
    options = obj["stream_options"]
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body
    # orjson writes back everything it read (integers beyond 64 bits were read as floats).
    return orjson.dumps({**obj, "stream_options": {**options, "include_usage": True}})
