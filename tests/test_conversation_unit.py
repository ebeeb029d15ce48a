"""Unit and property tests of reply assembly (openai_forward.conversation), without sockets.

What a user notices: the conversation log holds exactly the reply the client received,
whatever pieces the stream arrived in, with tool calls whole; a huge or hostile reply costs
bounded memory and never breaks the relay.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openai_forward.conversation import (
    CHAT,
    COMPLETIONS,
    RESPONSES,
    ReplyAssembler,
)
from openai_forward.plainreply import plain_chat_reply

MODEL = "gpt-4o-2024-08-06"
USAGE = {"prompt_tokens": 82, "completion_tokens": 41, "total_tokens": 123}


def event(obj: dict[str, Any], eol: bytes = b"\n") -> bytes:
    return b"data: " + orjson.dumps(obj) + eol + eol


def chat_chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    return event(
        {
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion.chunk",
            "created": 1741570283,
            "model": MODEL,
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
            "usage": None,
        }
    )


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


ARGS_A = '{"location": "Paris, France", "unit": "celsius", "days": [1, 2, 3]}'
ARGS_B = '{"timezone": "Europe/Paris", "format": "24h \\u00e9t\\u00e9"}'


def tool_stream() -> list[bytes]:
    """A recorded-shape stream: some text, then two parallel tool calls whose arguments
    arrive interleaved, three characters at a time; then a usage chunk and [DONE]."""
    out = [chat_chunk({"role": "assistant", "content": "", "refusal": None})]
    out += [chat_chunk({"content": part}) for part in pieces("Let me check both. ", 4)]
    out.append(
        chat_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_weather_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        )
    )
    out.append(
        chat_chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_time_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            }
        )
    )
    a, b = pieces(ARGS_A, 3), pieces(ARGS_B, 3)
    for i in range(max(len(a), len(b))):
        for index, parts in ((0, a), (1, b)):
            if i < len(parts):
                call = {"index": index, "function": {"arguments": parts[i]}}
                out.append(chat_chunk({"tool_calls": [call]}))
    out.append(chat_chunk({}, finish="tool_calls"))
    out.append(event({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}))
    out.append(b"data: [DONE]\n\n")
    return out


EXPECTED_TOOLS = {
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check both. ",
                "tool_calls": [
                    {
                        "id": "call_weather_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ARGS_A},
                    },
                    {
                        "id": "call_time_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ARGS_B},
                    },
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "model": MODEL,
    "usage": USAGE,
    "error": None,
    "truncated": False,
}


def assemble(chunks: list[bytes], path: str = CHAT, stream: bool = True, **kw: Any) -> Any:
    assembler = ReplyAssembler(path, stream, **kw)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.result()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --------------------------------------------------------------------------------------------
# chat completions


def test_parallel_tool_calls_split_across_many_chunks_reassemble_exactly():
    result = assemble(tool_stream())
    assert result == EXPECTED_TOOLS
    assert orjson.loads(result["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40))
def test_any_split_of_a_recorded_stream_gives_the_same_reply(cuts):
    assert assemble(split(b"".join(tool_stream()), cuts)) == EXPECTED_TOOLS


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"\r\n", b"\r", b"\n"]),
    st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30),
)
def test_crlf_and_cr_line_endings_read_like_lf(eol, cuts):
    body = b"".join(tool_stream()).replace(b"\n", eol)
    assert assemble(split(body, cuts)) == EXPECTED_TOOLS


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=700), max_size=8))
def test_garbage_between_chunks_never_raises_and_real_chunks_still_count(junk, cuts):
    junk = junk.replace(b"\n", b" ").replace(b"\r", b" ")
    body = b"".join(tool_stream())
    noisy = b": keep-alive\n\nevent: x\ndata: {not json\n" + junk + b"\n" + body
    assert assemble(split(noisy, cuts)) == EXPECTED_TOOLS


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([CHAT, COMPLETIONS, RESPONSES]), st.booleans())
def test_arbitrary_bytes_never_raise(data, path, stream):
    for encoding in (b"", b"gzip", b"deflate"):
        result = assemble([data[:7], data[7:]], path, stream, encoding=encoding)
        assert result is None or isinstance(result, dict)


def test_several_choices_are_kept_apart_by_index():
    chunks = [
        chat_chunk({"role": "assistant", "content": "Hel"}, index=0),
        chat_chunk({"role": "assistant", "content": "Bon"}, index=1),
        chat_chunk({"content": "lo"}, index=0),
        chat_chunk({"content": "jour"}, index=1),
        chat_chunk({}, finish="stop", index=1),
        chat_chunk({}, finish="length", index=0),
    ]
    choices = assemble(chunks)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "Hello", "length"),
        (1, "Bonjour", "stop"),
    ]


def test_refusal_reasoning_and_legacy_function_call_are_assembled():
    chunks = [
        chat_chunk({"role": "assistant", "reasoning_content": "think"}),
        chat_chunk({"reasoning_content": "ing"}),
        chat_chunk({"refusal": "I can't "}),
        chat_chunk({"refusal": "help."}),
        chat_chunk({"function_call": {"name": "lookup", "arguments": '{"q"'}}),
        chat_chunk({"function_call": {"arguments": ': "x"}'}}, finish="function_call"),
    ]
    message = assemble(chunks)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": "I can't help.",
        "reasoning_content": "thinking",
        "function_call": {"name": "lookup", "arguments": '{"q": "x"}'},
    }


def test_tool_calls_without_index_are_told_apart_by_id():
    chunks = [
        chat_chunk({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}),
        chat_chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chat_chunk({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "[]"}}]}),
        chat_chunk({"tool_calls": [{"id": "b", "function": {"arguments": ""}}]}),
    ]
    calls = assemble(chunks)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "f", "{}"),
        ("b", "g", "[]"),
    ]


def test_an_error_sent_mid_stream_is_kept():
    chunks = [chat_chunk({"content": "par"}), event({"error": {"message": "overloaded"}})]
    result = assemble(chunks)
    assert result["error"] == {"message": "overloaded"}
    assert result["choices"][0]["message"]["content"] == "par"


def test_a_last_line_without_terminator_still_counts_and_result_is_repeatable():
    assembler = ReplyAssembler(CHAT, True)
    assembler.feed(chat_chunk({"content": "a"}) + chat_chunk({"content": "b"})[:-2])
    first = assembler.result()
    assert first is not None and first["choices"][0]["message"]["content"] == "ab"
    assert assembler.result() == first


def test_non_stream_chat_body_gives_the_message_as_sent():
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
        "refusal": None,
        "annotations": [],
    }
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": USAGE,
        }
    )
    result = assemble(split(body, [10, 200]), stream=False)
    assert result == {
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "model": MODEL,
        "usage": USAGE,
        "error": None,
        "truncated": False,
    }


CHAT_BODY = orjson.dumps(
    {
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Bonjour, ça va ?"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        (b"gzip", gzip.compress(CHAT_BODY)),
        (b"GZIP ", gzip.compress(CHAT_BODY)),
        (b"deflate", zlib.compress(CHAT_BODY)),
        (b"deflate", zlib.compress(CHAT_BODY, wbits=-15)),  # raw deflate, as some servers send
        (b"identity", CHAT_BODY),
    ],
)
def test_compressed_non_stream_bodies_are_inflated(encoding, encoded):
    result = assemble(
        [encoded[i : i + 7] for i in range(0, len(encoded), 7)], stream=False, encoding=encoding
    )
    assert result["choices"][0]["message"]["content"] == "Bonjour, ça va ?"
    assert result["usage"] == USAGE and not result["truncated"]


def test_unreadable_bodies_give_no_reply():
    assert assemble([CHAT_BODY], stream=False, encoding=b"br") is None
    assert assemble([b"\x1f\x8b\x08garbage"], stream=False, encoding=b"gzip") is None
    assert assemble([b"[1, 2]"], stream=False) is None
    assert assemble([CHAT_BODY[:-3]], stream=False) is None
    assert assemble([CHAT_BODY], path="/v1/embeddings", stream=False) is None
    assert assemble([chat_chunk({"content": "x"})], path="/v1/models") is None


def test_a_gzip_bomb_is_not_inflated_past_the_bound():
    bomb = gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces in ~64 KiB
    tracemalloc.start()
    try:
        result = assemble([bomb], stream=False, encoding=b"gzip", cap=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == {"choices": [], "model": None, "usage": None, "error": None, "truncated": True}
    assert peak < 2 << 20


# --------------------------------------------------------------------------------------------
# the cap


def test_text_past_the_cap_is_dropped_and_the_reply_marked_truncated():
    chunks = [chat_chunk({"content": "0123456789"}) for _ in range(10)]
    chunks.append(chat_chunk({}, finish="stop"))
    chunks.append(event({"choices": [], "usage": USAGE}))
    result = assemble(chunks, cap=45)
    assert result["choices"][0]["message"]["content"] == "0123456789" * 4
    assert result["truncated"] is True
    assert result["choices"][0]["finish_reason"] == "stop"  # what follows is still read
    assert result["usage"] == USAGE


def test_the_cap_counts_utf8_bytes():
    result = assemble([chat_chunk({"content": "é" * 10}), chat_chunk({"content": "x"})], cap=20)
    assert result["choices"][0]["message"]["content"] == "é" * 10
    assert result["truncated"] is True


def test_a_line_longer_than_the_cap_is_skipped_without_being_buffered():
    cap = 1 << 16
    huge = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"x" * (8 << 20)
    tracemalloc.start()
    try:
        assembler = ReplyAssembler(CHAT, True, cap=cap)
        assembler.feed(chat_chunk({"content": "before "}))
        for i in range(0, len(huge), 4096):
            assembler.feed(huge[i : i + 4096])
        assembler.feed(b'"}}]}\n\n' + chat_chunk({"content": "after"}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = assembler.result()
    # a hole in the reply would mislead: what is kept stays a prefix of it
    assert result["choices"][0]["message"]["content"] == "before "
    assert result["truncated"] is True
    assert peak < 4 * cap + (1 << 17)


def test_many_tool_call_indexes_cost_against_the_cap():
    chunks = [chat_chunk({"tool_calls": [{"index": i}]}) for i in range(10_000)]
    result = assemble(chunks, cap=4096)
    assert result["truncated"] is True
    assert len(result["choices"][0]["message"]["tool_calls"]) <= 1 + 4096 // 64


# --------------------------------------------------------------------------------------------
# completions


def test_completions_text_is_concatenated_when_streamed_and_taken_whole_otherwise():
    chunks = [
        event(
            {
                "object": "text_completion",
                "model": "gpt-3.5-turbo-instruct",
                "choices": [{"index": 0, "text": part, "finish_reason": None}],
            }
        )
        for part in ("Once", " upon", " a time")
    ]
    chunks.append(event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
    streamed = assemble(chunks, COMPLETIONS)
    assert streamed["choices"] == [
        {"index": 0, "text": "Once upon a time", "finish_reason": "length"}
    ]
    assert streamed["model"] == "gpt-3.5-turbo-instruct"
    body = orjson.dumps(
        {
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "text": "Once upon a time",
                    "finish_reason": "length",
                    "logprobs": None,
                }
            ],
        }
    )
    assert assemble([body], COMPLETIONS, stream=False)["choices"] == streamed["choices"]


# --------------------------------------------------------------------------------------------
# responses

OUTPUT = [
    {
        "id": "msg_1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hi there!", "annotations": []}],
    }
]
CALL_ITEM = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
RESP_USAGE = {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}


def responses_events(final: bool) -> list[bytes]:
    def ev(kind: str, **fields: Any) -> bytes:
        return b"event: " + kind.encode() + b"\n" + event({"type": kind, **fields})

    response = {"id": "resp_1", "object": "response", "model": "gpt-4.1", "output": []}
    out = [
        ev("response.created", response={**response, "status": "in_progress", "usage": None}),
        ev("response.output_item.added", output_index=0, item={"type": "message"}),
    ]
    out += [
        ev("response.output_text.delta", output_index=0, content_index=0, delta=d)
        for d in ("Hi", " there", "!")
    ]
    out.append(ev("response.output_text.done", output_index=0, text="Hi there!"))
    out.append(ev("response.output_item.done", output_index=1, item=CALL_ITEM))
    if final:
        done = {**response, "status": "completed", "output": OUTPUT, "usage": RESP_USAGE}
        out.append(ev("response.completed", response=done))
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 14), max_size=20))
def test_a_responses_stream_gives_the_final_output(cuts):
    result = assemble(split(b"".join(responses_events(final=True)), cuts), RESPONSES)
    assert result == {
        "output": OUTPUT,
        "status": "completed",
        "model": "gpt-4.1",
        "usage": RESP_USAGE,
        "error": None,
        "truncated": False,
    }


def test_a_responses_stream_cut_short_gives_the_text_deltas():
    result = assemble(responses_events(final=False), RESPONSES)
    assert result["output"] == [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi there!"}],
        },
        CALL_ITEM,
    ]
    assert result["status"] == "in_progress" and result["model"] == "gpt-4.1"


def test_a_non_stream_response_gives_its_output():
    body = orjson.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "status": "completed",
            "model": "gpt-4.1",
            "output": OUTPUT,
            "usage": RESP_USAGE,
        }
    )
    assert assemble([body[:50], body[50:]], RESPONSES, stream=False) == {
        "output": OUTPUT,
        "status": "completed",
        "model": "gpt-4.1",
        "usage": RESP_USAGE,
        "error": None,
        "truncated": False,
    }


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 12), max_size=10))
def test_a_gzip_compressed_stream_is_inflated_piece_by_piece(cuts):
    body = gzip.compress(b"".join(tool_stream()))
    assert assemble(split(body, cuts), encoding=b"gzip") == EXPECTED_TOOLS


def test_a_stream_whose_compression_breaks_keeps_what_came_before():
    good = zlib.compress(b"".join(tool_stream()[:3]))
    flush = zlib.decompressobj()
    assert flush.decompress(good)  # sanity: the prefix inflates
    result = assemble([good[:-4], b"\xff" * 64], encoding=b"deflate")
    assert result is not None and result["truncated"] is True
    assert result["choices"][0]["message"]["content"] == "Let me c"


# --------------------------------------------------------------------------- plain_chat_reply


def _plain_stream(
    texts: list[str],
    role: bool,
    finish: str | None,
    usage: bool,
    usage_null: bool = False,
    ascii_escapes: bool = False,
    padding: bool = False,
) -> bytes:
    """A chat stream as OpenAI sends it. ``usage_null``: every chunk ends with
    ``"usage":null`` (stream_options.include_usage); ``ascii_escapes``: non-ASCII text
    written as \\u escapes (what Python's json does)."""
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    tail: dict[str, Any] = {"usage": None} if usage_null else {}
    chunks: list[dict[str, Any]] = []
    if role:
        delta = {"role": "assistant", "content": "", "refusal": None}
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        chunks.append({**base, "choices": [choice], **tail})
    for text in texts:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        chunks.append({**base, "choices": [choice], **tail})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], **tail})
    if usage:
        counts = {"prompt_tokens": 3, "completion_tokens": len(texts), "total_tokens": 9}
        chunks.append({**base, "choices": [], "usage": counts})
    if padding:  # OpenAI's "obfuscation": random, different in every chunk
        chunks = [{**c, "obfuscation": "Pad" * (i % 4) + str(i)} for i, c in enumerate(chunks)]
    if ascii_escapes:
        encoded = [json.dumps(c, separators=(",", ":")).encode() for c in chunks]
    else:
        encoded = [orjson.dumps(c) for c in chunks]
    return b"".join(b"data: " + c + b"\n\n" for c in encoded) + b"data: [DONE]\n\n"


