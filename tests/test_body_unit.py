"""Unit and property tests of request-body facts (openai_forward.body).

The gateway must act on the same values the upstream will see: a watched member repeated in
one object is refused, the fast path (orjson) and the exact path (json with the member pairs)
agree, and adding ``stream_options.include_usage`` changes nothing else in the body.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from openai_forward import body as body_module
from openai_forward.body import WATCHED, BodyError, RequestFacts, read_facts, with_include_usage

# --------------------------------------------------------------------------------------------
# facts


def test_facts_of_a_streaming_chat_request():
    facts = read_facts(
        b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},'
        b'"max_tokens":100,"n":2,"messages":[]}'
    )
    assert facts == RequestFacts(
        model="gpt-4o",
        stream=True,
        include_usage=True,
        max_tokens=100,
        n=2,
        obj=facts.obj,
    )
    assert facts.obj["messages"] == []


@pytest.mark.parametrize(
    ("body", "max_tokens"),
    [
        (b'{"max_completion_tokens":5,"max_tokens":7}', 5),
        (b'{"max_tokens":7,"max_output_tokens":9}', 7),
        (b'{"max_output_tokens":9}', 9),
        (b'{"max_completion_tokens":null,"max_tokens":7}', 7),
        (b'{"max_tokens":0}', 0),
        (b'{"max_tokens":-1}', None),
        (b'{"max_tokens":1.5}', None),
        (b'{"max_tokens":true}', None),
        (b'{"max_tokens":"100"}', None),
        (b"{}", None),
    ],
)
def test_max_tokens_is_the_first_present_limit_when_it_is_a_non_negative_int(body, max_tokens):
    assert read_facts(body).max_tokens == max_tokens


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":5,"stream":"yes","n":0,"stream_options":[]}',
        b'{"model":null,"stream":1,"n":true,"stream_options":{"include_usage":1}}',
        b'{"model":["a"],"stream":null,"n":2.0,"stream_options":{"include_usage":"true"}}',
    ],
)
def test_wrong_types_read_as_absent_not_as_errors(body):
    facts = read_facts(body)
    assert (facts.model, facts.stream, facts.include_usage, facts.n) == (None, False, False, 1)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"model":"a",}',
        b"[]",
        b'"model"',
        b"null",
        b"\xef\xbb\xbf{}",  # a UTF-8 BOM
        b'{"a":NaN}',
        b'{"a":"\\ud800"}',  # a lone surrogate
        b'{"a":"\xff"}',  # not UTF-8
    ],
)
def test_invalid_bodies_are_refused(body):
    with pytest.raises(BodyError):
        read_facts(body)


def test_the_error_message_never_echoes_the_body():
    secret = b"sk-" + b"x" * 5000
    for body in (b'{"k":"' + secret + b'"', b'{"model":"' + secret + b'","model":"b"}'):
        with pytest.raises(BodyError) as info:
            read_facts(body)
        assert "sk-" not in str(info.value)
        assert len(str(info.value)) < 100


# --------------------------------------------------------------------------------------------
# repeated members


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","model":"b"}',
        b'{"mod\\u0065l":"a","model":"b"}',
        b'{"\\u006dodel":"a","mod\\u0065l":"b"}',
        b'{"model":"a","messages":[],"model":"a"}',
        b'{"stream_options":{"include_usage":false,"include_usage":true}}',
        b'{"messages":[{"x":{"n":1,"n":2}}]}',
        b'{"stream":false,"stream":true}',
        b'{"max_tokens":1,"max_tokens":100000}',
        b'{"stream_options":{},"stream_options":{"include_usage":true}}',
        b'{"a":[{"max_output_tokens":1,"max_output_tokens":2}]}',
    ],
)
def test_a_repeated_watched_member_is_refused_at_any_depth(body):
    with pytest.raises(BodyError, match="repeats"):
        read_facts(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","messages":[{"role":"user","content":"say \\"model\\" and \\"n\\""}]}',
        b'{"model":"a","x":"model","y":["model","model"]}',
        b'{"model":"a","o":{"model":"b"},"p":[{"model":"c"}]}',
        b'{"temperature":1,"temperature":2,"model":"a"}',
        b'{"model":"caf\\u00e9","note":"\\u00e9\\u00e9"}',
    ],
)
def test_names_in_strings_other_objects_or_unwatched_repeats_are_fine(body):
    assert read_facts(body).obj == json.loads(body)


def test_the_fast_path_does_not_use_the_exact_parser(monkeypatch):
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(body_module.json, "loads", fail)
    body = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "line one\nline two " * 30}],
        }
    )
    assert read_facts(body).model == "gpt-4o-mini"


# A reference: objects as lists of pairs, so repeats can be generated at all.
_names = st.sampled_from([*sorted(WATCHED), "messages", "role", "x", "temperature"])
_scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8)


def _pairs_object(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(Pairs, st.lists(st.tuples(_names, children), max_size=5))


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object that may repeat names."""


