"""Unit and property tests of usage observers (openai_forward.usage), without sockets.

What a user notices: usage is found exactly as the upstream reported it, for any split of
the response into pieces; a stream the gateway asked usage for reaches the client exactly as
the client asked for it; a stream the client asked usage for is passed through untouched.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from openai_forward import usage as usage_module
from openai_forward.usage import HEAD, TAIL, JsonUsage, StreamUsage, Usage, usage_from_obj

# --------------------------------------------------------------------------------------------
# usage_from_obj


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (  # chat completions
            {
                "prompt_tokens": 19,
                "completion_tokens": 10,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 4, "audio_tokens": 0},
            },
            Usage(19, 10, 3, 4),
        ),
        ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, Usage(5, 7)),
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0)),  # embeddings
        (  # Responses API
            {
                "input_tokens": 36,
                "input_tokens_details": {"cached_tokens": 2},
                "output_tokens": 87,
                "output_tokens_details": {"reasoning_tokens": 64},
                "total_tokens": 123,
            },
            Usage(36, 87, 2, 64),
        ),
        ({"total_tokens": 9}, Usage(0, 9)),
        ({"prompt_tokens": "5", "completion_tokens": 2.0, "total_tokens": None}, Usage(0, 0)),
        ({"prompt_tokens": True, "completion_tokens": False}, Usage(0, 0)),
        ({"prompt_tokens": -5, "completion_tokens": 3}, Usage(0, 3)),
        (
            {"prompt_tokens": 1, "prompt_tokens_details": [3], "completion_tokens_details": 4},
            Usage(1, 0),
        ),
    ],
)
def test_usage_objects_of_every_api_shape_normalise(obj, expected):
    assert usage_from_obj(obj) == expected


@pytest.mark.parametrize(
    "obj", [None, "x", 5, [], {}, {"note": 1}, {"prompt_tokens_details": {"cached_tokens": 1}}]
)
def test_anything_without_a_token_count_is_not_usage(obj):
    assert usage_from_obj(obj) is None


def test_total_is_prompt_plus_completion():
    assert Usage(3, 4, 1, 2).total == 7


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
@example({"prompt_tokens": {"x": 1}, "input_tokens_details": None})
def test_usage_from_obj_never_raises(obj):
    usage = usage_from_obj(obj)
    assert usage is None or min(usage.prompt_tokens, usage.completion_tokens) >= 0


# --------------------------------------------------------------------------------------------
# JsonUsage

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 34,
    "total_tokens": 46,
    "prompt_tokens_details": {"cached_tokens": 5},
    "completion_tokens_details": {"reasoning_tokens": 6},
}
EXPECTED = Usage(12, 34, 5, 6)


def completion(content: str, **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": USAGE,
        **extra,
    }
    return json.dumps(obj, ensure_ascii=False).encode()


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def observe(data: bytes, cuts: list[int], encoding: bytes = b"") -> tuple[Any, Any]:
    observer = JsonUsage(encoding)
    for piece in pieces(data, cuts):
        observer.feed(piece)
    return observer.result()


@pytest.mark.parametrize("size", [10, 8_000, 20_000, 70_000, 300_000])
def test_usage_and_model_of_small_and_large_bodies(size):
    assert observe(completion("é" * (size // 2)), []) == (EXPECTED, "gpt-4o-2024-08-06")


@pytest.mark.parametrize("size", [10, 300_000])
def test_a_later_usage_member_that_is_not_a_usage_object_does_not_fool_it(size):
    body = completion(
        "x" * size,
        metadata={"usage": "x", "note": {"usage": {"unrelated": 1}}},
        tail=[{"usage": None}],
    )
    assert observe(body, [100, 5000])[0] == EXPECTED


def test_usage_text_inside_the_content_does_not_fool_the_scan():
    fake = '"usage": {"prompt_tokens": 999, "completion_tokens": 999}'
    body = completion(fake * 5000)
    assert observe(body, [])[0] == EXPECTED


def test_the_scan_and_the_full_parse_agree():
    body = completion("hello " * 20, service_tier="default")
    whole = usage_module._read_whole(body)
    assert whole is not None
    assert usage_module._find_usage(body) == whole[0] == EXPECTED
    assert usage_module._find_model(body) == "gpt-4o-2024-08-06"


def test_responses_and_embeddings_bodies():
    responses = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi" * 40000}]}],
        "usage": {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 87,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 123,
        },
    }
    assert observe(orjson.dumps(responses), [7]) == (Usage(36, 87), "gpt-4.1")
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0123456] * 4000}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert observe(orjson.dumps(embeddings), [3]) == (Usage(8, 0), "text-embedding-3-small")


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([100, 70_000]),
    cuts=st.lists(st.integers(0, 200_000), max_size=20),
    encoding=st.sampled_from([b"", b"identity", b"gzip", b"deflate", b"raw-deflate"]),
)
def test_any_split_and_any_supported_encoding_give_the_same_result(size, cuts, encoding):
    body = completion("a ü b " * size)
    if encoding == b"gzip":
        wire = gzip.compress(body)
    elif encoding == b"deflate":
        wire = zlib.compress(body)
    elif encoding == b"raw-deflate":
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        wire, encoding = compressor.compress(body) + compressor.flush(), b"deflate"
    else:
        wire = body
    assert observe(wire, cuts, encoding) == (EXPECTED, "gpt-4o-2024-08-06")


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"gzip, br", b"compress"])
def test_unsupported_encodings_give_nothing_and_keep_nothing(encoding):
    observer = JsonUsage(encoding)
    observer.feed(completion("x"))
    assert observer.result() == (None, None)
    assert observer.seen_bytes == 0


def test_a_corrupt_gzip_body_gives_nothing():
    assert observe(b"\x1f\x8b\x08\x00garbage" * 10, [], b"gzip") == (None, None)


def test_decoding_stops_at_the_cap(monkeypatch):
    monkeypatch.setattr(usage_module, "MAX_DECODED", 1 << 20)
    body = completion(" " * (2 << 20))
    observer = JsonUsage(b"gzip")
    for piece in pieces(gzip.compress(body), list(range(0, 10000, 1000))):
        observer.feed(piece)
        assert observer.seen_bytes <= (1 << 20) + usage_module._STEP
    assert observer.result() == (None, None)


def held(observer: JsonUsage) -> int:
    # the head and the tail exist only once the body is kept apart (past WHOLE bytes)
    head, tail = getattr(observer, "_head", ()), getattr(observer, "_tail", ())
    small = observer._small or ()
    return sum(map(len, head)) + sum(map(len, tail)) + sum(map(len, small))


def test_memory_stays_bounded_for_many_pieces_and_for_one_huge_piece():
    observer = JsonUsage()
    for _ in range(5000):
        observer.feed(b"x" * 1000)
        assert held(observer) <= HEAD + TAIL + 1000
    observer = JsonUsage()
    observer.feed(b"y" * (10 << 20))
    assert held(observer) <= HEAD + TAIL


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=5))
@example(data=b'{"usage":{"prompt_tokens":1', cuts=[])
@example(data=b'"usage" : {"prompt_tokens":[[[[[', cuts=[])
@example(data=b'"model":"\\ud800"' + b"x" * 70000, cuts=[])
def test_garbage_never_raises(data, cuts):
    for encoding in (b"", b"gzip", b"deflate"):
        observe(data, cuts, encoding)


# --------------------------------------------------------------------------------------------
# StreamUsage: examples


def sse(*events: str, eol: str = "\n") -> bytes:
    return "".join(line + eol for event in events for line in (*event.split("\n"), "")).encode()


def chunk(content: str | None, usage: Any = "absent", finish: str | None = None) -> str:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    if usage != "absent":
        obj["usage"] = usage
    return "data: " + json.dumps(obj, separators=(",", ":"))


def usage_chunk() -> str:
    return chunk(None, USAGE).replace(
        '"choices":[{"index":0,"delta":{"content":null},"finish_reason":null}]', '"choices":[]'
    )


def run(data: bytes, cuts: list[int], strip: bool, **kwargs: Any) -> tuple[bytes, StreamUsage]:
    observer = StreamUsage(strip=strip, **kwargs)
    out = []
    for piece in pieces(data, cuts):
        sent = observer.feed(piece)
        if not strip:
            assert sent is piece
        out.append(sent)
    out.append(observer.end())
    return b"".join(out), observer


def test_a_chat_stream_with_usage_is_passed_through_and_read():
    data = sse(chunk("Hel", None), chunk("lo", None), usage_chunk(), "data: [DONE]")
    out, observer = run(data, [], strip=False)
    assert out == data
    assert observer.usage == EXPECTED
    assert observer.model == "gpt-4o-mini"
    assert observer.seen_bytes == len(data)


def test_strip_mode_shows_the_client_the_stream_it_asked_for():
    sent = sse(chunk("Hel", None), chunk("lo", None, "stop"), usage_chunk(), "data: [DONE]")
    asked = sse(chunk("Hel"), chunk("lo", finish="stop"), "data: [DONE]")
    out, observer = run(sent, [], strip=True)
    assert out == asked
    assert observer.usage == EXPECTED


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('data: {"usage":null,"a":1}', 'data: {"a":1}'),
        ('data: {"a":1,"usage":null,"b":2}', 'data: {"a":1,"b":2}'),
        ('data: {"a":1,"usage":null}', 'data: {"a":1}'),
        ('data: {"usage":null}', "data: {}"),
        ('data:{ "a" : 1 , "usage" : null }', 'data:{ "a" : 1  }'),
        ('data: { "usage"\t:\tnull , "a":1}', 'data: {  "a":1}'),
        ('data: {"a":"\\"usage\\":null","usage":null}', 'data: {"a":"\\"usage\\":null"}'),
        ('data: {"a":"x","usage":nullish}', 'data: {"a":"x","usage":nullish}'),
        ('data: {"a":"usage","b":null}', 'data: {"a":"usage","b":null}'),
    ],
)
def test_the_usage_null_member_goes_and_the_json_stays_valid(line, expected):
    out, _ = run(sse(line), [], strip=True)
    assert out == sse(expected)
    if "nullish" not in expected:
        assert json.loads(expected[5:]) == {
            k: v for k, v in json.loads(line[5:]).items() if k != "usage"
        }


def test_crlf_and_cr_line_ends_are_kept_and_a_split_inside_crlf_is_handled():
    for eol in ("\r\n", "\r"):
        sent = sse(chunk("a", None), usage_chunk(), "data: [DONE]", eol=eol)
        asked = sse(chunk("a"), "data: [DONE]", eol=eol)
        for cut in range(len(sent) + 1):
            out, observer = run(sent, [cut], strip=True)
            assert out == asked, (eol, cut)
            assert observer.usage == EXPECTED


def test_comments_event_lines_errors_and_done_pass_unchanged():
    data = sse(
        ": keep-alive",
        'event: error\ndata: {"error":{"message":"overloaded","type":"server_error"}}',
        "id: 7\nretry: 1000",
        "data: [DONE]",
    )
    for strip in (False, True):
        out, observer = run(data, [3, 40], strip=strip)
        assert out == data
        assert observer.usage is None


def test_the_usage_event_is_dropped_with_the_lines_that_open_it():
    sent = sse(chunk("a", None), "event: message\n: note\n" + usage_chunk(), "data: [DONE]")
    asked = sse(chunk("a"), "data: [DONE]")
    assert run(sent, [], strip=True)[0] == asked


def test_the_incomplete_last_line_is_held_until_its_end_arrives():
    observer = StreamUsage(strip=True)
    line = chunk("a", None).encode()
    assert observer.feed(line[:20]) == b""
    assert observer.feed(line[20:]) == b""
    assert observer.feed(b"\n") == chunk("a").encode() + b"\n"
    assert observer.feed(b"\n") == b"\n"
    assert observer.feed(b"data: [DO") == b""
    assert observer.end() == b"data: [DO"


def test_data_without_a_space_and_responses_api_events():
    created = {
        "type": "response.created",
        "response": {"id": "r", "model": "gpt-4.1", "usage": None},
    }
    delta = {"type": "response.output_text.delta", "delta": "Hi"}
    args = {"type": "response.function_call_arguments.delta", "delta": '{"a":'}
    done = {
        "type": "response.completed",
        "response": {
            "id": "r",
            "model": "gpt-4.1",
            "usage": {"input_tokens": 3, "output_tokens": 4},
        },
    }
    data = sse(*(f"event: {e['type']}\ndata:{json.dumps(e)}" for e in (created, delta, args, done)))
    _, observer = run(data, [11], strip=False)
    assert observer.usage == Usage(3, 4)
    assert observer.model == "gpt-4.1"
    assert observer.completion_text() == 'Hi{"a":'


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_usage_of_responses_that_ended_early(kind):
    event = {
        "type": kind,
        "response": {"model": "o3", "usage": {"input_tokens": 9, "output_tokens": 1}},
    }
    _, observer = run(sse("data: " + json.dumps(event)), [], strip=False)
    assert observer.usage == Usage(9, 1)


def test_completion_text_collects_every_kind_of_assistant_output():
    tool = {
        "choices": [
            {
                "delta": {
                    "tool_calls": [{"index": 0, "function": {"name": "get", "arguments": '{"q"'}}],
                    "reasoning_content": "think ",
                }
            }
        ]
    }
    data = sse(
        chunk("Hello "),
        "data: " + json.dumps(tool),
        'data: {"choices":[{"text":" legacy"}],"object":"text_completion"}',
        'data: {"choices":[{"delta":{"refusal":" no"}}]}',
        "data: not json",
        "data: [DONE]",
    )
    _, observer = run(data, [9, 10, 11], strip=False)
    assert observer.completion_text() == 'Hello think get{"q" legacy no'


def test_only_the_first_keep_bytes_are_kept_by_reference():
    observer = StreamUsage(keep=100)
    first = sse(chunk("a" * 80))
    observer.feed(first)
    second = sse(chunk("b"))
    observer.feed(second)
    assert observer.kept == [first]
    assert observer.kept[0] is first
    assert observer.kept_bytes == len(first)
    assert observer.seen_bytes == len(first) + len(second)
    assert observer.completion_text() == "a" * 80


def test_a_line_over_the_cap_stops_the_scan_and_strip_passes_the_rest_unchanged():
    long_line = "data: " + "x" * 400
    sent = sse(chunk("a", None), long_line, chunk("b", None), usage_chunk())
    for cuts in ([], [10], list(range(0, len(sent), 7)), list(range(len(sent)))):
        out, observer = run(sent, cuts, strip=True, line_cap=300)
        head = sse(chunk("a"))
        assert out == head + sent[len(sse(chunk("a", None))) :]
        assert observer.overflow
        assert observer.usage is None
        out, observer = run(sent, cuts, strip=False, line_cap=300)
        assert observer.overflow and observer.usage is None


def test_usage_seen_before_an_overflow_is_kept():
    sent = sse(usage_chunk(), "data: " + "x" * 400, chunk("b", None))
    for strip in (False, True):
        _, observer = run(sent, [5], strip=strip, line_cap=300)
        assert observer.overflow
        assert observer.usage == EXPECTED


def test_chunks_without_usage_are_not_parsed(monkeypatch):
    calls = []
    real = usage_module.orjson.loads

    def counting(data: Any) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(usage_module.orjson, "loads", counting)
    observer = StreamUsage()
    observer.feed(sse(chunk("first")))
    for _ in range(1000):
        observer.feed(sse(chunk("more")))
        observer.feed(sse(chunk("more", None)))
    assert len(calls) == 1  # the first chunk, for its model


# --------------------------------------------------------------------------------------------
# StreamUsage: properties over generated streams

_EOLS = st.sampled_from(["\n", "\r\n", "\r"])
_GARBAGE = st.text(
    st.characters(blacklist_characters='\r\n"', blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)


def _member_json(members: list[tuple[str, Any]], ensure_ascii: bool) -> str:
    return (
        "{"
        + ",".join(
            json.dumps(k) + ":" + json.dumps(v, separators=(",", ":"), ensure_ascii=ensure_ascii)
            for k, v in members
        )
        + "}"
    )


Line = tuple[str, str]  # (content, line end)


class Lines:
    """Two streams built side by side from the same events: as sent by an upstream asked for
    include_usage, and as the client asked for them."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.sent: list[Line] = []
        self.asked: list[Line] = []

    def add(self, sent: str | None, asked: str | None) -> None:
        eol = self.draw(_EOLS)
        if sent == "" and self.sent and self.sent[-1][1] == "\r":
            eol = "\r"  # "\r" then a blank line "\n" would read as one "\r\n"
        if asked == "" and self.asked and self.asked[-1][1] == "\r":
            eol = "\r"
        if sent is not None:
            self.sent.append((sent, eol))
        if asked is not None:
            self.asked.append((asked, eol))

    def event(self, prefix: list[str], data: str | None, asked: str | None = None) -> None:
        """An event in both streams; only in the sent one when ``asked`` is "drop"."""
        drop = asked == "drop"
        for line in prefix:
            self.add(line, None if drop else line)
        if data is not None:
            self.add(data, None if drop else (data if asked is None else asked))
        self.add("", None if drop else "")