def _assembled(data: bytes, cap: int = 1 << 20) -> dict[str, Any] | None:
    assembler = ReplyAssembler(CHAT, True, b"", cap)
    assembler.feed(data)
    return assembler.result()


# text that is hard for the template cut: quotes, backslashes (alone, at the end, in
# escapes), the member name it cuts at, line breaks, the event separator, any Unicode
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["\\", '"', '\\"', '"content":"', '","content":"x', "\n\ndata: ", "\u00e9", "\U0001f600"]
    ),
    st.text(alphabet='ab\\"\n{}:,', max_size=6),
)


@settings(max_examples=500, deadline=None)
@given(
    texts=st.lists(_HOSTILE_TEXT, max_size=20),
    role=st.booleans(),
    finish=st.sampled_from(["stop", "length", None]),
    usage=st.booleans(),
    usage_null=st.booleans(),
    ascii_escapes=st.booleans(),
    padding=st.booleans(),
)
def test_plain_chat_reply_equals_the_assembler(
    texts: list[str],
    role: bool,
    finish: str | None,
    usage: bool,
    usage_null: bool,
    ascii_escapes: bool,
    padding: bool,
) -> None:
    """Quotes, backslashes, line breaks and any Unicode in the text: the template cut (or
    its fallback, event by event) gives exactly what the chunk-by-chunk assembler gives."""
    data = _plain_stream(texts, role, finish, usage, usage_null, ascii_escapes, padding)
    fast = plain_chat_reply(data)
    assert fast is not None
    assert fast == _assembled(data)


