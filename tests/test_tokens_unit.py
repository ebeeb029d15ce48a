"""Unit tests of token estimation (openai_forward.tokens), offline and without disk I/O.

A tiny real ``tiktoken.Encoding`` (one token per byte) stands in for the OpenAI encodings, so
exact counts are checked without downloading anything.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from openai_forward import tokens
from openai_forward.tokens import (
    AUDIO_TOKENS,
    IMAGE_TOKENS,
    count_text,
    estimate_completion,
    estimate_prompt,
    heuristic_count,
    preload,
    reserve_prompt,
    use_encoding,
)


def byte_encoding() -> tiktoken.Encoding:
    """One token per UTF-8 byte: easy to predict."""
    return tiktoken.Encoding(
        "bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tokens, "_loaded", {})
    monkeypatch.setattr(tokens, "_injected", {})
    monkeypatch.setattr(tokens, "_resolved", {})
    yield


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """tiktoken.get_encoding records its calls and never touches the network or disk."""
    calls: list[str] = []

    def get_encoding(name: str) -> tiktoken.Encoding:
        calls.append(name)
        if name == "cl100k_base":
            raise OSError("offline")
        return byte_encoding()

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    return calls


# --------------------------------------------------------------------------------------------
# heuristic


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("The quick brown fox jumps over the lazy dog." * 10, 110),
        ("你好世界", 4),  # CJK ideographs: 1 each
        ("こんにちは", 5),  # Hiragana
        ("안녕하세요", 5),  # Hangul
        ("Привет, мир", 5),  # Cyrillic 1 per 2, ASCII 1 per 4: (2 + 9 * 2) / 4
        ("😀", 2),  # 4 bytes in UTF-8
        ("中文 and English", 2 + 3),
        ("1 2 3 4 5 6 7 8", 8),  # at least one per word in a short text
    ],
)
def test_heuristic_counts(text, expected):
    assert heuristic_count(text) == expected


def test_a_long_text_is_not_split_into_words():
    text = "a " * 1000
    assert heuristic_count(text) == 500


@given(st.text())
def test_heuristic_is_never_negative_and_grows_with_text(text):
    assert heuristic_count(text) >= (1 if text.strip() else 0)
    assert heuristic_count(text + text) >= heuristic_count(text)


def test_lone_surrogates_do_not_raise():
    assert heuristic_count("a\ud800b") >= 1


# --------------------------------------------------------------------------------------------
# encodings


def test_without_preload_count_text_uses_the_heuristic_and_never_loads(no_download):
    assert count_text("hello world", "gpt-4o") == heuristic_count("hello world")
    assert no_download == []


def test_preload_loads_once_and_then_counts_are_exact(no_download):
    result = preload(["gpt-4o", "gpt-4o-mini", "o3", "gpt-4", "claude-3-5-sonnet", "llama3"])
    assert result == {
        "gpt-4o": "o200k_base",
        "gpt-4o-mini": "o200k_base",
        "o3": "o200k_base",
        "gpt-4": "heuristic",  # cl100k_base could not be loaded (offline)
        "claude-3-5-sonnet": "heuristic",
        "llama3": "heuristic",
    }
    assert no_download.count("o200k_base") == 1
    assert count_text("héllo", "gpt-4o") == 6  # bytes
    assert count_text("héllo", "gpt-4o-2024-11-20") == 6  # same encoding, by name
    assert count_text("héllo", "openai/gpt-4o") == 6  # a router's spelling
    assert count_text("héllo", "gpt-4") == heuristic_count("héllo")
    assert count_text("héllo", "claude-3-5-sonnet") == heuristic_count("héllo")
    assert count_text("héllo", None) == heuristic_count("héllo")


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-5-nano", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-image-1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("o9-preview", "o200k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("omni-moderation-latest", None),
        ("mistral-large", None),
    ],
)
def test_encoding_names(model, name):
    assert tokens._encoding_name(model) == name


def test_preload_without_tiktoken_says_heuristic(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert preload(["gpt-4o"]) == {"gpt-4o": "heuristic"}


def test_preload_never_raises(monkeypatch):
    def broken(name: str) -> Any:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    assert preload(["gpt-4o", "x"]) == {"gpt-4o": "heuristic", "x": "heuristic"}


def test_an_injected_encoding_counts_matching_models():
    use_encoding("my-*", byte_encoding())
    assert count_text("abc", "my-model") == 3
    assert count_text("abc", "other") == heuristic_count("abc")
    use_encoding("my-*", None)
    assert count_text("abc", "my-model") == heuristic_count("abc")


def test_a_broken_encoding_falls_back_to_the_heuristic():
    class Broken:
        def encode_ordinary(self, text: str) -> list[int]:
            raise ValueError("boom")

    use_encoding("*", Broken())
    assert count_text("abcdefgh", "m") == 2


def test_the_model_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(tokens, "_RESOLVED_MAX", 10)
    for i in range(100):
        count_text("x", f"model-{i}")
    assert len(tokens._resolved) <= 10


def test_estimate_completion_is_count_text():
    use_encoding("*", byte_encoding())
    assert estimate_completion("hello", "m") == 5


# --------------------------------------------------------------------------------------------
# estimate_prompt (with one token per byte, so every figure can be worked out by hand)


@pytest.fixture
def exact() -> None:
    use_encoding("*", byte_encoding())


def test_chat_messages(exact):
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},  # 3 + 6 + 8
            {"role": "user", "name": "ann", "content": "hi"},  # 3 + 4 + (3 + 1) + 2
        ],
    }
    assert estimate_prompt(body, "m") == 3 + (3 + 6 + 8) + (3 + 4 + 4 + 2)


def test_chat_content_parts(exact):
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA" * 1000, "format": "wav"}},
    ]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert estimate_prompt(body, "m") == 3 + 3 + 4 + 4 + IMAGE_TOKENS + AUDIO_TOKENS


def test_tools_and_tool_calls_count_as_json(exact):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {
        "messages": [{"role": "assistant", "content": None, "tool_calls": calls}],
        "tools": tools,
    }
    expected = 3 + 3 + 9 + len(orjson.dumps(calls)) + len(orjson.dumps(tools))
    assert estimate_prompt(body, "m") == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", 5),
        (["ab", "cde"], 5),
        ([1, 2, 3], 3),
        ([[1, 2], [3]], 3),
        ([], 0),
    ],
)
def test_completions_prompt_and_embeddings_input(exact, prompt, expected):
    assert estimate_prompt({"model": "m", "prompt": prompt}, "m") == expected
    assert estimate_prompt({"model": "m", "input": prompt}, "m") == expected


def test_responses_input_and_instructions(exact):
    body = {
        "model": "m",
        "instructions": "be nice",  # 7
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},  # 3 + 4 + 2
            {"type": "function_call_output", "call_id": "c", "output": "42"},  # 3 + 20 + 1 + 2
        ],
    }
    assert estimate_prompt(body, "m") == 7 + (3 + 4 + 2) + (3 + 20 + 1 + 2)
    assert estimate_prompt({"model": "m", "input": "hello"}, "m") == 5


def test_an_unknown_shape_counts_its_json_text_over_four():
    body = {"file": "x" * 100}
    assert estimate_prompt(body, None) == -(-len(orjson.dumps(body)) // 4)


def test_the_heuristic_estimate_of_a_chat_is_close_to_its_text():
    text = "Tell me about the history of the printing press. " * 20
    body = {"messages": [{"role": "user", "content": text}]}
    assert estimate_prompt(body, "gpt-4o") == 3 + 3 + 1 + heuristic_count(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["messages", "prompt", "input", "instructions", "tools", "content"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys | st.text(max_size=5), _json, max_size=5))
def test_estimate_prompt_never_raises_and_is_never_negative(body):
    assert estimate_prompt(body, "gpt-4o") >= 0


def test_estimate_prompt_of_a_non_dict_never_raises():
    assert estimate_prompt([1, 2], None) >= 0  # type: ignore[arg-type]


def test_reserve_prompt_counts_an_ascii_body_by_its_size():
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 400}]})
    obj = orjson.loads(body)
    assert reserve_prompt(body, obj) == len(body) // 4
    # close to the structural estimate, never far below it
    assert (
        estimate_prompt(obj, None) <= reserve_prompt(body, obj) <= 1.2 * estimate_prompt(obj, None)
    )


def test_reserve_prompt_counts_media_and_wide_text_by_their_parts():
    image = "data:image/png;base64," + "A" * 40000
    parts = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what?"}]
    for content in (parts, "こんにちは" * 50):
        obj = {"model": "m", "messages": [{"role": "user", "content": content}]}
        body = orjson.dumps(obj)
        assert reserve_prompt(body, obj) == estimate_prompt(obj, None)
    # an image is counted as an image, not as 40 KB of base64 text
    obj = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    assert reserve_prompt(orjson.dumps(obj), obj) < 2000
    assert reserve_prompt(None, obj) == estimate_prompt(obj, None)
