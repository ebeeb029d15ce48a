"""Unit and property tests of the path canonicaliser (openai_forward.paths).

What is authorised must be what is forwarded: one canonical path per request, which neither
the gateway nor an upstream that decodes the target again can move above the base path.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from openai_forward.paths import PathError, canonicalize, split_target, with_v1

# --------------------------------------------------------------------------------------------
# split_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1/models", ("/v1/models", "")),
        (b"/v1/models?limit=2&after=x", ("/v1/models", "limit=2&after=x")),
        (b"/v1/files?purpose=a?b", ("/v1/files", "purpose=a?b")),
        # CRLF in the query stays opaque percent-encoded text, never decoded
        (b"/v1/models?a=1%0d%0aX-Injected:%201", ("/v1/models", "a=1%0d%0aX-Injected:%201")),
        (b"/v1/models?a=%0D%0A", ("/v1/models", "a=%0D%0A")),
        (b"/", ("/", "")),
    ],
)
def test_split_target_separates_path_and_opaque_query(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.example/v1/models",
        b"https://api.openai.com/v1/models",
        b"HTTP://evil.example/v1/models",
        b"*",
        b"evil.example:443",
        b"v1/models",
        b"",
        b"/v1/models#frag",
        b"/v1/models?x=1#frag",
        b"/v1/mod\xc3\xa9ls",
        b"/v1/models?q=\xff",
    ],
)
def test_split_target_rejects_non_origin_form_fragments_and_non_ascii(target):
    with pytest.raises(PathError):
        split_target(target)


def test_path_error_is_a_value_error():
    assert issubclass(PathError, ValueError)


# --------------------------------------------------------------------------------------------
# canonicalize: table of the A8 traversal cases and friends


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/models", {"/v1/models"}),
        ("/v1/chat/completions", {"/v1/chat/completions"}),
        ("/v1/models/", {"/v1/models/"}),
        ("/", {"/"}),
        ("/v1/../admin", {"/admin"}),
        ("/v1/%2e%2e/admin", {"/admin"}),
        ("/v1/%2E%2e/admin", {"/admin"}),
        ("/v1/.%2E/admin", {"/admin"}),
        ("/v1/%2e./admin", {"/admin"}),
        ("/v1/%2e/models", {"/v1/models"}),
        ("/v1/./models", {"/v1/models"}),
        ("/v1/models/.", {"/v1/models/", "/v1/models"}),
        ("/admin/.", {"/admin/", "/admin"}),
        ("/../../../etc/passwd", {"/etc/passwd"}),
        ("/v1/../../../admin", {"/admin"}),
        ("/..", {"/"}),
        ("/v1/..", {"/"}),
        # dot resolution and slash collapsing may be done in either order; both stay safe
        ("/v1//..//admin", {"/admin", "/v1/admin"}),
        ("/v1///models", {"/v1/models"}),
        ("//evil.example/v1/models", {"/evil.example/v1/models"}),
        ("///evil.example/v1/models", {"/evil.example/v1/models"}),
        # "..;" is an ordinary segment for an RFC 3986 upstream (Tomcat-style path params are not)
        ("/v1/..;/admin", {"/v1/..;/admin"}),
        ("/v1/...", {"/v1/..."}),
        ("/v1/.hidden", {"/v1/.hidden"}),
        ("/v1/models/gpt-4o.1", {"/v1/models/gpt-4o.1"}),
        ("/ADMIN", {"/ADMIN"}),
    ],
)
def test_canonicalize_resolves_dot_segments_and_collapses_slashes(path, allowed):
    assert canonicalize(path) in allowed


@pytest.mark.parametrize(
    "path",
    [
        "/v1/%2E%2E%2Fadmin",  # encoded slash
        "/v1%2fadmin",
        "/v1%2Fadmin",
        "/v1/a%5cb",
        "/v1/a%5Cb",
        "/v1\\..\\admin",  # backslash
        "/v1/\\admin",
        "/v1/%00/admin",  # NUL
        "/v1/%252e%252e/",  # double-encoded dot
        "/v1/%252E%252E/admin",
        "/v1/%252fadmin",  # double-encoded slash
        "/v1/%255cadmin",  # double-encoded backslash
        "/v1/%2500",
        "/v1/a\x00b",
        "/v1/a\rb",
        "/v1/a\nX-Injected: 1",
    ],
)
def test_canonicalize_rejects_encoded_separators_backslash_nul_and_double_encoding(path):
    with pytest.raises(PathError):
        canonicalize(path)


# --------------------------------------------------------------------------------------------
# with_v1


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/chat/completions", "/v1/chat/completions"),
        ("/models", "/v1/models"),
        ("/models/gpt-4o", "/v1/models/gpt-4o"),
        ("/embeddings", "/v1/embeddings"),
        ("/images/generations", "/v1/images/generations"),
        ("/audio/transcriptions", "/v1/audio/transcriptions"),
        ("/files/file-abc/content", "/v1/files/file-abc/content"),
        ("/fine_tuning/jobs", "/v1/fine_tuning/jobs"),
        ("/vector_stores", "/v1/vector_stores"),
        ("/responses", "/v1/responses"),
        ("/completions", "/v1/completions"),
        ("/v1/models", "/v1/models"),
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/dashboard/billing/usage", "/dashboard/billing/usage"),
        ("/healthz", "/healthz"),
        ("/chatx", "/chatx"),
        ("/modelsx/a", "/modelsx/a"),
        ("/v2/models", "/v2/models"),
        ("/", "/"),
        ("/admin", "/admin"),
    ],
)
def test_with_v1_adds_v1_only_for_openai_resource_names(path, expected):
    assert with_v1(path) == expected


# --------------------------------------------------------------------------------------------
# properties

_DOTLIKE = re.compile(r"%2e", re.IGNORECASE)

# Segments that stress the canonicaliser: dots in every encoding, partial/mixed encodings of
# "%2e" (which a second decoding turns into a dot), separators, and plain names.
_SEGMENTS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "...",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2E",
        "%2e.",
        "%252e",
        "%25",
        "%2",
        "%32",
        "%65",
        "%25%32%65",
        "%2%65",
        "%%32%65",
        "%2f",
        "%5c",
        "\\",
        "v1",
        "admin",
        "models",
        "a.b",
        "..;",
        ";",
        "%41",
        "%",
        "evil.example",
    ]
)

_PATHS = st.lists(st.lists(_SEGMENTS, min_size=1, max_size=3).map("".join), max_size=8).map(
    lambda segs: "/" + "/".join(segs)
)


def _decoded_segments(path: str) -> list[str]:
    return [unquote(_DOTLIKE.sub(".", s)) for s in path.split("/")]


def _aggressive_resolve(target: str) -> str:
    """What a lenient upstream stack might do with a request-target: percent-decode twice,
    treat backslashes as slashes and resolve dot segments (like yarl/httpx/IIS combined)."""
    once = unquote(target)
    twice = unquote(once)
    resolved = posixpath.normpath(twice.replace("\\", "/"))
    if resolved.startswith("//"):
        resolved = "/" + resolved.lstrip("/")
    return resolved


def _canon_or_none(path: str) -> str | None:
    try:
        return canonicalize(path)
    except PathError:
        return None


@settings(max_examples=400, deadline=None)
@given(_PATHS)
@example("/v1//..//admin")
@example("/v1/%2e%2e/%2e%2e/admin")
def test_canonical_path_starts_with_slash_and_has_no_dot_or_empty_segments(path):
    result = _canon_or_none(path)
    if result is None:
        return
    assert result.startswith("/")
    assert "//" not in result
    segments = _decoded_segments(result)
    assert "." not in segments and ".." not in segments, result


@settings(max_examples=400, deadline=None)
@given(_PATHS)
def test_canonicalize_is_idempotent(path):
    result = _canon_or_none(path)
    if result is None:
        return
    assert canonicalize(result) == result


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["v1", "models", "a.b", "x-y", "%41", "..;", ""]), max_size=6))
def test_paths_without_dot_segments_only_lose_repeated_slashes(segs):
    path = "/" + "/".join(segs)
    expected = re.sub("/+", "/", path)
    assert canonicalize(path) == expected


@pytest.mark.parametrize("base", ["/openai", "/a/b"])
@settings(max_examples=400, deadline=None)
@given(rest=_PATHS)
@example(rest="/../admin")
@example(rest="/%25%32%65%25%32%65/admin")
@example(rest="/%2%65%2%65/admin")
def test_base_plus_canonical_path_never_resolves_above_the_base(base, rest):
    """Even an upstream that decodes the forwarded target twice and resolves dot segments
    must land under the configured base path (A8 / I4 with a non-root base)."""
    result = _canon_or_none("/v1" + rest)
    if result is None:
        return
    resolved = _aggressive_resolve(base + result)
    assert resolved == base or resolved.startswith(base + "/"), (rest, result, resolved)


@settings(max_examples=300, deadline=None)
@given(rest=_PATHS)
def test_v1_prefix_survives_when_no_segment_climbs(rest):
    """A /v1/ path whose segments never decode to '..' stays under /v1/."""
    path = "/v1" + rest
    if ".." in _decoded_segments(path):
        return
    result = _canon_or_none(path)
    if result is None:
        return
    assert result == "/v1" or result.startswith("/v1/"), (path, result)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_canonicalize_only_ever_raises_path_error(text):
    try:
        result = canonicalize("/" + text)
    except PathError:
        return
    assert isinstance(result, str) and result.startswith("/")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_split_target_only_ever_raises_path_error(raw):
    try:
        path, query = split_target(raw)
    except PathError:
        return
    assert path.startswith("/")
    assert "#" not in path + query
    assert (path + ("?" + query if query else "")).encode() in (raw, raw.rstrip(b"?"))
