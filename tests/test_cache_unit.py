"""The cache's pure parts: keys, directives, entries and their format, recorders, pacing."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openai_forward.cache import (
    Entry,
    Recorder,
    cache_directive,
    cache_key,
    ended_well,
    keep_headers,
    paced,
    read_write,
    storable_head,
    stream_complete,
)
from openai_forward.usage import Usage

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hi"}],
        "temperature": 0.2,
    }
    body.update(extra)
    return body


# --------------------------------------------------------------------------- keys


def test_key_is_the_sha256_of_a_canonical_text_that_does_not_change() -> None:
    # written out by hand: a change here silently empties every deployed cache
    text = (
        b'[1,"openai","/v1/chat/completions","key_1",{"messages":[{"content":"Say hi",'
        b'"role":"user"}],"model":"gpt-4o-mini","temperature":0.2}]'
    )
    assert cache_key("openai", CHAT, "key_1", chat()) == hashlib.sha256(text).digest()


@pytest.mark.parametrize(
    "other",
    [
        ("openai", CHAT, "key_1", chat(temperature=0.3)),
        ("openai", CHAT, "key_1", chat(temperature=None)),
        ("openai", CHAT, "key_2", chat()),
        ("openai", CHAT, None, chat()),
        ("openai", CHAT, "key_1", chat(stream=True)),
        ("openai", CHAT, "key_1", chat(stream=True, stream_options={"include_usage": True})),
        ("azure", CHAT, "key_1", chat()),
        ("openai", "/v1/completions", "key_1", chat()),
        ("openai", CHAT, "key_1", chat(model="gpt-4o")),
        ("openai", CHAT, "key_1", chat(seed=1)),
        ("openai", CHAT, "key_1", chat(n=2)),
        ("openai", CHAT, "key_1", chat(top_p=0.5)),
        ("openai", CHAT, "key_1", chat(tools=[{"type": "function", "function": {"name": "f"}}])),
        ("openai", CHAT, "key_1", chat(messages=[{"role": "user", "content": "Say hi!"}])),
        ("openai", CHAT, "key_1", chat(temperature=1)),  # 0.2 vs 1
    ],
)
def test_anything_that_changes_the_answer_changes_the_key(other: tuple[Any, ...]) -> None:
    assert cache_key(*other) != cache_key("openai", CHAT, "key_1", chat())


def test_member_order_and_the_caching_member_do_not_change_the_key() -> None:
    base = cache_key("openai", CHAT, "t", chat())
    reordered = {
        "temperature": 0.2,
        "messages": [{"content": "Say hi", "role": "user"}],
        "model": "gpt-4o-mini",
        "caching": True,
    }
    assert cache_key("openai", CHAT, "t", reordered) == base
    assert cache_key("openai", CHAT, "t", chat(caching="refresh")) == base


def test_the_key_leaves_the_body_as_it_was() -> None:
    body = chat(caching=True)
    cache_key("openai", CHAT, None, body)
    assert body == chat(caching=True)


def test_tenant_none_and_a_tenant_named_like_it_differ() -> None:
    assert cache_key("u", CHAT, None, chat()) != cache_key("u", CHAT, "None", chat())
    assert cache_key("u", CHAT, None, chat()) != cache_key("u", CHAT, "", chat())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@given(body=st.dictionaries(st.text(max_size=8), _JSON, max_size=8), data=st.data())
def test_the_key_is_the_same_for_any_member_order(body: dict[str, Any], data: Any) -> None:
    names = data.draw(st.permutations(list(body)))
    shuffled = {name: body[name] for name in names}
    assert cache_key("u", CHAT, "t", shuffled) == cache_key("u", CHAT, "t", body)


def test_a_body_json_cannot_encode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cache key"):
        cache_key("u", CHAT, None, {"n": 2**70})


# --------------------------------------------------------------------------- directives


@pytest.mark.parametrize(
    ("body", "header", "want"),
    [
        ({}, None, None),
        ({"caching": True}, None, "on"),
        ({"caching": False}, None, "off"),
        ({"caching": "refresh"}, None, "refresh"),
        ({"caching": "bypass"}, None, "bypass"),
        ({}, b"on", "on"),
        ({}, b" OFF ", "off"),
        ({}, b"Refresh", "refresh"),
        ({}, b"bypass", "bypass"),
        ({"caching": False}, b"on", "off"),  # the body wins over a client-wide header
    ],
)
def test_cache_directive(body: dict[str, Any], header: bytes | None, want: str | None) -> None:
    assert cache_directive(body, header) == want


@pytest.mark.parametrize("value", [1, 0, "on", "yes", None, [], {"a": 1}, "x" * 500])
def test_a_bad_caching_member_is_refused_with_a_short_message(value: object) -> None:
    with pytest.raises(ValueError, match='"caching" must be true, false') as info:
        cache_directive({"caching": value}, None)
    assert len(str(info.value)) < 120


def test_a_bad_header_is_refused() -> None:
    with pytest.raises(ValueError, match="x-openai-forward-cache header must be"):
        cache_directive({}, b"yes")


@pytest.mark.parametrize(
    ("directive", "enabled", "want"),
    [
        (None, False, (False, False)),
        (None, True, (True, True)),
        ("on", False, (True, True)),
        ("off", True, (False, False)),
        ("bypass", True, (False, False)),
        ("refresh", False, (False, True)),
        ("refresh", True, (False, True)),
    ],
)
def test_read_write(directive: str | None, enabled: bool, want: tuple[bool, bool]) -> None:
    assert read_write(directive, enabled) == want


# --------------------------------------------------------------------------- entries


def test_only_safe_headers_are_kept() -> None:
    headers = [
        (b"Content-Type", b"application/json"),
        (b"set-cookie", b"__cf_bm=abc"),
        (b"openai-organization", b"user-abc"),
        (b"authorization", b"Bearer sk-secret"),
        (b"x-request-id", b"req_1"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"openai-model", b"gpt-4o-mini"),
        (b"openai-processing-ms", b"321"),
        (b"content-length", b"12"),
    ]
    assert keep_headers(headers) == [
        (b"Content-Type", b"application/json"),
        (b"openai-model", b"gpt-4o-mini"),
    ]


@pytest.mark.parametrize(
    ("status", "headers", "want"),
    [
        (200, [(b"content-type", b"application/json")], True),
        (200, [(b"content-encoding", b"identity")], True),
        (200, [(b"Content-Encoding", b"gzip")], False),
        (200, [(b"cache-control", b"private, no-store")], False),
        (201, [], False),
        (429, [], False),
        (500, [], False),
    ],
)
def test_storable_head(status: int, headers: list[tuple[bytes, bytes]], want: bool) -> None:
    assert storable_head(status, headers) is want


_HEADERS = st.lists(
    st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)), max_size=4
)
_COUNT = st.integers(0, 2**40)
_ENTRIES = st.builds(
    Entry,
    status=st.integers(100, 599),
    headers=_HEADERS,
    body=st.binary(max_size=300),
    events=st.none() | st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=50))),
    model=st.none() | st.text(max_size=20),
    prompt_tokens=_COUNT,
    completion_tokens=_COUNT,
    cached_tokens=_COUNT,
    reasoning_tokens=_COUNT,
    created=st.integers(0, 2**40),
)


@given(entry=_ENTRIES)
def test_an_entry_round_trips(entry: Entry) -> None:
    if entry.events is not None:
        entry.body = b""
    assert Entry.decode(entry.encode()) == entry
    assert Entry.decode(memoryview(entry.encode())) == entry


@given(data=st.binary(max_size=200))
def test_decoding_garbage_is_a_value_error(data: bytes) -> None:
    """Whatever the bytes, decode gives an Entry or a ValueError with a message, nothing
    else (a store's damaged value is a miss, never a crash)."""
    try:
        got = Entry.decode(data)
    except ValueError as exc:
        assert str(exc)
    else:
        assert isinstance(got, Entry)


@given(entry=_ENTRIES, data=st.data())
def test_a_damaged_entry_decodes_or_is_a_value_error(entry: Entry, data: Any) -> None:
    raw = bytearray(entry.encode())
    cut = data.draw(st.integers(0, len(raw)))
    damaged = bytearray(raw[:cut])
    if damaged:
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    try:
        got = Entry.decode(bytes(damaged))
    except ValueError as exc:
        assert str(exc)
        assert bytes(damaged) != bytes(raw)  # the entry as encoded always decodes
    else:
        assert isinstance(got, Entry)
        if bytes(damaged) == bytes(raw):
            assert got == entry


def test_decode_names_what_is_wrong() -> None:
    good = Entry(200, [], body=b"hello").encode()
    with pytest.raises(ValueError, match="format 1"):
        Entry.decode(b"\x07" + good[1:])
    with pytest.raises(ValueError, match="payload length"):
        Entry.decode(good[:-1])
    with pytest.raises(ValueError, match="too short"):
        Entry.decode(b"")


# --------------------------------------------------------------------------- recorders

SSE_HEAD = [(b"content-type", b"text/event-stream"), (b"x-request-id", b"req_9")]
JSON_HEAD = [(b"content-type", b"application/json")]
CHAT_STREAM = (
    b'data: {"id":"c1","choices":[{"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hi"}}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)
RESPONSES_STREAM = (
    b"event: response.created\n"
    b'data: {"type":"response.created","response":{"id":"r1"}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","response":{"id":"r1","output":[]}}\n\n'
)


def record(head: list[tuple[bytes, bytes]], pieces: list[bytes], cap: int = 1 << 20) -> Recorder:
    rec = Recorder(cap)
    if rec.head(200, head):
        for i, piece in enumerate(pieces):
            rec.feed(piece, 100.0 + i * 0.25)
    return rec


def test_a_body_is_recorded_whole_with_its_usage() -> None:
    rec = record(JSON_HEAD, [b'{"id":', b'"x"}'])
    entry = rec.entry("gpt-4o-mini", Usage(5, 2, 1, 0), created=1700000000)
    assert entry == Entry(
        200, JSON_HEAD, b'{"id":"x"}', None, "gpt-4o-mini", 5, 2, 1, 0, 1700000000
    )


def test_a_stream_is_recorded_as_relayed_with_offsets_from_the_first_byte() -> None:
    pieces = [CHAT_STREAM[:30], CHAT_STREAM[30:100], CHAT_STREAM[100:]]
    entry = record(SSE_HEAD, pieces).entry("m", None, created=1)
    assert entry is not None and entry.stream
    assert entry.events == [(0, pieces[0]), (250, pieces[1]), (500, pieces[2])]
    assert entry.headers == [(b"content-type", b"text/event-stream")]
    assert entry.events[1][1] is pieces[1]  # kept by reference, never copied


@given(cuts=st.lists(st.integers(1, len(CHAT_STREAM) - 1), unique=True).map(sorted))
def test_a_complete_stream_is_recognised_however_it_was_split(cuts: list[int]) -> None:
    for text in (CHAT_STREAM, CHAT_STREAM.replace(b"\n", b"\r\n")):
        bounds = [0, *[min(c, len(text)) for c in cuts], len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        entry = record(SSE_HEAD, pieces).entry(None, None, 0)
        assert entry is not None
        assert b"".join(d for _, d in entry.events or []) == text


@given(cut=st.integers(1, len(RESPONSES_STREAM) - 1))
def test_a_completed_responses_stream_is_stored(cut: int) -> None:
    pieces = [RESPONSES_STREAM[:cut], RESPONSES_STREAM[cut:]]
    assert record(SSE_HEAD, pieces).entry(None, None, 0) is not None


@pytest.mark.parametrize(
    "text",
    [
        CHAT_STREAM[: -len(b"data: [DONE]\n\n")],  # broke off before [DONE]
        CHAT_STREAM[:-8],  # broke off inside it
        CHAT_STREAM + b'data: {"error":{"message":"overloaded"}}\n\n',
        RESPONSES_STREAM.replace(b"response.completed", b"response.failed"),
        RESPONSES_STREAM.replace(b"response.completed", b"response.incomplete"),
        b"",
    ],
)
def test_an_unfinished_stream_is_not_stored(text: bytes) -> None:
    assert record(SSE_HEAD, [text[:20], text[20:]]).entry(None, None, 0) is None


def test_a_completed_event_without_an_event_line_is_recognised() -> None:
    assert ended_well(b'data: {"type": "response.completed", "response": {}}')
    assert not ended_well(b'data: {"type": "response.in_progress", "x": "response.completed"}')
    assert not ended_well(b"data: {not json response.completed")


def test_past_its_cap_a_recorder_lets_go_and_stores_nothing() -> None:
    rec = record(JSON_HEAD, [b"x" * 600, b"y" * 600], cap=1000)
    assert rec.overflow
    assert rec.entry(None, None, 0) is None
    rec = record(JSON_HEAD, [b"x" * 500, b"y" * 500], cap=1000)  # exactly the cap: kept
    assert not rec.overflow and rec.entry(None, None, 0) is not None


def test_a_response_with_an_unstorable_head_gives_no_entry() -> None:
    for status, head in ((500, JSON_HEAD), (200, [(b"content-encoding", b"br")])):
        rec = Recorder(1000)
        assert not rec.head(status, head)
        rec.feed(b"{}", 1.0)
        assert rec.entry(None, None, 0) is None


# --------------------------------------------------------------------------- pacing


EVENTS = [(0, b"a"), (2, b"b"), (40, b"c"), (41, b"d"), (300, b"e")]


def test_replay_at_full_speed_is_one_write() -> None:
    assert paced(EVENTS, 0) == [(0.0, b"abcde")]
    assert paced([], 1) == []


def test_paced_replay_keeps_the_rhythm_and_merges_close_events() -> None:
    assert paced(EVENTS, 1.0) == [(0.0, b"ab"), (0.04, b"cd"), (0.3, b"e")]
    assert paced(EVENTS, 0.5) == [(0.0, b"ab"), (0.02, b"cd"), (0.15, b"e")]


@pytest.mark.parametrize(
    ("piece", "done"),
    [
        (b"data: [DONE]\n\n", True),
        (b"data:[DONE]\n\n", True),
        (b"data: [DONE]\r\n\r\n", True),
        (b"data: [DONE]\n", True),  # the blank line still to come
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n', True),
        (b'data: {"choices":[]}\r\rdata: [DONE]\r\r', True),
        (b'data: {"content":"[DONE]"}\n\n', False),
        (b"data: not [DONE]\n\n", False),
        (b"data: [DONE] later\n\n", False),
        (b"\n", False),  # the blank line alone: the event before it is not known
        (b"", False),
        (b'event: response.completed\ndata: {"type":"response.completed"}\n\n', True),
    ],
)
def test_the_end_of_a_stream_is_told_from_its_last_piece(piece: bytes, done: bool) -> None:
    # what the relay asks when a client hangs up on a stream (and the cache before storing)
    assert stream_complete([piece]) is done