def _chunk_members(draw: st.DrawFn) -> list[tuple[str, Any]]:
    choice = {"index": 0, "delta": {"content": draw(st.text(max_size=8))}, "finish_reason": None}
    return [
        ("id", "chatcmpl-1"),
        ("object", "chat.completion.chunk"),
        ("created", 1),
        ("model", "gpt-x"),
        ("choices", [choice]),
    ]


def _usage_members(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], Usage]:
    usage = Usage(*draw(st.tuples(*[st.integers(0, 10**6)] * 4)))
    body = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    members: list[tuple[str, Any]] = [
        ("id", "chatcmpl-1"),
        ("object", "chat.completion.chunk"),
        ("model", "gpt-x"),
        ("choices", []),
    ]
    members.insert(draw(st.integers(0, len(members))), ("usage", body))
    return members, usage


@st.composite
def chat_streams(draw: st.DrawFn) -> tuple[Lines, Usage | None, bool]:
    """Generated chat streams: (both renderings, the usage, whether it ends with [DONE])."""
    lines = Lines(draw)
    ascii_only = draw(st.booleans())
    data = draw(st.sampled_from(["data: ", "data:"]))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["chunk", "chunk", "comment", "garbage", "error", "blank"]))
        prefix = draw(st.lists(st.sampled_from(["event: message", "id: 1", ": hi"]), max_size=2))
        if kind == "chunk":
            members = _chunk_members(draw)
            with_null = list(members)
            with_null.insert(draw(st.integers(0, len(members))), ("usage", None))
            if draw(st.booleans()):  # OpenAI's random padding, last (by default since 2025)
                padding = ("obfuscation", draw(st.text(alphabet='aZ09+/"\\é', max_size=12)))
                members.append(padding)
                with_null.append(padding)
            sent = data + _member_json(with_null, ascii_only)
            lines.event(prefix, sent, data + _member_json(members, ascii_only))
        elif kind == "comment":
            lines.event([": " + draw(_GARBAGE)], None)
        elif kind == "garbage":
            lines.event(prefix, draw(_GARBAGE))
        elif kind == "error":
            lines.event(["event: error"], data + '{"error":{"message":"x"}}')
        else:
            lines.add("", "")
    usage = None
    if draw(st.booleans()):
        members, usage = _usage_members(draw)
        prefix = draw(st.lists(st.sampled_from(["event: message", ": u"]), max_size=2))
        lines.event(prefix, data + _member_json(members, ascii_only), "drop")
    done = draw(st.booleans())
    if done:
        lines.event([], data + "[DONE]")
    return lines, usage, done


