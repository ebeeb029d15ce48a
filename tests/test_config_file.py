"""The YAML configuration file, through the real command line: `check` and `run`.

Every bad file must stop the gateway with exit code 2 and a message naming the setting;
a good file must show its effective values with every secret masked.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_no_secret, free_port, run_cli, start_gateway

PREFIX = "openai-forward: configuration error: "

KEY_A = "sk-alpha-Qx7Lm2Np9Rt4Vw8Z"
KEY_B1 = "sk-bravo-Hk3Jd8Fs1Gp6Ty0W"
KEY_B2 = "sk-bravo-Mn5Bv2Cx9Lz4Kq7R"
PROXY_PASSWORD = "pr0xyPa55w0rdQZ"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def two(first: str = "", second: str = "") -> str:
    """A file with two upstreams; `first`/`second` are extra YAML lines for each."""
    return (
        "upstreams:\n"
        "  - name: a\n    base_url: http://127.0.0.1:9\n"
        + "".join(f"    {line}\n" for line in first.splitlines())
        + "  - name: b\n    base_url: http://127.0.0.1:10\n    route: /b\n"
        + "".join(f"    {line}\n" for line in second.splitlines())
    )


# (id, file text, extra env, message fragment that must be in stderr)
BAD_FILES: list[tuple[str, str, dict[str, str], str]] = [
    (
        "bad-base-url",
        two(second="base_url: htp://x"),
        {},
        "upstreams[1].base_url: 'htp://x' is not an http(s) URL",
    ),
    (
        "missing-name",
        "upstreams:\n  - base_url: http://127.0.0.1:9\n",
        {},
        "upstreams[0].name: is required (a non-empty string)",
    ),
    (
        "missing-base-url",
        "upstreams:\n  - name: a\n",
        {},
        "upstreams[0].base_url: is required (a non-empty string)",
    ),
    (
        "duplicate-name",
        two().replace("name: b", "name: a"),
        {},
        "upstreams[1].name: 'a' is also upstreams[0]'s name",
    ),
    (
        "route-not-a-path",
        two(first="route: x"),
        {},
        "upstreams[0].route: 'x' must be a plain path such as / or /deepseek",
    ),
    (
        "route-with-dots",
        two(first="route: /a/../b"),
        {},
        "upstreams[0].route: '/a/../b' must be a plain path",
    ),
    (
        "unknown-type",
        two(first="type: grpc"),
        {},
        "upstreams[0].type: 'grpc' is not one of openai, general",
    ),
    (
        "unknown-auth",
        two(first="auth: basic"),
        {},
        "upstreams[0].auth: 'basic' is not one of bearer, api-key, x-api-key, query:NAME",
    ),
    (
        "models-on-general",
        two(first="type: general\nmodels: [gpt-4o]"),
        {},
        "upstreams[0].models: only type openai upstreams can route by model",
    ),
    (
        "two-defaults-on-one-route",
        two(second="route: /"),
        {},
        "upstreams[1].route: '/' is served by 'a' and 'b', and neither lists models: "
        "which one gets a request would be ambiguous",
    ),
    (
        "fallback-to-nowhere",
        two(first="fallbacks: [nope]"),
        {},
        "upstreams[0].fallbacks: 'nope' is not the name of another upstream",
    ),
    (
        "fallback-to-itself",
        two(first="fallbacks: [a]"),
        {},
        "upstreams[0].fallbacks: 'a' is not the name of another upstream",
    ),
    (
        "keys-not-a-list",
        two(first="keys: 5"),
        {},
        "upstreams[0].keys: (value hidden) is not a list of non-empty strings",
    ),
    (
        "upstreams-not-a-list",
        "upstreams:\n  name: a\n  base_url: http://127.0.0.1:9\n",
        {},
        "upstreams: expected a list of upstreams",
    ),
    ("zero-read-timeout", "read_timeout: 0\n", {}, "read_timeout: 0.0 must be greater than zero"),
    (
        "negative-max-fallbacks",
        "max_fallbacks: -1\n",
        {},
        "max_fallbacks: -1 must be 0 or more",
    ),
    (
        "bad-read-timeout-from-env",
        "read_timeout: 5\n",
        {"OPENAI_FORWARD_READ_TIMEOUT": "x"},
        "OPENAI_FORWARD_READ_TIMEOUT: 'x' is not a number of seconds",
    ),
    (
        "unknown-top-level-key",
        "read_timout: 5\n",
        {},
        "read_timout: unknown setting (did you mean 'read_timeout'?)",
    ),
    (
        "unknown-upstream-key",
        "upstreams:\n  - name: a\n    base_ur: http://127.0.0.1:9\n",
        {},
        "upstreams[0].base_ur: unknown setting (did you mean 'base_url'?)",
    ),
    ("bad-yaml", "upstreams: [\n  - name: a\n", {}, "is not valid YAML"),
    ("top-level-list", "- name: a\n- name: b\n", {}, "expected a mapping of settings at the top"),
    (
        "missing-env-reference",
        two(first="api_key: ${H5_SURELY_NOT_SET}"),
        {},
        "upstreams[0].api_key: refers to ${H5_SURELY_NOT_SET}, which is not set",
    ),
]


BAD_PARAMS = [pytest.param(*c[1:], id=c[0]) for c in BAD_FILES]


@pytest.mark.parametrize(("text", "env", "fragment"), BAD_PARAMS)
def test_check_refuses_a_bad_file_naming_the_setting(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    out = cli("check", "--config", write(tmp_path, text), env=env)
    assert out.returncode == 2, out.stdout
    assert out.stdout == ""
    assert out.stderr.startswith(PREFIX), out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr


RUN_CASES = ["bad-base-url", "two-defaults-on-one-route", "unknown-top-level-key", "bad-yaml"]


@pytest.mark.parametrize(("text", "env", "fragment"), [p for p in BAD_PARAMS if p.id in RUN_CASES])
def test_run_with_a_bad_file_exits_2_without_listening(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    port = free_port()
    args = ["run", "--config", write(tmp_path, text), "--host", "127.0.0.1", "--port", str(port)]
    out = cli(*args, env=env, timeout=10)
    assert out.returncode == 2
    assert fragment in out.stderr
    assert "listening" not in out.stderr
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))


def test_a_key_in_a_bad_key_list_is_not_echoed(tmp_path: Path) -> None:
    """The error names the setting; it must not print the valid key next to the bad item."""
    out = cli("check", "--config", write(tmp_path, two(first=f'keys: ["{KEY_A}", 5]')))
    assert out.returncode == 2
    assert "upstreams[0].keys" in out.stderr
    assert_no_secret(out.stdout, out.stderr, secret=KEY_A)


def test_missing_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    out = cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.startswith(PREFIX)
    assert "nope.yaml" in out.stderr


# --------------------------------------------------------------------------- a good file

FULL = """\
# every kind of setting
host: 127.0.0.1
port: 9100
read_timeout: 42.5
connect_timeout: 3
max_fallbacks: 2
forwarded_for: true
log_level: WARNING
proxy: http://proxyuser:${H5_PROXY_PASSWORD}@proxy.internal:3128
upstreams:
  - name: openai
    base_url: https://api.openai.com
    api_key: ${H5_KEY_A}
    fallbacks: [azure]
  - name: deepseek.v2_x
    base_url: http://${H5_DS_HOST}:8080/api/
    route: /deepseek/
    keys:
      - ${H5_KEY_B1}
      - ${H5_KEY_B2}
    models: ["deepseek-*", deepseek-chat]
    proxy: http://u:${H5_PROXY_PASSWORD}@proxy2.internal:8080
  - name: azure
    base_url: https://example.openai.azure.com/openai
    route: /deepseek
    auth: api-key
    api_key: literal-${H5_KEY_A}-suffix
    models: [gpt-4o]
  - name: gemini
    base_url: https://generativelanguage.googleapis.com/v1beta/openai
    route: /gemini
    auth: query:key
    api_key: ${H5_KEY_B1}
  - name: raw
    base_url: http://127.0.0.1:9
    route: /raw
    type: general
    auth: x-api-key