@pytest.mark.parametrize("padding", [False, True])
def test_a_long_plain_stream_is_read_by_the_template_cut(padding: bool) -> None:
    """50 text chunks like OpenAI's, with its random padding or without: the cut reads them
    all (only the first, the finish and the usage events are parsed on their own), and
    gives the assembler's reply."""
    import openai_forward.plainreply as plainreply

    texts = [f" tok{i}" for i in range(50)]
    data = _plain_stream(texts, True, "stop", True, usage_null=True, padding=padding)
    parsed: list[bytes] = []
    real = plainreply.orjson.loads

    def counting(raw: bytes) -> Any:
        parsed.append(raw)
        return real(raw)

    plainreply.orjson = type("O", (), {"loads": staticmethod(counting), "dumps": orjson.dumps})
    try:
        fast = plain_chat_reply(data)
    finally:
        plainreply.orjson = orjson
    assert fast == _assembled(data)
    assert fast is not None and fast["choices"][0]["message"]["content"].startswith(" tok0 tok1")
    # the template (twice: whole, and its content), the role event and the one after it,
    # the finish and usage events, the joint text: not one parse per chunk
    assert len(parsed) <= 8


@pytest.mark.parametrize(
    "texts",
    [
        ["a", "b\\", "c"],  # a backslash ending one content: its event is read alone
        ["a", 'say "hi"', "c", "d"],  # a quote
        ["x"] * 5 + ["\u00e9\\"] + ["y"] * 5,
    ],
)
def test_contents_the_cut_cannot_take_are_read_event_by_event(texts: list[str]) -> None:
    for escapes in (False, True):
        data = _plain_stream(texts, True, "stop", True, usage_null=True, ascii_escapes=escapes)
        assert plain_chat_reply(data) == _assembled(data)


