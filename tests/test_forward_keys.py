"""Forward keys (issue 4), end to end: the `keys` CLI, a real gateway following the key store,
the 401/403 answers, and where the keys must never show up (upstream, store files, output).

Every store and config file lives in tmp_path; the CLI runs with tmp_path as its working
directory, so nothing is ever written in the repository.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import GatewayProcess, assert_no_secret, run_cli, start_gateway
from fakeupstream import FakeUpstream, Recorded, Reply
from rawhttp import RawConn

CHAT = "/v1/chat/completions"
JSON = [("content-type", "application/json")]
UP_KEY = "sk-Q7w3Rt9Yp2Lk5Mn8Zx4Cv6Bn1"  # the key the gateway's "openai" upstream holds
DS_KEY = "sk-Hx4Vb8Nc2Zq6Wm1JaS5dF7gH"  # the key of the "deepseek" upstream (route /deepseek)
CLIENT_KEY = "sk-Fq9Ws3Ed7Rg1Ty5UiO2pL4kJ"  # a client's own upstream key (pass-through)
SETTLE = 1.5  # a created or revoked key is seen by every worker within this many seconds

INVALID_KEY = {
    "message": "Incorrect API key provided.",
    "type": "invalid_request_error",
    "param": None,
    "code": "invalid_api_key",
}


def new_fk() -> str:
    return "fk-" + secrets.token_hex(20)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra)
    return env


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd)


def create_key(db: Path, name: str, *options: str) -> str:
    done = cli("keys", "--database", str(db), "create", "--name", name, *options, cwd=db.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def revoke_key(db: Path, name: str) -> None:
    done = cli("keys", "--database", str(db), "revoke", name, cwd=db.parent)
    assert done.returncode == 0, done.stderr


def write_config(
    tmp_path: Path,
    upstream_url: str,
    *,
    forward_keys: list[dict] | None = None,
    deepseek: bool = False,
    **top: object,
) -> Path:
    upstreams = [{"name": "openai", "base_url": upstream_url, "keys": [UP_KEY]}]
    if deepseek:
        upstreams.append(
            {"name": "deepseek", "base_url": upstream_url, "route": "/deepseek", "keys": [DS_KEY]}
        )
    doc: dict[str, object] = {"upstreams": upstreams, **top}
    doc.setdefault("database", str(tmp_path / "keys.db"))
    if forward_keys is not None:
        doc["forward_keys"] = forward_keys
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def launch(upstream_url: str, config: Path, workers: int = 1) -> GatewayProcess:
    return start_gateway(
        upstream_url, api_key=None, args=["--config", str(config)], workers=workers
    )


def chat(gw: GatewayProcess, headers: dict[str, str] | None = None, **body: object):
    """One chat request on a new connection."""
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(gw.url + CHAT, json=payload, headers=headers or {}, timeout=10)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def only_the_upstream_key_passes(rec: Recorded) -> Reply:
    """An upstream that accepts nothing but its own key: a 200 proves the key was swapped."""
    if rec.header("authorization") in (f"Bearer {UP_KEY}", f"Bearer {DS_KEY}"):
        body = b'{"id": "c1", "object": "chat.completion", "choices": [], "usage": null}'
        return Reply(headers=JSON, body=body)
    return Reply(status=401, headers=JSON, body=b'{"error": {"code": "invalid_api_key"}}')


def within(seconds: float, probe, start: float | None = None) -> float:
    """Poll `probe()` until it is true; fail after `seconds` (from `start`). Returns the time
    it took. Polling is the only way: the gateway gives no event when it reloads its keys."""
    start = time.monotonic() if start is None else start
    while not probe():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


def store_files(db: Path) -> list[Path]:
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]


def assert_store_holds_no_secret(db: Path, *keys: str) -> None:
    files = store_files(db)
    assert files, f"no key store at {db}"
    for path in files:
        data = path.read_bytes()
        for key in keys:
            assert_no_secret(data, secret=key)


def assert_invalid_key(resp: httpx.Response, message: str = INVALID_KEY["message"]) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json() == {"error": {**INVALID_KEY, "message": message}}
    assert resp.headers.get("x-should-retry") == "false"


# --------------------------------------------------------------------------- the CLI


def test_keys_create_prints_the_key_alone_on_stdout(tmp_path):
    db = tmp_path / "keys.db"
    done = cli("keys", "--database", str(db), "create", "--name", "alice", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    key = lines[0]
    assert key.startswith("fk-") and len(key) >= 32 and key.isascii() and " " not in key
    assert "alice" in done.stderr  # the note goes to stderr
    assert_no_secret(done.stderr, secret=key)
    assert_store_holds_no_secret(db, key)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("keys.db")) == []


def test_database_flag_is_accepted_after_the_action(tmp_path):
    db = tmp_path / "keys.db"
    done = cli("keys", "create", "--name", "alice", "--database", str(db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("fk-")
    listed = cli("keys", "list", "--json", "--database", str(db), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [k["name"] for k in json.loads(listed.stdout)] == ["alice"]


def test_keys_finds_the_store_through_the_config_file_or_the_environment(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"database": str(tmp_path / "from-config.db")}))
    done = cli("keys", "--config", str(config), "create", "--name", "alice", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    env = clean_env(OPENAI_FORWARD_DATABASE=str(tmp_path / "from-env.db"))
    run = [sys.executable, "-m", "openai_forward", "keys", "create", "--name", "bob"]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    for db, name in ((tmp_path / "from-config.db", "alice"), (tmp_path / "from-env.db", "bob")):
        listed = cli("keys", "--database", str(db), "list", "--json", cwd=tmp_path)
        assert [k["name"] for k in json.loads(listed.stdout)] == [name]


def test_keys_list_shows_name_id_and_prefix_but_never_the_key(tmp_path):
    db = tmp_path / "keys.db"
    alice = create_key(db, "alice", "--models", "gpt-4o*", "--routes", "/v1/chat/completions")
    bob = create_key(db, "bob", "--expires", "2099-01-01")
    table = cli("keys", "--database", str(db), "list", cwd=tmp_path)
    as_json = cli("keys", "--database", str(db), "list", "--json", cwd=tmp_path)
    assert table.returncode == 0 and as_json.returncode == 0, (table.stderr, as_json.stderr)
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert set(rows) == {"alice", "bob"}
    for name, key in (("alice", alice), ("bob", bob)):
        row = rows[name]
        assert row["id"] and row["id"] != key
        assert row["prefix"].startswith(key[:7]) and len(row["prefix"].rstrip("…")) <= 7
        assert row["state"] == "active"
        assert name in table.stdout and row["id"] in table.stdout and row["prefix"] in table.stdout
        for output in (table.stdout, table.stderr, as_json.stdout, as_json.stderr):
            assert_no_secret(output, secret=key)
    assert "gpt-4o*" in json.dumps(rows["alice"]["models"])
    assert "/v1/chat/completions" in json.dumps(rows["alice"]["routes"])
    assert "2099-01-01" in str(rows["bob"]["expires"])


def test_a_revoked_key_leaves_the_list_and_shows_with_all(tmp_path):
    db = tmp_path / "keys.db"
    alice = create_key(db, "alice")
    create_key(db, "carol")
    done = cli("keys", "--database", str(db), "revoke", "alice", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "revoked alice" in done.stdout
    active = json.loads(cli("keys", "--database", str(db), "list", "--json", cwd=tmp_path).stdout)
    assert [k["name"] for k in active] == ["carol"]
    table = cli("keys", "--database", str(db), "list", cwd=tmp_path).stdout
    assert "alice" not in table and "carol" in table
    every = cli("keys", "--database", str(db), "list", "--json", "--all", cwd=tmp_path)
    states = {k["name"]: k["state"] for k in json.loads(every.stdout)}
    assert states == {"alice": "revoked", "carol": "active"}
    assert_no_secret(every.stdout, done.stdout, secret=alice)


def test_revoking_an_unknown_key_exits_1_with_a_message(tmp_path):
    db = tmp_path / "keys.db"
    create_key(db, "alice")
    done = cli("keys", "--database", str(db), "revoke", "nobody", cwd=tmp_path)
    assert done.returncode == 1
    assert "nobody" in done.stderr
    assert done.stdout == ""


# --------------------------------------------------------------------------- following the store


@pytest.mark.parametrize("workers", [1, 2])
def test_a_running_gateway_accepts_a_key_created_after_it_started(upstream, tmp_path, workers):
    upstream.script("POST", CHAT, only_the_upstream_key_passes)
    config = write_config(tmp_path, upstream.url)
    db = tmp_path / "keys.db"
    gw = launch(upstream.url, config, workers)
    try:
        assert not db.exists()  # the store does not exist yet when the gateway starts
        key = create_key(db, "alice")
        created = time.monotonic()
        within(SETTLE, lambda: chat(gw, bearer(key)).status_code == 200, created)
        time.sleep(max(0.0, created + SETTLE - time.monotonic()))  # every worker has polled
        statuses = [chat(gw, bearer(key)).status_code for _ in range(20)]
        assert statuses == [200] * 20
        assert_invalid_key(chat(gw, bearer(CLIENT_KEY)))  # forward keys exist now
        assert len(upstream.requests) >= 21
        for rec in upstream.requests:
            assert rec.headers_named("authorization") == [f"Bearer {UP_KEY}"]
            assert_no_secret(rec.headers, rec.target, rec.body, secret=key)
    finally:
        gw.stop()
        out = gw.output()
        gw.cleanup()
    assert "Traceback" not in out
    assert_no_secret(out, secret=key)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_revoked_key_is_refused_by_every_worker_within_a_second_and_a_half(
    upstream, tmp_path, workers
):
    upstream.script("POST", CHAT, only_the_upstream_key_passes)
    db = tmp_path / "keys.db"
    key = create_key(db, "alice")
    gw = launch(upstream.url, write_config(tmp_path, upstream.url), workers)
    try:
        statuses = [chat(gw, bearer(key)).status_code for _ in range(10)]
        assert statuses == [200] * 10
        revoke_key(db, "alice")
        revoked = time.monotonic()
        within(SETTLE, lambda: chat(gw, bearer(key)).status_code == 401, revoked)
        before = len(upstream.requests)
        time.sleep(max(0.0, revoked + SETTLE - time.monotonic()))  # every worker has polled
        refused = [chat(gw, bearer(key)) for _ in range(20)]
        for resp in refused:
            assert_invalid_key(resp)
        # no forward key is left, yet clients may not fall back to their own keys
        assert_invalid_key(chat(gw, bearer(CLIENT_KEY)))
        assert len(upstream.requests) == before
    finally:
        gw.stop()
        out = gw.output()
        gw.cleanup()
    assert "Traceback" not in out
    assert_no_secret(out, secret=key)
    assert_store_holds_no_secret(db, key)


# --------------------------------------------------------------------------- one gateway, many keys


@dataclass
class Keys:
    open: str  # config-declared, no scope
    expired: str  # config-declared, expires 2020-01-01
    chat_only: str  # routes ["/v1/chat/completions"]
    deepseek_only: str  # routes ["deepseek"]
    mini_only: str  # models ["gpt-4o-mini*"]
    stored: str  # created with the CLI, active
    revoked: str  # created with the CLI, then revoked


@dataclass
class Setup:
    gw: GatewayProcess
    keys: Keys
    db: Path
    config: Path

    def every_secret(self) -> list[str]:
        return [*vars(self.keys).values(), UP_KEY, DS_KEY]


@pytest.fixture(scope="module")
def fk(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("forward-keys")
    db = tmp / "keys.db"
    stored, revoked = create_key(db, "carol"), create_key(db, "bob")
    revoke_key(db, "bob")
    keys = Keys(new_fk(), new_fk(), new_fk(), new_fk(), new_fk(), stored, revoked)
    declared = [
        {"name": "open", "key": keys.open},
        {"name": "expired", "key": keys.expired, "expires": "2020-01-01"},
        {"name": "chat", "key": keys.chat_only, "routes": ["/v1/chat/completions"]},
        {"name": "deep", "key": keys.deepseek_only, "routes": ["deepseek"]},
        {"name": "mini", "key": keys.mini_only, "models": ["gpt-4o-mini*"]},
    ]
    config = write_config(
        tmp, upstream.url, forward_keys=declared, deepseek=True, log_level="debug"
    )
    gw = launch(upstream.url, config)
    try:
        yield Setup(gw, keys, db, config)
    finally:
        gw.stop()
        out = gw.output()
        gw.cleanup()
        assert "Traceback" not in out, out


@pytest.mark.parametrize("which", ["unknown", "revoked", "expired"])
def test_a_bad_forward_key_gets_401_and_never_reaches_the_upstream(fk, upstream, which):
    key = {"unknown": new_fk(), "revoked": fk.keys.revoked, "expired": fk.keys.expired}[which]
    resp = chat(fk.gw, bearer(key))
    message = "This API key has expired." if which == "expired" else INVALID_KEY["message"]
    assert_invalid_key(resp, message)
    assert_no_secret(resp, secret=key)
    client = openai.OpenAI(base_url=fk.gw.url + "/v1", api_key=key, max_retries=2)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.code == "invalid_api_key"
    assert upstream.requests == []


def test_a_request_without_a_key_gets_401_when_forward_keys_exist(fk, upstream):
    resp = chat(fk.gw)
    assert_invalid_key(resp, "You didn't provide an API key.")
    assert upstream.requests == []


def test_a_clients_own_key_gets_401_when_forward_keys_exist(fk, upstream):
    assert_invalid_key(chat(fk.gw, bearer(CLIENT_KEY)))
    assert_invalid_key(chat(fk.gw, {"api-key": CLIENT_KEY}))
    assert upstream.requests == []


def test_the_health_path_needs_no_key(fk, upstream):
    assert httpx.get(fk.gw.url + "/healthz", timeout=5).status_code == 200


def test_the_sdk_with_a_forward_key_reaches_the_upstream_with_the_upstreams_key(fk, upstream):
    client = openai.OpenAI(
        base_url=fk.gw.url + "/v1",
        api_key=fk.keys.open,
        organization="org-client-own",
        project="proj_client_own",
        max_retries=0,
    )
    done = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
    )
    assert "hello" in done.choices[0].message.content
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "streamed" in text
    assert len(upstream.requests) == 2
    for rec in upstream.requests:
        assert rec.headers_named("authorization") == [f"Bearer {UP_KEY}"]
        assert rec.header("openai-organization") is None
        assert rec.header("openai-project") is None
        assert_no_secret(rec.headers, rec.target, rec.body, secret=fk.keys.open)


def test_a_key_from_the_store_works_like_a_declared_one(fk, upstream):
    resp = chat(fk.gw, bearer(fk.keys.stored))
    assert resp.status_code == 200, resp.text
    [rec] = upstream.requests
    assert rec.headers_named("authorization") == [f"Bearer {UP_KEY}"]
    assert_no_secret(rec.headers, rec.target, rec.body, secret=fk.keys.stored)


@pytest.mark.parametrize("header", ["api-key", "x-api-key"])
def test_a_forward_key_in_an_azure_or_anthropic_style_header_works_and_stays_here(
    fk, upstream, header
):
    resp = chat(fk.gw, {header: fk.keys.open})
    assert resp.status_code == 200, resp.text
    [rec] = upstream.requests
    assert rec.headers_named("authorization") == [f"Bearer {UP_KEY}"]
    assert rec.header(header) is None
    assert_no_secret(rec.headers, rec.target, rec.body, secret=fk.keys.open)


def test_a_bad_key_with_a_huge_content_length_gets_401_before_any_body(fk, upstream):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {new_fk()}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    )
    with RawConn(fk.gw.port, timeout=1.0) as conn:
        started = time.monotonic()
        conn.send(head.encode())
        resp = conn.read_head("POST", timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert conn.is_closed(1.0)  # the unread body cannot be taken for the next request
    assert resp.status == 401
    assert upstream.requests == []


def test_expect_100_continue_with_a_bad_key_gets_401_and_never_100(fk, upstream):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {new_fk()}\r\n"
        "Content-Type: application/json\r\nContent-Length: 64\r\nExpect: 100-continue\r\n\r\n"
    )
    with RawConn(fk.gw.port, timeout=1.0) as conn:
        conn.send(head.encode())
        resp = conn.read_response("POST", timeout=1.0)
        assert resp.status == 401
        assert resp.informational == []
        assert b"100 Continue" not in conn.rest(0.2)
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert upstream.requests == []


# --------------------------------------------------------------------------- scopes


def test_a_key_scoped_to_chat_may_chat_but_not_embed(fk, upstream):
    assert chat(fk.gw, bearer(fk.keys.chat_only)).status_code == 200
    without_v1 = httpx.post(
        fk.gw.url + "/chat/completions",
        json={"model": "gpt-4o", "messages": []},
        headers=bearer(fk.keys.chat_only),
        timeout=10,
    )
    assert without_v1.status_code == 200, without_v1.text
    embed = httpx.post(
        fk.gw.url + "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "x"},
        headers=bearer(fk.keys.chat_only),
        timeout=10,
    )
    assert embed.status_code == 403
    assert embed.json()["error"]["code"] == "route_not_allowed"
    next_door = httpx.post(
        fk.gw.url + CHAT + "x", json={}, headers=bearer(fk.keys.chat_only), timeout=10
    )
    assert next_door.status_code == 403  # a prefix matches whole path segments only
    assert [r.path for r in upstream.requests] == [CHAT, CHAT]


def test_a_key_scoped_to_an_upstream_reaches_that_upstream_only(fk, upstream):
    resp = httpx.post(
        fk.gw.url + "/deepseek/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": []},
        headers=bearer(fk.keys.deepseek_only),
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    elsewhere = chat(fk.gw, bearer(fk.keys.deepseek_only))
    assert elsewhere.status_code == 403
    assert elsewhere.json()["error"]["code"] == "route_not_allowed"
    [rec] = upstream.requests
    assert rec.headers_named("authorization") == [f"Bearer {DS_KEY}"]
    assert_no_secret(rec.headers, rec.target, rec.body, secret=fk.keys.deepseek_only)


def test_a_key_scoped_to_models_may_use_those_models_only(fk, upstream):
    client = openai.OpenAI(base_url=fk.gw.url + "/v1", api_key=fk.keys.mini_only, max_retries=2)
    for model in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_allowed"
    assert caught.value.param == "model"
    no_model = httpx.post(
        fk.gw.url + CHAT, json={"messages": []}, headers=bearer(fk.keys.mini_only), timeout=10
    )
    assert no_model.status_code == 403
    assert no_model.json()["error"]["code"] == "model_not_allowed"
    chunked = httpx.post(
        fk.gw.url + CHAT,
        content=iter([b'{"model": "gpt-4o",', b' "messages": []}']),
        headers={**bearer(fk.keys.mini_only), "content-type": "application/json"},
        timeout=10,
    )
    assert chunked.status_code == 403
    assert chunked.json()["error"]["code"] == "model_not_allowed"
    # a mislabelled body is still read as JSON: the scope cannot be slipped past (a token
    # endpoint takes JSON only, so even a multipart label is read as JSON there)
    for content_type in ("text/plain", None, "multipart/form-data; boundary=x"):
        headers = bearer(fk.keys.mini_only)
        if content_type:
            headers["Content-Type"] = content_type
        mislabelled = httpx.post(
            fk.gw.url + CHAT,
            content=b'{"model": "gpt-4o", "messages": []}',
            headers=headers,
            timeout=10,
        )
        assert mislabelled.status_code == 403, content_type
        assert mislabelled.json()["error"]["code"] == "model_not_allowed"
    listing = httpx.get(fk.gw.url + "/v1/models", headers=bearer(fk.keys.mini_only), timeout=10)
    assert listing.status_code == 200  # no JSON body, nothing to check
    assert [r.path for r in upstream.requests] == [CHAT, CHAT, "/v1/models"]
    assert [r.json()["model"] for r in upstream.requests[:2]] == [
        "gpt-4o-mini",
        "gpt-4o-mini-2024-07-18",
    ]


# --------------------------------------------------------------------------- client_keys


def test_with_client_keys_allow_a_clients_own_key_passes_through(upstream, tmp_path):
    fk_key = new_fk()
    config = write_config(
        tmp_path,
        upstream.url,
        forward_keys=[{"name": "open", "key": fk_key}],
        client_keys="allow",
    )
    gw = launch(upstream.url, config)
    try:
        account = {"openai-organization": "org-own", "openai-project": "proj_own"}
        own = chat(gw, {**bearer(CLIENT_KEY), **account})
        forward = chat(gw, {**bearer(fk_key), **account})
        anonymous = chat(gw)
        unknown = chat(gw, bearer(new_fk()))
    finally:
        gw.cleanup()
    assert [own.status_code, forward.status_code, anonymous.status_code] == [200] * 3
    assert_invalid_key(unknown)
    first, second, third = upstream.requests
    assert first.headers_named("authorization") == [f"Bearer {CLIENT_KEY}"]
    assert first.header("openai-organization") == "org-own"
    assert first.header("openai-project") == "proj_own"
    assert second.headers_named("authorization") == [f"Bearer {UP_KEY}"]
    assert second.header("openai-organization") is None
    assert second.header("openai-project") is None
    assert third.headers_named("authorization") == [f"Bearer {UP_KEY}"]
    for rec in upstream.requests:
        assert_no_secret(rec.headers, rec.target, rec.body, secret=fk_key)


def test_without_any_forward_key_the_gateway_passes_client_keys_through(upstream, tmp_path):
    gw = launch(upstream.url, write_config(tmp_path, upstream.url))
    try:
        own = chat(gw, {**bearer(CLIENT_KEY), "openai-organization": "org-own"})
        anonymous = chat(gw)
    finally:
        gw.cleanup()
    assert own.status_code == 200 and anonymous.status_code == 200
    first, second = upstream.requests
    assert first.headers_named("authorization") == [f"Bearer {CLIENT_KEY}"]
    assert first.header("openai-organization") == "org-own"
    assert second.headers_named("authorization") == [f"Bearer {UP_KEY}"]


# --------------------------------------------------------------------------- secrets at rest


def test_check_masks_the_forward_keys(tmp_path, upstream):
    key = new_fk()
    config = write_config(
        tmp_path,
        upstream.url,
        forward_keys=[{"name": "literal", "key": key}, {"name": "env", "key": "${FK_FROM_ENV}"}],
    )
    from_env = new_fk()
    done = subprocess.run(
        [sys.executable, "-m", "openai_forward", "check", "--config", str(config)],
        cwd=tmp_path,
        env=clean_env(FK_FROM_ENV=from_env),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert [k["key"] for k in shown["forward_keys"]] == ["***", "***"]
    assert [k["name"] for k in shown["forward_keys"]] == ["literal", "env"]
    for secret in (key, from_env, UP_KEY):
        assert_no_secret(done.stdout, done.stderr, secret=secret)


def test_the_store_and_the_gateway_output_hold_no_key(fk, upstream):
    # Use every key once more (and fail some), so this test stands on its own.
    for key in vars(fk.keys).values():
        chat(fk.gw, bearer(key))
        chat(fk.gw, bearer(key), model="gpt-4o-mini")
    assert_store_holds_no_secret(fk.db, *fk.every_secret())
    assert {p.name for p in store_files(fk.db)} >= {"keys.db"}
    output = fk.gw.output()
    for secret in fk.every_secret():
        assert_no_secret(output, secret=secret)
