"""Several upstreams behind one gateway, through real processes and sockets.

Three fake upstreams (A = the conftest `upstream`, B and C started here) sit behind gateways
started from YAML files: prefix routes, model routing on a shared route, the /v1/models
union, per-upstream keys and auth schemes, fallbacks, and the upstream host never being
chosen by the client (SSRF).
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess, assert_no_secret, start_gateway
from fakeupstream import FakeUpstream, Recorded, Reply, chat_reply_text, sse
from rawhttp import RawConn, RawTimeout
from rawhttp import request as raw_request

from openai_forward.keypool import key_id

USER_KEY = "sk-user-QWERTYzxcvbn5544"
KEY_A = "sk-alpha-Qx7Lm2Np9Rt4Vw8Z"
KEY_B = "sk-bravo-Hk3Jd8Fs1Gp6Ty0W"
KEY_C = "sk-charlie-Mn5Bv2Cx9Lz4Kq"
KEY_AZ = "az-key-Pw3Ee8Rr1Tt6Yy9Uu"
KEY_X = "sk-ant-Gh4Jk7Lm2Nb5Vc8Xz"
KEY_Q = "AIzaQuErY-Kk2Ll5Oo8Pp1Ii"
KEY_RR = ("sk-rr-one-Fd6Sa9Qw2Er5", "sk-rr-two-Lk8Jh3Gf6Ds1", "sk-rr-three-Zx4Cv7Bn0M")
KEY_DEAD = "sk-dead-Wq1Ea4Sd7Zx0Rf3"
ALL_KEYS = (KEY_A, KEY_B, KEY_C, KEY_AZ, KEY_X, KEY_Q, *KEY_RR, KEY_DEAD)
TIMEOUT = 10.0
READ_TIMEOUT = 0.75


# --------------------------------------------------------------------------- fixtures


def _check_errors(*ups: FakeUpstream) -> None:
    for up in ups:
        errors, up.errors[:] = list(up.errors), []
        assert not errors, f"the fake upstream itself failed during this test: {errors!r}"


@pytest.fixture(scope="module")
def up_b() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def up_c() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(autouse=True)
def _reset_all(upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream) -> Iterator[None]:
    for up in (upstream, up_b, up_c):
        up.reset()
    yield
    _check_errors(up_b, up_c)


@pytest.fixture(scope="module")
def dead_url() -> Iterator[str]:
    """A URL where nothing listens: connections are refused. The port stays bound (without
    listening) for the module, so no other process can start listening on it meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}"