def _render(lines: list[Line], cut_end: bool = False) -> bytes:
    """The stream's bytes; ``cut_end`` drops the final blank line and the last line end."""
    if cut_end and lines and lines[-1][0] == "":
        lines = lines[:-1]
    text = "".join(content + eol for content, eol in lines)
    if cut_end and lines:
        text = text[: -len(lines[-1][1])]
    return text.encode()


@st.composite
def cut_points(draw: st.DrawFn) -> list[int]:
    if draw(st.integers(0, 4)) == 0:
        return list(range(5000))  # 1-byte pieces
    return draw(st.lists(st.integers(0, 5000), max_size=12))


@settings(max_examples=400, deadline=None)
@given(stream=chat_streams(), cuts=cut_points(), cut_end=st.booleans())
def test_strip_output_is_the_stream_without_include_usage_for_any_split(stream, cuts, cut_end):
    lines, usage, done = stream
    cut_end = cut_end and done  # an unterminated [DONE] line ends both streams alike
    sent = _render(lines.sent, cut_end)
    asked = _render(lines.asked, cut_end)
    whole, reference = run(sent, [], strip=True)
    assert whole == asked
    assert reference.usage == usage
    out, observer = run(sent, cuts, strip=True)
    assert out == asked
    assert (observer.usage, observer.model) == (reference.usage, reference.model)
    # one event a piece, as upstreams send them (the fast path)
    ends = [i + 2 for i in range(len(sent)) if sent.startswith(b"\n\n", i)]
    assert run(sent, ends, strip=True)[0] == asked