"""

FULL_ENV = {
    "H5_KEY_A": KEY_A,
    "H5_KEY_B1": KEY_B1,
    "H5_KEY_B2": KEY_B2,
    "H5_PROXY_PASSWORD": PROXY_PASSWORD,
    "H5_DS_HOST": "ds.internal",
}


def check_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = cli("check", *args, env=env)
    assert out.returncode == 0, out.stderr
    for secret in (KEY_A, KEY_B1, KEY_B2, PROXY_PASSWORD):
        assert_no_secret(out.stdout, out.stderr, secret=secret)
    shown: dict[str, Any] = json.loads(out.stdout)
    return shown


def test_check_shows_a_full_file_expanded_with_every_secret_masked(tmp_path: Path) -> None:
    shown = check_json("--config", write(tmp_path, FULL), env=FULL_ENV)
    assert (shown["host"], shown["port"], shown["read_timeout"]) == ("127.0.0.1", 9100, 42.5)
    assert (shown["connect_timeout"], shown["max_fallbacks"]) == (3.0, 2)
    assert shown["forwarded_for"] is True
    assert shown["log_level"] == "warning"
    assert shown["proxy"] == "http://proxyuser:***@proxy.internal:3128"
    ups = {u["name"]: u for u in shown["upstreams"]}
    assert list(ups) == ["openai", "deepseek.v2_x", "azure", "gemini", "raw"]
    assert ups["openai"]["api_key"] == "***"
    assert ups["openai"]["fallbacks"] == ["azure"]
    assert ups["openai"]["route"] == "/"
    assert (ups["openai"]["type"], ups["openai"]["auth"]) == ("openai", "bearer")
    ds = ups["deepseek.v2_x"]
    assert ds["base_url"] == "http://ds.internal:8080/api/"  # ${H5_DS_HOST} expanded
    assert ds["keys"] == ["***", "***"]
    assert ds["models"] == ["deepseek-*", "deepseek-chat"]
    assert ds["proxy"] == "http://u:***@proxy2.internal:8080"
    assert ups["azure"]["api_key"] == "***"
    assert ups["azure"]["auth"] == "api-key"
    assert ups["gemini"]["auth"] == "query:key"
    assert ups["raw"]["type"] == "general"
    assert ups["raw"]["api_key"] == ""


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    shown = check_json("--config", write(tmp_path, "# nothing\n"))
    assert (shown["port"], shown["read_timeout"], shown["upstreams"]) == (8000, 600.0, [])


def test_environment_beats_the_file_and_flags_beat_both(tmp_path: Path) -> None:
    path = write(tmp_path, "read_timeout: 5\nconnect_timeout: 4\nbase_url: http://file.test\n")
    shown = check_json(
        "--config",
        path,
        "--base-url",
        "http://flag.test",
        env={"OPENAI_FORWARD_READ_TIMEOUT": "7", "OPENAI_BASE_URL": "http://env.test"},
    )
    assert shown["connect_timeout"] == 4.0  # file only
    assert shown["read_timeout"] == 7.0  # env over file
    assert shown["base_url"] == "http://flag.test"  # flag over env over file


def test_check_accepts_the_port_flag_of_run(tmp_path: Path) -> None:
    """`check` shows the configuration `run` would use, so it takes run's flags too."""
    path = write(tmp_path, "port: 9001\n")
    shown = check_json("--config", path, "--port", "9003", env={"OPENAI_FORWARD_PORT": "9002"})
    assert shown["port"] == 9003