class Collector:
    """A plain TCP listener that counts the connections it accepts (and closes them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()
            with self._cond:
                self.accepted += 1
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.accepted >= n, timeout), self.accepted

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    col = Collector()
    try:
        yield col
    finally:
        col.stop()


def _start(tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return start_gateway(
        "http://127.0.0.1:9",  # ignored: the file has upstreams
        args=["--config", str(path)],
        env={"H5_KEY_B": KEY_B, **(env or {})},
        api_key=None,
    )


def _finish(gw: GatewayProcess) -> None:
    gw.stop()
    out = gw.output()
    gw.cleanup()
    assert "Traceback" not in out, f"gateway output has a traceback:\n{out}"


def routes_config(a: str, b: str, c: str, dead: str) -> dict[str, Any]:
    return {
        "upstreams": [
            # the shared root route: model routing
            {"name": "main", "base_url": a, "api_key": KEY_A},
            {"name": "ds-glob", "base_url": b, "api_key": "${H5_KEY_B}", "models": ["deepseek-*"]},
            {"name": "ds-exact", "base_url": c, "api_key": KEY_C, "models": ["deepseek-chat"]},
            # prefix routes
            {"name": "deepseek", "base_url": b, "route": "/deepseek", "api_key": "${H5_KEY_B}"},
            {"name": "outer", "base_url": b + "/under-a", "route": "/a"},
            {"name": "inner", "base_url": c + "/under-ab/", "route": "/a/b/"},
            {"name": "gen", "base_url": c + "/base", "route": "/g", "type": "general"},
            # a shared route where every upstream lists models
            {"name": "m-a", "base_url": a, "route": "/m", "api_key": KEY_A, "models": ["gpt-*"]},
            {
                "name": "m-b",
                "base_url": b,
                "route": "/m",
                "api_key": "${H5_KEY_B}",
                "models": ["deepseek-chat", "deepseek-coder"],
            },
            {"name": "m-down", "base_url": dead, "route": "/m", "models": ["qwen-max", "qwen-*"]},
            # auth schemes
            {"name": "az", "base_url": c, "route": "/az", "auth": "api-key", "api_key": KEY_AZ},
            {
                "name": "anth",
                "base_url": c,
                "route": "/anth",
                "auth": "x-api-key",
                "api_key": KEY_X,
            },
            {"name": "gem", "base_url": c, "route": "/gem", "auth": "query:key", "api_key": KEY_Q},
            {"name": "rr", "base_url": c, "route": "/rr", "keys": list(KEY_RR)},
        ]
    }


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    up_c: FakeUpstream,
    dead_url: str,
) -> Iterator[GatewayProcess]:
    config = routes_config(upstream.url, up_b.url, up_c.url, dead_url)
    gateway = _start(tmp_path_factory.mktemp("routes"), config)
    try:
        yield gateway
    finally:
        _finish(gateway)


def fallback_config(a: str, b: str, dead: str, **top: Any) -> dict[str, Any]:
    return {
        **top,
        "upstreams": [
            {
                "name": "dead",
                "base_url": dead,
                "route": "/refused",
                "api_key": KEY_DEAD,
                "fallbacks": ["backup"],
            },
            {
                "name": "flaky",
                "base_url": a,
                "route": "/flaky",
                "api_key": KEY_A,
                "fallbacks": ["backup"],
            },
            {"name": "backup", "base_url": b, "route": "/backup", "api_key": "${H5_KEY_B}"},
        ],
    }


@pytest.fixture(scope="module")
def fgw(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    dead_url: str,
) -> Iterator[GatewayProcess]:
    """Fallbacks: /refused (nothing listens) and /flaky (A) both fall back to B."""
    config = fallback_config(upstream.url, up_b.url, dead_url)
    gateway = _start(
        tmp_path_factory.mktemp("fallback"),
        config,
        env={"OPENAI_FORWARD_READ_TIMEOUT": str(READ_TIMEOUT)},
    )
    try:
        yield gateway
    finally:
        _finish(gateway)


# --------------------------------------------------------------------------- helpers


def client(gateway: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, timeout=TIMEOUT)


def sdk(gateway: GatewayProcess, prefix: str = "/v1", key: str = USER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + prefix, api_key=key, max_retries=0, timeout=TIMEOUT)


def chat_body(model: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def only(up: FakeUpstream, *others: FakeUpstream) -> Recorded:
    """The one request `up` got; the `others` got none."""
    reqs = up.wait_for_requests(1)
    assert len(reqs) == 1, [(r.method, r.target) for r in reqs]
    for other in others:
        assert other.requests == [], [(r.method, r.target) for r in other.requests]
    return reqs[0]


def everything(recs: list[Recorded]) -> list[Any]:
    return [[r.target, r.headers, r.body] for r in recs]


def assert_only_own_keys(up: FakeUpstream, own: tuple[str, ...]) -> None:
    for key in ALL_KEYS:
        if key not in own:
            assert_no_secret(everything(up.requests), secret=key)


def json_error(resp: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = resp.json()["error"]
    return err


# --------------------------------------------------------------------------- prefix routes


@pytest.mark.parametrize("path", ["/deepseek/v1/chat/completions", "/deepseek/chat/completions"])
def test_prefix_route_reaches_its_upstream_as_v1_path(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream, path: str
) -> None:
    with client(gw) as c:
        resp = c.post(path, json=chat_body("gpt-4o", "to deepseek"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == chat_reply_text("to deepseek")
    rec = only(up_b, upstream, up_c)
    assert (rec.method, rec.target) == ("POST", "/v1/chat/completions")
    assert rec.headers_named("authorization") == [f"Bearer {KEY_B}"]  # ${H5_KEY_B} expanded
    assert_only_own_keys(up_b, (KEY_B,))


def test_root_route_sends_requests_without_a_model_to_its_default(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream
) -> None:
    with client(gw) as c:
        resp = c.get("/v1/files", params={"purpose": "batch"})
    assert resp.status_code == 200, resp.text
    rec = only(upstream, up_b, up_c)
    assert rec.target == "/v1/files?purpose=batch"
    assert rec.headers_named("authorization") == [f"Bearer {KEY_A}"]
    assert_only_own_keys(upstream, (KEY_A,))


def test_multipart_upload_on_a_shared_route_goes_to_the_default(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream
) -> None:
    data = b"deepseek-chat " * 1000
    with sdk(gw) as c:
        created = c.files.create(file=("model.jsonl", data), purpose="batch")
    assert created.bytes == len(data)
    rec = only(upstream, up_b, up_c)
    assert rec.target == "/v1/files"
    assert [p.data for p in rec.multipart() if p.name == "file"] == [data]


@pytest.mark.parametrize(
    ("path", "which", "target"),
    [
        ("/a/v1/models", "b", "/under-a/v1/models"),
        ("/a/models", "b", "/under-a/v1/models"),
        ("/a/bc/models", "b", "/under-a/bc/models"),  # /a/bc is not under /a/b
        ("/a/b/v1/models", "c", "/under-ab/v1/models"),
        ("/a/b/models", "c", "/under-ab/v1/models"),
        ("/a/b", "c", "/under-ab/"),
    ],
)
def test_longest_route_prefix_wins_at_segment_boundaries(
    gw: GatewayProcess,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    up_c: FakeUpstream,
    path: str,
    which: str,
    target: str,
) -> None:
    ups = {"a": upstream, "b": up_b, "c": up_c}
    with client(gw) as c:
        c.get(path, headers={"authorization": f"Bearer {USER_KEY}"})
    got = ups[which]
    rec = only(got, *(u for k, u in ups.items() if k != which))
    assert rec.target == target


def test_a_longer_name_is_not_under_a_route_prefix(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream
) -> None:
    with client(gw) as c:
        resp = c.get("/deepseekx/v1/models", headers={"authorization": f"Bearer {USER_KEY}"})
    assert resp.status_code == 404  # the root upstream (A) does not know this path
    rec = only(upstream, up_b, up_c)
    assert rec.target == "/deepseekx/v1/models"


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/g/chat/completions?x=1", "/base/chat/completions?x=1"),
        ("/g/v1/anything", "/base/v1/anything"),
        ("/g", "/base/"),
    ],
)
def test_general_route_forwards_the_rest_without_adding_v1(
    gw: GatewayProcess, up_c: FakeUpstream, upstream: FakeUpstream, path: str, target: str
) -> None:
    with client(gw) as c:
        c.post(path, content=b'{"not": "openai"}', headers={"content-type": "application/json"})
    rec = only(up_c, upstream)
    assert rec.target == target
    assert rec.body == b'{"not": "openai"}'


# --------------------------------------------------------------------------- model routing


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("model", "which"),
    [("deepseek-coder", "b"), ("gpt-4o", "a"), ("deepseek-chat", "c")],
    ids=["glob-to-B", "default-A", "exact-beats-glob-C"],
)
def test_sdk_chat_is_routed_by_model(
    gw: GatewayProcess,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    up_c: FakeUpstream,
    model: str,
    which: str,
    stream: bool,
) -> None:
    ups = {"a": upstream, "b": up_b, "c": up_c}
    messages = [{"role": "user", "content": f"which upstream for {model}"}]
    with sdk(gw) as c:
        if stream:
            chunks = list(c.chat.completions.create(model=model, messages=messages, stream=True))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            reply = c.chat.completions.create(model=model, messages=messages)
            text = reply.choices[0].message.content or ""
    assert text == chat_reply_text(f"which upstream for {model}")
    rec = only(ups[which], *(u for k, u in ups.items() if k != which))
    assert (rec.method, rec.target) == ("POST", "/v1/chat/completions")
    assert rec.json()["model"] == model
    assert rec.json().get("stream", False) is stream
    assert rec.headers_named("authorization") == [f"Bearer {USER_KEY}"]  # the client's own key
    for key in ALL_KEYS:
        assert_no_secret(everything([rec]), secret=key)


def _odd_body(size: int) -> bytes:
    filler = "x" * size
    return (
        '{ "messages" : [ {"role":"user", "content":"h\\u00e9llo \u20ac ' + filler + '"} ],\n'
        '\t"temperature" : 0.50,   "model":"deepseek-coder" }  \n'
    ).encode()


@pytest.mark.parametrize(
    ("body", "chunked"),
    [(_odd_body(10), False), (_odd_body(10), True), (_odd_body(200_000), True)],
    ids=["small", "chunked", "200k-chunked"],
)
def test_model_routed_body_arrives_byte_for_byte(
    gw: GatewayProcess,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    up_c: FakeUpstream,
    body: bytes,
    chunked: bool,
) -> None:
    headers = {"content-type": "application/json; charset=utf-8", "authorization": "Bearer k"}
    content: Any = iter([body[:7], body[7:5000], body[5000:]]) if chunked else body
    with client(gw) as c:
        resp = c.post("/v1/chat/completions", content=content, headers=headers)
    assert resp.status_code == 200, resp.text
    rec = only(up_b, upstream, up_c)
    assert rec.body == body


def test_unknown_model_on_a_route_where_all_list_models_is_not_found(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream
) -> None:
    with sdk(gw, "/m/v1") as c, pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="llama-3-70b", messages=[{"role": "user", "content": "x"}])
    err = info.value
    assert err.code == "model_not_found"
    assert err.param == "model"
    assert "llama-3-70b" in err.message
    assert upstream.requests == up_b.requests == up_c.requests == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "gpt-4o", "messages": [', "invalid_json"),
        (b"not json at all", "invalid_json"),
        (b'[{"model": "gpt-4o"}]', "invalid_json"),
        (b'{"model": "deepseek-coder", "messages": [], "model": "gpt-4o"}', "invalid_json"),
        (b'{"model": 4, "messages": []}', None),
    ],
    ids=["truncated", "not-json", "array", "duplicate-model", "model-not-a-string"],
)
def test_a_body_the_gateway_cannot_route_is_refused_before_any_upstream(
    gw: GatewayProcess,
    upstream: FakeUpstream,
    up_b: FakeUpstream,
    up_c: FakeUpstream,
    body: bytes,
    code: str | None,
) -> None:
    with client(gw) as c:
        resp = c.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json", "authorization": f"Bearer {USER_KEY}"},
        )
        assert resp.status_code == 400, resp.text
        if code is not None:
            assert json_error(resp)["code"] == code
        assert resp.headers.get("x-should-retry") == "false"
        # the connection stays usable
        assert c.get("/healthz").status_code == 200
    assert upstream.requests == up_b.requests == up_c.requests == []


# --------------------------------------------------------------------------- /v1/models union


def _model_list(owner: str, ids: list[str]) -> Reply:
    data = [{"id": i, "object": "model", "created": 1, "owned_by": owner} for i in ids]
    return Reply(
        headers=[("content-type", "application/json")],
        body=json.dumps({"object": "list", "data": data}).encode(),
    )


EXPECTED_UNION = [
    ("gpt-4o", "from-a"),
    ("gpt-4o-mini", "from-a"),
    ("deepseek-chat", "from-b"),
    ("deepseek-coder", "from-b"),
    ("qwen-max", "m-down"),  # unreachable upstream: its exact configured names
]


def test_sdk_model_list_is_the_union_of_what_each_upstream_serves(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    upstream.script(
        "GET",
        "/v1/models",
        _model_list("from-a", ["gpt-4o", "gpt-4o-mini", "whisper-1", "deepseek-chat"]),
    )
    up_b.script(
        "GET",
        "/v1/models",
        _model_list("from-b", ["deepseek-chat", "gpt-4o", "deepseek-coder", "deepseek-r1"]),
    )
    with sdk(gw, "/m/v1") as c:
        models = list(c.models.list())
    assert [(m.id, m.owned_by) for m in models] == EXPECTED_UNION
    down = next(m for m in models if m.id == "qwen-max")
    assert (down.object, down.created) == ("model", 0)
    for up in (upstream, up_b):
        rec = only(up)
        assert rec.target == "/v1/models"
        assert rec.headers_named("authorization") == [f"Bearer {USER_KEY}"]


def test_model_list_without_a_client_key_uses_each_upstreams_own_key(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    with client(gw) as c:
        resp = c.get("/m/v1/models")
    assert resp.status_code == 200
    ids = [m["id"] for m in resp.json()["data"]]
    # both fakes list the same defaults; gpt-* go to A; B's names are not in its list
    assert ids == ["gpt-4o-mini", "gpt-4o", "qwen-max"]
    assert only(upstream).headers_named("authorization") == [f"Bearer {KEY_A}"]
    assert only(up_b).headers_named("authorization") == [f"Bearer {KEY_B}"]
    assert_only_own_keys(upstream, (KEY_A,))
    assert_only_own_keys(up_b, (KEY_B,))
    for key in ALL_KEYS:
        assert_no_secret(resp, secret=key)


# --------------------------------------------------------------------------- keys and schemes


def _ok(up: FakeUpstream) -> None:
    up.script("GET", "/v1/models", _model_list("c", ["m"]))


@pytest.mark.parametrize(
    ("path", "header", "value", "target"),
    [
        ("/az/v1/models", "api-key", KEY_AZ, "/v1/models"),
        ("/anth/v1/models", "x-api-key", KEY_X, "/v1/models"),
        ("/gem/v1/models", None, None, f"/v1/models?key={KEY_Q}"),
        ("/gem/v1/models?limit=2", None, None, f"/v1/models?limit=2&key={KEY_Q}"),
        ("/rr/v1/models", "authorization", None, "/v1/models"),
    ],
    ids=["api-key", "x-api-key", "query", "query-appended", "bearer-keys"],
)
def test_upstream_key_is_sent_in_its_auth_scheme(
    gw: GatewayProcess,
    up_c: FakeUpstream,
    path: str,
    header: str | None,
    value: str | None,
    target: str,
) -> None:
    _ok(up_c)
    with client(gw) as c:
        resp = c.get(path)
    assert resp.status_code == 200
    rec = only(up_c)
    assert rec.target == target
    if header != "authorization":
        assert rec.header("authorization") is None
    if header is not None and value is not None:
        assert rec.headers_named(header) == [value]
    own = {"az": (KEY_AZ,), "anth": (KEY_X,), "gem": (KEY_Q,), "rr": KEY_RR}[path.split("/")[1]]
    assert_only_own_keys(up_c, own)
    for key in ALL_KEYS:
        assert_no_secret(resp, secret=key)


def test_bearer_keys_are_used_round_robin(gw: GatewayProcess, up_c: FakeUpstream) -> None:
    _ok(up_c)
    with client(gw) as c:
        for _ in range(6):
            assert c.get("/rr/v1/models").status_code == 200
    used = [r.header("authorization") for r in up_c.wait_for_requests(6)]
    assert collections.Counter(used) == {f"Bearer {k}": 2 for k in KEY_RR}
    assert used[:3] == used[3:]  # a fixed rotation


@pytest.mark.parametrize(
    ("path", "header", "target"),
    [
        ("/az/v1/models", "api-key", "/v1/models"),
        ("/anth/v1/models", "x-api-key", "/v1/models"),
        ("/gem/v1/models", None, f"/v1/models?key={USER_KEY}"),
    ],
    ids=["api-key", "x-api-key", "query"],
)
def test_client_bearer_key_is_translated_to_the_upstream_scheme(
    gw: GatewayProcess, up_c: FakeUpstream, path: str, header: str | None, target: str
) -> None:
    _ok(up_c)
    with client(gw) as c:
        resp = c.get(path, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert resp.status_code == 200
    rec = only(up_c)
    assert rec.target == target
    assert rec.header("authorization") is None
    if header is not None:
        assert rec.headers_named(header) == [USER_KEY]
    for key in ALL_KEYS:  # the configured key is not added next to the client's
        assert_no_secret(everything([rec]), secret=key)


def test_each_upstream_only_ever_sees_its_own_keys(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, up_c: FakeUpstream
) -> None:
    _ok(up_c)
    with client(gw) as c:
        c.post("/v1/chat/completions", json=chat_body("gpt-4o"))  # main (A)
        c.post("/v1/chat/completions", json=chat_body("deepseek-coder"))  # ds-glob (B)
        c.post("/v1/chat/completions", json=chat_body("deepseek-chat"))  # ds-exact (C)
        c.post("/deepseek/chat/completions", json=chat_body("x"))  # deepseek (B)
        c.post("/m/chat/completions", json=chat_body("gpt-4o"))  # m-a (A)
        for p in ("/az", "/anth", "/gem", "/rr"):
            c.get(p + "/v1/models")
    assert len(upstream.wait_for_requests(2)) == 2
    assert len(up_b.wait_for_requests(2)) == 2
    assert len(up_c.wait_for_requests(5)) == 5
    assert_only_own_keys(upstream, (KEY_A,))
    assert_only_own_keys(up_b, (KEY_B,))
    assert_only_own_keys(up_c, (KEY_C, KEY_AZ, KEY_X, KEY_Q, *KEY_RR))
    assert [r.header("authorization") for r in upstream.requests] == [f"Bearer {KEY_A}"] * 2
    assert [r.header("authorization") for r in up_b.requests] == [f"Bearer {KEY_B}"] * 2
    assert up_c.requests[0].header("authorization") == f"Bearer {KEY_C}"


def test_startup_log_lists_every_route_without_keys(gw: GatewayProcess, up_b: FakeUpstream) -> None:
    out = gw.output()
    port_b = up_b.port
    for line in (
        "route / -> main",
        "route / -> ds-glob",
        f"route /deepseek -> deepseek (http://127.0.0.1:{port_b})",
        "-> outer (",
        "-> inner (",
        "route /g -> gen",
        "route /m -> m-down",
        "route /rr -> rr",
    ):
        assert line in out, out
    rr_ids = " ".join(key_id(k.encode()) for k in KEY_RR)
    assert f"keys {rr_ids}" in out  # the pool, by key id only
    for key in ALL_KEYS:
        assert_no_secret(out, secret=key)


# --------------------------------------------------------------------------- SSRF


def _collector_untouched(col: Collector) -> None:
    # the collector itself counts: a direct connection is seen
    before = col.accepted
    socket.create_connection(("127.0.0.1", col.port), timeout=2).close()
    col.wait_for(before + 1)
    col.accepted -= 1


def test_client_supplied_destinations_never_change_the_upstream(
    gw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, collector: Collector
) -> None:
    _collector_untouched(collector)
    evil = collector.url
    evil_host = f"127.0.0.1:{collector.port}"
    body = chat_body("gpt-4o", api_base=evil + "/v1", base_url=evil, api_host=evil)
    header_sets = [
        {"X-Upstream-Url": evil},
        {"X-Api-Base": evil + "/v1"},
        {"X-Base-Url": evil},
        {"Host": evil_host},
        {"X-Forwarded-Host": evil_host, "Forwarded": f"host={evil_host}"},
    ]
    with client(gw) as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/deepseek/v1/chat/completions", json=body).status_code == 200
        for headers in header_sets:
            resp = c.post("/v1/chat/completions", json=chat_body("gpt-4o"), headers=headers)
            assert resp.status_code == 200
    for target in (f"http://{evil_host}/v1/files", f"http://{evil_host}/deepseek/v1/models"):
        with RawConn(gw.port) as conn:
            conn.send(raw_request("GET", target, [("Connection", "close")], host=evil_host))
            resp = conn.read_response()
            assert resp.status in (200, 400, 404), resp
    assert len(upstream.wait_for_requests(1 + len(header_sets))) >= 1 + len(header_sets)
    for rec in upstream.requests + up_b.requests:
        assert rec.header("host") in (f"127.0.0.1:{upstream.port}", f"127.0.0.1:{up_b.port}")
    assert collector.accepted == 0


# --------------------------------------------------------------------------- fallbacks


def test_refused_upstream_falls_back_and_the_sdk_gets_the_answer(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    with sdk(fgw, "/refused/v1") as c:
        reply = c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "anyone there"}]
        )
    assert reply.choices[0].message.content == chat_reply_text("anyone there")
    rec = only(up_b, upstream)
    assert rec.target == "/v1/chat/completions"
    assert rec.headers_named("authorization") == [f"Bearer {USER_KEY}"]


def test_fallback_uses_the_fallbacks_own_key(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    body = json.dumps(chat_body("gpt-4o", "with keys")).encode()
    with client(fgw) as c:
        resp = c.post(
            "/refused/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 200
    rec = only(up_b, upstream)
    assert rec.body == body
    assert rec.headers_named("authorization") == [f"Bearer {KEY_B}"]
    assert_only_own_keys(up_b, (KEY_B,))


@pytest.mark.parametrize("status", [503, 429, 500])
def test_an_overloaded_upstream_is_replaced_by_its_fallback(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream, status: int
) -> None:
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            status=status,
            # retry-after-ms: a 429 cools A's key only this long, so later tests still reach A
            headers=[
                ("content-type", "application/json"),
                ("x-from", "flaky-a"),
                ("retry-after-ms", "1"),
            ],
            body=b'{"error": {"message": "overloaded-on-a", "type": "server_error"}}',
        ),
    )
    body = json.dumps(chat_body("gpt-4o", "fall over")).encode()
    with client(fgw) as c:
        resp = c.post(
            "/flaky/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == chat_reply_text("fall over")
    assert "x-from" not in resp.headers
    assert b"overloaded-on-a" not in resp.content
    a_rec, b_rec = only(upstream), only(up_b)
    assert a_rec.body == b_rec.body == body
    assert a_rec.headers_named("authorization") == [f"Bearer {KEY_A}"]
    assert b_rec.headers_named("authorization") == [f"Bearer {KEY_B}"]
    assert_only_own_keys(up_b, (KEY_B,))
    assert_only_own_keys(upstream, (KEY_A,))


def test_when_the_fallback_fails_too_its_answer_reaches_the_client(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    upstream.script("POST", "/v1/chat/completions", Reply(status=503, body=b"a is down"))
    up_b.script("POST", "/v1/chat/completions", Reply(status=502, body=b"b is down too"))
    with client(fgw) as c:
        resp = c.post("/flaky/v1/chat/completions", json=chat_body("gpt-4o"))
    assert (resp.status_code, resp.content) == (502, b"b is down too")
    only(upstream)
    only(up_b)


def test_max_fallbacks_zero_gives_the_client_the_first_answer(
    tmp_path: Path, upstream: FakeUpstream, up_b: FakeUpstream, dead_url: str
) -> None:
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(status=503, headers=[("x-from", "flaky-a")], body=b"a is overloaded"),
    )
    gateway = _start(tmp_path, fallback_config(upstream.url, up_b.url, dead_url, max_fallbacks=0))
    try:
        with client(gateway) as c:
            resp = c.post("/flaky/v1/chat/completions", json=chat_body("gpt-4o"))
            refused = c.post("/refused/v1/chat/completions", json=chat_body("gpt-4o"))
    finally:
        _finish(gateway)
    assert (resp.status_code, resp.content) == (503, b"a is overloaded")
    assert resp.headers["x-from"] == "flaky-a"
    assert refused.status_code == 502
    assert json_error(refused)["code"] == "upstream_connect_error"
    only(upstream)
    assert up_b.requests == []


def test_no_fallback_once_a_stream_has_started(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "par"}}]},
        {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "t"}}]},
    ]
    upstream.script(
        "POST",
        "/v1/chat/completions",
        Reply(
            headers=[("content-type", "text/event-stream")],
            chunks=sse(events)[:2],
            end="reset",
        ),
    )
    with (
        client(fgw) as c,
        c.stream(
            "POST", "/flaky/v1/chat/completions", json=chat_body("gpt-4o", stream=True)
        ) as resp,
    ):
        assert resp.status_code == 200
        text = resp.read().decode()
    lines = [ln for ln in text.split("\n\n") if ln]
    assert [json.loads(ln[6:]) for ln in lines[:2]] == events
    error = json.loads(lines[-1][6:])["error"]
    assert error["code"] == "upstream_disconnected"
    assert "[DONE]" not in text
    only(upstream)
    assert up_b.requests == []


def test_a_read_timeout_is_not_retried_elsewhere(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    upstream.script("POST", "/v1/chat/completions", Reply(headers_delay=5.0, body=b"too late"))
    started = time.monotonic()
    with client(fgw) as c:
        resp = c.post("/flaky/v1/chat/completions", json=chat_body("gpt-4o"))
    elapsed = time.monotonic() - started
    assert resp.status_code == 504
    assert json_error(resp)["code"] == "upstream_timeout"
    assert READ_TIMEOUT <= elapsed < 4.0
    rec = only(upstream)
    upstream.connection_closed_at(rec.conn_id)  # the gateway gave up on A's connection
    assert up_b.requests == []


def test_a_large_body_is_not_replayed_on_a_fallback(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    body = json.dumps(chat_body("gpt-4o", "y" * (300 * 1024))).encode()
    assert len(body) > 256 * 1024
    with client(fgw) as c:
        resp = c.post(
            "/refused/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 502
    assert json_error(resp)["code"] == "upstream_connect_error"
    assert upstream.requests == up_b.requests == []


def test_a_path_no_route_serves_is_route_not_found(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    with client(fgw) as c:
        resp = c.get("/v1/models")
        other = c.get("/refusedx/v1/models")
    for r in (resp, other):
        assert r.status_code == 404
        assert json_error(r)["code"] == "route_not_found"
    assert upstream.requests == up_b.requests == []


def test_fallback_log_names_both_upstreams_without_keys(
    fgw: GatewayProcess, up_b: FakeUpstream
) -> None:
    with client(fgw) as c:
        assert c.post("/refused/v1/chat/completions", json=chat_body("gpt-4o")).status_code == 200
    only(up_b)
    out = fgw.output()
    assert "upstream dead failed before answering; trying backup" in out
    assert "route /refused -> dead" in out
    for key in ALL_KEYS:
        assert_no_secret(out, secret=key)


# --------------------------------------------------------------------------- more edges


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/deepseek/v1/chat/completions"],
                         ids=["model-routed", "single-upstream"])  # fmt: skip
def test_a_client_expecting_100_continue_is_told_to_send_its_body(
    gw: GatewayProcess, up_b: FakeUpstream, path: str
) -> None:
    """Clients that send `Expect: 100-continue` wait for it before sending the body."""
    body = json.dumps(chat_body("deepseek-coder", "expecting")).encode()
    head = raw_request(
        "POST",
        path,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Expect", "100-continue"),
        ],
        host="gw.test",
        content_length=False,
    )
    with RawConn(gw.port) as conn:
        conn.send(head)  # the head only: no body until 100 Continue
        assert conn.read_interim("POST", timeout=2.0) == 100
        conn.send(body)
        resp = conn.read_response("POST")
    assert resp.status == 200
    assert only(up_b).body == body


@pytest.mark.parametrize(
    ("path", "headers", "header"),
    [
        ("/az/v1/models", {"api-key": USER_KEY}, "api-key"),
        ("/anth/v1/models", {"x-api-key": USER_KEY}, "x-api-key"),
    ],
    ids=["api-key", "x-api-key"],
)
def test_a_client_credential_in_the_upstream_scheme_is_not_doubled(
    gw: GatewayProcess, up_c: FakeUpstream, path: str, headers: dict[str, str], header: str
) -> None:
    """An Azure/Anthropic-style client sends its key in the scheme's own header: the upstream
    must get one credential, never the client's and the gateway's side by side."""
    _ok(up_c)
    with client(gw) as c:
        c.get(path, headers=headers)
    rec = only(up_c)
    assert len(rec.headers_named(header)) == 1, rec.headers


def test_a_client_query_key_is_not_doubled(gw: GatewayProcess, up_c: FakeUpstream) -> None:
    _ok(up_c)
    with client(gw) as c:
        c.get("/gem/v1/models", params={"key": USER_KEY})
    rec = only(up_c)
    assert rec.query.count("key=") == 1, rec.target


def test_an_upstream_closing_without_answering_is_replaced_by_its_fallback(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    upstream.script("POST", "/v1/chat/completions", Reply(raw=b""))
    with client(fgw) as c:
        resp = c.post("/flaky/v1/chat/completions", json=chat_body("gpt-4o", "closed"))
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == chat_reply_text("closed")
    assert 1 <= len(upstream.requests) <= 2  # a stale pooled connection may be retried once
    only(up_b)


@pytest.mark.parametrize(("budget", "status"), [(1, 502), (2, 200)])
def test_fallbacks_stop_at_max_fallbacks(
    tmp_path: Path, up_b: FakeUpstream, dead_url: str, budget: int, status: int
) -> None:
    config = {
        "max_fallbacks": budget,
        "upstreams": [
            {"name": "first", "base_url": dead_url, "fallbacks": ["second", "third"]},
            {"name": "second", "base_url": dead_url, "route": "/second"},
            {"name": "third", "base_url": up_b.url, "route": "/third", "api_key": KEY_B},
        ],
    }
    gateway = _start(tmp_path, config)
    try:
        with client(gateway) as c:
            resp = c.post("/v1/chat/completions", json=chat_body("gpt-4o"))
    finally:
        _finish(gateway)
    assert resp.status_code == status
    assert len(up_b.requests) == (1 if status == 200 else 0)


def test_a_refused_upstream_falls_back_even_when_the_body_comes_after_the_head(
    fgw: GatewayProcess, up_b: FakeUpstream
) -> None:
    """A small body that is still on its way when the connect fails is awaited, then
    replayed on the fallback: whether a request falls back must not depend on TCP timing."""
    body = json.dumps(chat_body("gpt-4o", "late body")).encode()
    head = raw_request(
        "POST",
        "/refused/v1/chat/completions",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        content_length=False,
    )
    with RawConn(fgw.port) as conn:
        conn.send(head)
        # the gateway has no body yet: it must not answer (502) before the body arrives
        with pytest.raises(RawTimeout):
            conn.read_head("POST", timeout=0.5)
        conn.send(body)
        resp = conn.read_response("POST")
    assert resp.status == 200, resp.body
    assert only(up_b).body == body


def test_a_large_body_gets_the_first_upstreams_error_not_a_replay(
    fgw: GatewayProcess, upstream: FakeUpstream, up_b: FakeUpstream
) -> None:
    upstream.script("POST", "/v1/chat/completions", Reply(status=503, body=b"a is busy"))
    body = json.dumps(chat_body("gpt-4o", "z" * (300 * 1024))).encode()
    with client(fgw) as c:
        resp = c.post(
            "/flaky/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert (resp.status_code, resp.content) == (503, b"a is busy")
    assert only(upstream).body == body
    assert up_b.requests == []