def test_an_escape_split_across_two_events_is_not_mended() -> None:
    """Each event must be JSON on its own: a content ending in half a \\u escape, whose
    next content completes it, is not a plain stream (a joint decode would accept it)."""
    data = _plain_stream(["aaaa", "bbbb", "cccc", "dddd"], True, "stop", False)
    data = data.replace(b'"bbbb"', b'"bb\\u00"', 1).replace(b'"cccc"', b'"e9cc"', 1)
    assert plain_chat_reply(data) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.replace(b"\n", b"\r\n"),  # another framing
        lambda d: d[: -len(b"data: [DONE]\n\n")],  # no end: cut off
        lambda d: b": keep-alive\n\n" + d,  # a comment
        lambda d: d.replace(b'"delta":{"content"', b'"delta":{"tool_calls":[],"content"', 1),
        lambda d: d.replace(b'"index":0', b'"index":1', 1),  # a second choice
        lambda d: d.replace(b"data: {", b'data: {"error":{"message":"x"},', 1),
    ],
)
def test_streams_that_are_not_plain_go_to_the_assembler(change: Any) -> None:
    data = change(_plain_stream(["Hel", "lo"], True, "stop", True))
    assert plain_chat_reply(data) is None


def test_a_reply_over_the_cap_goes_to_the_assembler() -> None:
    data = _plain_stream(["x" * 100] * 3, True, "stop", False)
    assert plain_chat_reply(data, cap=1000) is not None
    assert plain_chat_reply(data, cap=250) is None
    assert _assembled(data, cap=250)["truncated"] is True