_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | _pairs_object(children),
    max_leaves=12,
)


def _name(name: str, escape: bool) -> str:
    if escape:  # spell the first letter as \u00XX
        return f'"\\u{ord(name[0]):04x}{json.dumps(name)[2:-1]}"'
    return json.dumps(name)


def _dump(value: Any, escapes: st.DataObject | None) -> str:
    if isinstance(value, Pairs):
        members = [
            f"{_name(k, escapes is not None and escapes.draw(st.booleans()))}:{_dump(v, escapes)}"
            for k, v in value
        ]
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v, escapes) for v in value) + "]"
    return json.dumps(value)


def _repeats(value: Any) -> bool:
    if isinstance(value, Pairs):
        names = [k for k, _ in value if k in WATCHED]
        return len(names) != len(set(names)) or any(_repeats(v) for _, v in value)
    if isinstance(value, list):
        return any(_repeats(v) for v in value)
    return False


@settings(max_examples=400, deadline=None)
@given(top=_pairs_object(_values), data=st.data(), escape=st.booleans())
def test_a_body_is_refused_exactly_when_a_watched_name_repeats_in_one_object(top, data, escape):
    text = _dump(top, data if escape else None)
    if _repeats(top):
        with pytest.raises(BodyError):
            read_facts(text.encode())
    else:
        facts = read_facts(text.encode())
        assert facts.obj == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(top=_pairs_object(_values))
def test_fast_and_exact_paths_agree(top):
    text = _dump(top, None).encode()
    try:
        fast: RequestFacts | None = read_facts(text)
    except BodyError:
        fast = None
    original = body_module._may_repeat
    body_module._may_repeat = lambda body: True  # type: ignore[assignment]
    try:
        try:
            exact: RequestFacts | None = read_facts(text)
        except BodyError:
            exact = None
    finally:
        body_module._may_repeat = original  # type: ignore[assignment]
    assert fast == exact
    assert (fast is None) == _repeats(top)


# --------------------------------------------------------------------------------------------
# with_include_usage


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", b'{"stream_options":{"include_usage":true}}'),
        (b'{"model":"a"}', b'{"stream_options":{"include_usage":true},"model":"a"}'),
        (
            b' \r\n\t{ "model" : "a" ,"stream":true }\n',
            b' \r\n\t{"stream_options":{"include_usage":true}, "model" : "a" ,"stream":true }\n',
        ),
        (b"{ }", b'{"stream_options":{"include_usage":true} }'),
        (
            b'{"model":"a","stream_options":{"x":1,"include_usage":false}}',
            b'{"model":"a","stream_options":{"x":1,"include_usage":true}}',
        ),
        (
            b'{ "model" : "a", "stream_options" : { } }',
            b'{"model":"a","stream_options":{"include_usage":true}}',
        ),
    ],
)
def test_include_usage_is_added_keeping_the_rest_of_the_body(body, expected):
    assert with_include_usage(body, read_facts(body)) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream_options":null}',
        b'{"stream_options":"x"}',
        b'{"stream_options":[1]}',
        b'{"stream_options":{"include_usage":true}, "model" : "a"}',
    ],
)
def test_a_stream_options_that_is_not_an_object_or_already_set_is_left_alone(body):
    assert with_include_usage(body, read_facts(body)) is body


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@example(obj={}, options=None, pad=("", ""))
@example(obj={"n": 1}, options={"include_usage": False, "x": [1]}, pad=(" ", "\n"))
@given(
    obj=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in WATCHED), _json_values, max_size=5
    ),
    options=st.none() | st.dictionaries(st.sampled_from(["include_usage", "x"]), _json_values),
    pad=st.tuples(st.sampled_from(["", " ", "\n\t "]), st.sampled_from(["", " ", "\r\n"])),
)
def test_the_result_parses_to_the_original_object_plus_the_flag(obj, options, pad):
    if options is not None:
        obj = {**obj, "stream_options": options}
    body = (pad[0] + json.dumps(obj, ensure_ascii=False) + pad[1]).encode()
    out = with_include_usage(body, read_facts(body))
    parsed = read_facts(out).obj
    expected_options = {**(options or {}), "include_usage": True}
    assert parsed == {**obj, "stream_options": expected_options}
    if options is None:  # the member was inserted after the brace; no other byte moved
        brace = body.index(b"{") + 1
        inserted = b'"stream_options":{"include_usage":true}' + (b"," if obj else b"")
        assert out == body[:brace] + inserted + body[brace:]
