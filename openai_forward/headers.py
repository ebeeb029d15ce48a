"""HTTP header fields a proxy must not pass on, on either side of it (RFC 9110 §7.6.1)."""

from __future__ import annotations

# hop-by-hop fields, and the framing fields the gateway sets itself
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


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Field names listed in Connection headers that are not already hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens - HOP_BY_HOP)


def drop_named(lines: list[bytes], start: int, names: frozenset[bytes]) -> list[bytes]:
    """``lines[start:]`` are "name: value" lines; drop those whose name is in ``names``."""
    kept = [ln for ln in lines[start:] if ln.split(b":", 1)[0].lower() not in names]
    return lines[:start] + kept