def test_run_listens_on_the_flag_port_over_file_and_env(tmp_path: Path) -> None:
    file_port, env_port = free_port(), free_port()
    path = write(tmp_path, f"port: {file_port}\nhost: 127.0.0.1\n")
    gw = start_gateway(
        "http://127.0.0.1:9",
        args=["--config", path],
        env={"OPENAI_FORWARD_PORT": str(env_port)},
        api_key=None,
    )
    try:
        assert gw.port not in (file_port, env_port)  # start_gateway's --port answered /healthz
        for port in (file_port, env_port):
            with pytest.raises(ConnectionRefusedError), socket.socket() as s:
                s.settimeout(2)
                s.connect(("127.0.0.1", port))
    finally:
        gw.cleanup()


def test_upstreams_from_the_environment_as_json_replace_the_file_list(tmp_path: Path) -> None:
    path = write(tmp_path, two())
    env_list = [
        {"name": "env-one", "base_url": "http://one.test", "api_key": KEY_B1},
        {"name": "env-two", "base_url": "http://two.test", "route": "/two", "auth": "x-api-key"},
    ]
    shown = check_json("--config", path, env={"OPENAI_FORWARD_UPSTREAMS": json.dumps(env_list)})
    assert [(u["name"], u["route"]) for u in shown["upstreams"]] == [
        ("env-one", "/"),
        ("env-two", "/two"),
    ]
    assert shown["upstreams"][0]["api_key"] == "***"
    assert shown["upstreams"][1]["auth"] == "x-api-key"


def test_upstreams_from_the_environment_are_validated() -> None:
    out = cli("check", env={"OPENAI_FORWARD_UPSTREAMS": '[{"name": "x"}]'})
    assert out.returncode == 2
    assert "upstreams[0].base_url: is required" in out.stderr
    out = cli("check", env={"OPENAI_FORWARD_UPSTREAMS": '{"name": "x"'})
    assert out.returncode == 2
    assert "OPENAI_FORWARD_UPSTREAMS" in out.stderr


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    shown = check_json(env={**FULL_ENV, "OPENAI_FORWARD_CONFIG": path})
    assert [u["name"] for u in shown["upstreams"]][:2] == ["openai", "deepseek.v2_x"]
    assert shown["read_timeout"] == 42.5


def test_config_flag_beats_the_config_environment_variable(tmp_path: Path) -> None:
    env_file = write(tmp_path, "read_timeout: 11\n", "env.yaml")
    flag_file = write(tmp_path, "read_timeout: 22\n", "flag.yaml")
    shown = check_json("--config", flag_file, env={"OPENAI_FORWARD_CONFIG": env_file})
    assert shown["read_timeout"] == 22.0
