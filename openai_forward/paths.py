"""One canonical path per request: what is authorised is what is forwarded.

Pure functions, no I/O. The upstream request-target is ``base_path + canonicalize(path)``;
a canonical path has no dot segments (in any percent-encoding), no empty segments and no
encoded separators, so neither we nor an upstream that decodes once can climb above the base.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# Resource names of the OpenAI API. A client whose base URL lacks /v1 (old SDKs set
# api_base to the host only) sends /chat/completions; it is forwarded as /v1/chat/completions.
OPENAI_RESOURCES = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chat",
        "completions",
        "containers",
        "conversations",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "models",
        "moderations",
        "organization",
        "realtime",
        "responses",
        "threads",
        "uploads",
        "vector_stores",
        "videos",
    }
)

# Encoded separators and NUL: an upstream may decode them into structure we never saw.
_REJECT = re.compile(r"%(?:2[fF]|5[cC]|00)|[\\\x00-\x20\x7f-\xff]")
# The same, or an encoded dot, still present after one decoding: a double encoding
# (%252e, %25%32%65, %2%65, ...) that an upstream decoding twice would turn into a dot segment.
_ENCODED_SPECIAL = re.compile(r"%(?:2[eEfF]|5[cC]|00)")
_DOT = re.compile(r"%2[eE]")


class PathError(ValueError):
    """The request-target cannot be made canonical; the message is safe to show a client."""


def split_target(target: bytes) -> tuple[str, str]:
    """Split an origin-form request-target into (path, query); query excludes the '?'.

    Raises PathError for absolute-form, asterisk-form, a fragment or non-ASCII bytes.
    """
    if not target.startswith(b"/"):
        raise PathError("the request-target must be an absolute path (origin-form)")
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise PathError("the request-target contains non-ASCII bytes") from None
    if "#" in text:
        raise PathError("the request-target must not contain a fragment")
    path, _, query = text.partition("?")
    return path, query


def canonicalize(path: str) -> str:
    """Resolve dot segments and empty segments; reject encoded separators.

    The result starts with '/', never climbs above '/', and is a fixed point of this function.
    Raises PathError for '%2f', '%5c', '\\', '%00', control characters and double encodings.
    """
    if _REJECT.search(path):
        raise PathError("the path contains an encoded separator or a forbidden character")
    if "%" in path and _ENCODED_SPECIAL.search(unquote(path)):
        raise PathError("the path contains a double percent-encoding of a dot or a separator")
    if "." not in path and "//" not in path and "%" not in path:
        return path or "/"
    out: list[str] = []
    segments = path.split("/")
    for seg in segments:
        plain = _DOT.sub(".", seg) if "%" in seg else seg
        if plain == "..":
            if out:
                out.pop()
        elif plain != "." and seg:
            out.append(seg)
    trailing = segments[-1] == "" or _DOT.sub(".", segments[-1]) in (".", "..")
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


def with_v1(path: str) -> str:
    """Prefix /v1 when the first segment is an OpenAI resource name."""
    end = path.find("/", 1)
    first = path[1:] if end < 0 else path[1:end]
    return "/v1" + path if first in OPENAI_RESOURCES else path