@settings(max_examples=400, deadline=None)
@given(stream=chat_streams(), cuts=cut_points(), cut_end=st.booleans())
def test_scan_output_is_the_input_and_usage_is_the_same_for_any_split(stream, cuts, cut_end):
    lines, usage, _ = stream
    sent = _render(lines.sent, cut_end)
    whole, reference = run(sent, [], strip=False)
    assert whole == sent
    assert reference.usage == usage
    out, observer = run(sent, cuts, strip=False)
    assert out == sent
    assert (observer.usage, observer.model) == (reference.usage, reference.model)
    assert observer.completion_text() == reference.completion_text()


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    cap=st.sampled_from([16, 1 << 20]),
)
@example(data=b'data: {"usage":{"prompt_tokens":1}}\r', cuts=[1], cap=1 << 20)
@example(data=b"\r\n\r\r\n\n", cuts=[1, 2, 3], cap=16)
def test_any_bytes_for_any_split_give_the_same_output_and_never_raise(data, cuts, cap):
    for strip in (False, True):
        whole, reference = run(data, [], strip=strip, line_cap=cap)
        out, observer = run(data, cuts, strip=strip, line_cap=cap)
        assert out == whole
        assert observer.usage == reference.usage
        if not strip:
            assert out == data
        observer.completion_text()


