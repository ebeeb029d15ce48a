"""openai_forward.routing without sockets: which route a path takes, which upstream a model
picks, and how the model is read from a JSON body."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openai_forward.body import BodyError, read_facts
from openai_forward.config import UpstreamConfig
from openai_forward.errors import GatewayError
from openai_forward.routing import Route, Router


def up(name: str, route: str = "/", models: tuple[str, ...] = (), **kw: str) -> UpstreamConfig:
    return UpstreamConfig(
        name=name, base_url=f"http://{name}.test", route=route, models=models, **kw
    )


# --------------------------------------------------------------------------- Router.match


ROUTER = Router(
    [
        up("root"),
        up("deepseek", "/deepseek"),
        up("a", "/a"),
        up("ab", "/a/b/"),  # trailing slash ignored
        up("abc", "/a/b/c"),
    ]
)


@pytest.mark.parametrize(
    ("path", "name", "rest"),
    [
        ("/v1/chat/completions", "root", "/v1/chat/completions"),
        ("/", "root", "/"),
        ("/deepseek", "deepseek", "/"),
        ("/deepseek/", "deepseek", "/"),
        ("/deepseek/v1/chat/completions", "deepseek", "/v1/chat/completions"),
        ("/deepseek/chat/completions", "deepseek", "/chat/completions"),
        ("/deepseekx/v1/models", "root", "/deepseekx/v1/models"),
        ("/deepseek-v2/models", "root", "/deepseek-v2/models"),
        ("/a", "a", "/"),
        ("/a/v1/models", "a", "/v1/models"),
        ("/a/bc/models", "a", "/bc/models"),
        ("/a/b", "ab", "/"),
        ("/a/b/models", "ab", "/models"),
        ("/a/b/cd", "ab", "/cd"),
        ("/a/b/c/models", "abc", "/models"),
        ("/ab/models", "root", "/ab/models"),
    ],
)
def test_longest_prefix_at_a_segment_boundary_wins(path: str, name: str, rest: str) -> None:
    found = ROUTER.match(path)
    assert found is not None
    route, below = found
    assert [t.name for t in route.targets] == [name]
    assert below == rest


def test_without_a_root_route_unmatched_paths_find_nothing() -> None:
    router = Router([up("d", "/deepseek"), up("q", "/qwen")])
    assert router.match("/v1/chat/completions") is None
    assert router.match("/deepseekx") is None
    assert router.match("/qwen/v1/models") is not None


def test_upstreams_sharing_a_prefix_form_one_route() -> None:
    router = Router([up("a"), up("b", "/", ("deepseek-*",)), up("c", "/x")])
    found = router.match("/v1/models")
    assert found is not None
    assert [t.name for t in found[0].targets] == ["a", "b"]
    assert found[0].by_model
    x = router.match("/x/y")
    assert x is not None and not x[0].by_model


# --------------------------------------------------------------------------- Route.pick


SHARED = Route(
    "/",
    [
        up("default"),
        up("globs", models=("deepseek-*", "qwen-?")),
        up("exact", models=("deepseek-chat",)),
        up("later-glob", models=("deepseek-c*", "qwen-*")),
    ],
)


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("deepseek-chat", "exact"),  # an exact name beats an earlier glob
        ("deepseek-coder", "globs"),  # the first matching glob in config order
        ("qwen-7", "globs"),
        ("qwen-72b", "later-glob"),
        ("gpt-4o", "default"),
        ("DEEPSEEK-CHAT", "default"),  # case matters
        (None, "default"),
        ("", "default"),
    ],
)
def test_pick_prefers_exact_then_first_glob_then_the_default(model: str | None, name: str) -> None:
    assert SHARED.pick(model).name == name


def test_pick_without_a_default_refuses_an_unserved_model() -> None:
    route = Route("/", [up("x", models=("gpt-*",)), up("y", models=("claude-3",))])
    assert route.pick("claude-3").name == "y"
    assert route.pick("gpt-4o").name == "x"
    assert route.pick(None).name == "x"  # no model: the first listed
    with pytest.raises(GatewayError) as info:
        route.pick("llama-3")
    err = info.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "llama-3" in err.message


def test_serves_says_where_a_model_id_would_be_routed() -> None:
    exact, globs = SHARED.targets[2], SHARED.targets[1]
    assert SHARED.serves(exact, "deepseek-chat")
    assert not SHARED.serves(globs, "deepseek-chat")
    assert SHARED.serves(globs, "deepseek-coder")


# --------------------------------------------------------------------------- the model of a body
# (model routing reads it with body.read_facts)


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "gpt-4o", "messages": []}', "gpt-4o"),
        (b'  {"messages": [], "model":"deepseek-chat"}\n', "deepseek-chat"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', None),
        (b'{"model": null}', None),
        ('{"model": "mod\u00e8le-\u00fc"}'.encode(), "mod\u00e8le-\u00fc"),
        (b'{"model": "\\u0067pt-4o"}', "gpt-4o"),
    ],
)
def test_read_facts_returns_the_model_of_a_json_object(body: bytes, model: str | None) -> None:
    assert read_facts(body).model == model


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b'{"model": "gpt-4o",}',
        b"\xff\xfe{}",
        b'{"model": "a"} trailing',
    ],
)
def test_read_facts_refuses_a_body_that_is_not_json(body: bytes) -> None:
    with pytest.raises(BodyError):
        read_facts(body)


@pytest.mark.parametrize("body", [b'[{"model": "gpt-4o"}]', b'"gpt-4o"', b"42", b"null"])
def test_read_facts_refuses_json_that_is_not_an_object(body: bytes) -> None:
    with pytest.raises(BodyError):
        read_facts(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o", "model": "deepseek-chat"}',
        b'{"model": "gpt-4o", "messages": [], "stream": false, "stream": true}',
        b'{"model": "gpt-4o", "n": 1, "n": 2}',
    ],
)
def test_read_facts_refuses_a_repeated_interpreted_field(body: bytes) -> None:
    with pytest.raises(BodyError):
        read_facts(body)


@pytest.mark.parametrize("value", [b"1", b"true", b'["gpt-4o"]', b'{"id": "gpt-4o"}'])
def test_a_model_that_is_not_a_string_is_no_model(value: bytes) -> None:
    facts = read_facts(b'{"model": ' + value + b"}")
    assert facts.model is None and "model" in facts.obj  # the proxy refuses it where it routes


# --------------------------------------------------------------------------- property

segment = st.text(alphabet="abcxy-", min_size=1, max_size=3)
prefix = st.lists(segment, min_size=0, max_size=3).map(lambda segs: "/" + "/".join(segs))


def is_segment_prefix(pre: str, path: str) -> bool:
    return pre == "/" or path == pre or path.startswith(pre + "/")


@settings(max_examples=300, deadline=None)
@given(prefixes=st.lists(prefix, min_size=1, max_size=6, unique=True), path=prefix)
def test_match_picks_the_longest_segment_prefix(prefixes: list[str], path: str) -> None:
    router = Router([up(f"u{i}", p) for i, p in enumerate(prefixes)])
    found = router.match(path)
    candidates = [p for p in prefixes if is_segment_prefix(p, path)]
    if not candidates:
        assert found is None
        return
    assert found is not None
    route, rest = found
    assert is_segment_prefix(route.prefix, path)
    assert route.prefix == max(candidates, key=len)
    assert rest.startswith("/")
    expected_rest = path if route.prefix == "/" else (path[len(route.prefix) :] or "/")
    assert rest == expected_rest