@pytest.mark.parametrize("size", [100, 16_000, 20_000, 100_000, 2_000_000])
def test_keeping_every_piece_for_the_log_finds_the_same_usage(size: int) -> None:
    """An observer that keeps a logged answer's pieces (``keep``) reads the same usage
    and model as one that keeps only a head and a tail, whatever the body's size."""
    usage = b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}'
    body = b'{"model":"gpt-4o","data":"' + b"x" * size + b'",' + usage + b"}"
    plain, keeping = JsonUsage(), JsonUsage(b"", 1 << 20)
    for start in range(0, len(body), 4096):
        plain.feed(body[start : start + 4096])
        keeping.feed(body[start : start + 4096])
    assert keeping.result() == plain.result() == (Usage(7, 3), "gpt-4o")
    kept = keeping.kept
    assert kept is not None
    if len(body) <= 1 << 20:
        assert b"".join(kept) == body
    else:  # past the size asked for: the pieces up to the first past it, no more
        assert (1 << 20) < len(b"".join(kept)) <= (1 << 20) + 4096
        assert body.startswith(b"".join(kept))
    assert plain.kept is None or len(body) <= 16384  # unasked, past WHOLE they go


def test_openai_chunks_with_obfuscation_take_the_strip_fast_path() -> None:
    """OpenAI ends a chunk of a stream asked for usage with "usage":null and, by default,
    a random "obfuscation" string. Such a chunk is cut without the line machinery (only the
    first chunk, whose model is not known yet, and the usage event go through it), and the
    client gets each chunk without the usage member, padding kept."""
    slow: list[bytes] = []

    class Counting(StreamUsage):
        def _strip_piece(self, data: bytes) -> bytes:
            slow.append(data)
            return super()._strip_piece(data)

    def chunk(i: int, usage: str) -> bytes:
        return (
            b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":'
            b'[{"index":0,"delta":{"content":"t%d"},"finish_reason":null}]%b'
            b',"obfuscation":"Xy%d"}\n\n' % (i, usage.encode(), i)
        )

    events = [chunk(i, ',"usage":null') for i in range(20)]
    counts = b'{"prompt_tokens":3,"completion_tokens":20,"total_tokens":23}'
    final = b'data: {"id":"c","choices":[],"usage":%b}\n\n' % counts
    observer = Counting(strip=True)
    out = [observer.feed(e) for e in events] + [observer.feed(final), observer.end()]
    assert out[:20] == [chunk(i, "") for i in range(20)]
    assert out[20:] == [b"", b""]  # the usage event is the gateway's: dropped
    assert observer.usage == Usage(3, 20)
    assert slow == [events[0], final]
