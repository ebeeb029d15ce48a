"""Configuration: environment and flags, validation messages that name the key, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from openai_forward.config import Config, ConfigError, env_name, load, parse_base_url


def test_defaults_match_the_seed_contract():
    cfg = load({})
    assert (cfg.host, cfg.port, cfg.workers) == ("0.0.0.0", 8000, 1)
    assert cfg.base_url == "https://api.openai.com"
    assert cfg.api_key == ""


def test_environment_names_follow_the_prefix_rule_except_the_seed_two():
    assert env_name("read_timeout") == "OPENAI_FORWARD_READ_TIMEOUT"
    assert env_name("base_url") == "OPENAI_BASE_URL"
    assert env_name("api_key") == "OPENAI_API_KEY"
    cfg = load(
        {
            "OPENAI_BASE_URL": "http://127.0.0.1:9/openai/",
            "OPENAI_API_KEY": "sk-abc",
            "OPENAI_FORWARD_READ_TIMEOUT": "2.5",
            "OPENAI_FORWARD_FORWARDED_FOR": "yes",
            "OPENAI_FORWARD_MAX_BODY_SIZE": "1_000",
        }
    )
    assert cfg.read_timeout == 2.5
    assert cfg.forwarded_for is True
    assert cfg.max_body_size == 1000
    assert cfg.upstream.base_path == "/openai"
    assert cfg.upstream.host_header == b"127.0.0.1:9"


def test_flags_win_over_the_environment():
    cfg = load({"OPENAI_FORWARD_PORT": "9000"}, {"port": "9999", "workers": "2", "host": None})
    assert (cfg.port, cfg.workers, cfg.host) == (9999, 2, "0.0.0.0")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OPENAI_FORWARD_READ_TIMEOUT": "ten"}, "READ_TIMEOUT: 'ten' is not a number"),
        ({"OPENAI_FORWARD_READ_TIMEOUT": "0"}, "read_timeout: 0.0 must be greater than zero"),
        ({"OPENAI_FORWARD_READ_TIMEOUT": "nan"}, "is not a finite number"),
        ({"OPENAI_FORWARD_PORT": "70000"}, "port: 70000 is not a TCP port"),
        ({"OPENAI_FORWARD_WORKERS": "x"}, "OPENAI_FORWARD_WORKERS: 'x' is not a whole number"),
        ({"OPENAI_FORWARD_FORWARDED_FOR": "maybe"}, "'maybe' is not a boolean"),
        ({"OPENAI_BASE_URL": "htp://x"}, "base_url: 'htp://x' is not an http(s) URL"),
        ({"OPENAI_BASE_URL": "https://u:p@x"}, "must not carry credentials"),
        ({"OPENAI_BASE_URL": "https://x/a/../b"}, "has a path that is not plain"),
        ({"OPENAI_FORWARD_HEALTH_PATH": "healthz"}, "health_path: 'healthz' must be a path"),
        ({"OPENAI_FORWARD_LOG_LEVEL": "loud"}, "log_level: 'loud' is not one of"),
        ({"OPENAI_API_KEY": "sk-a\nb"}, "api_key: contains a control character"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_key(environ, message):
    with pytest.raises(ConfigError) as info:
        load(environ)
    assert message in str(info.value)


def test_ipv6_upstream_gets_a_bracketed_host_header():
    up = parse_base_url("http://[::1]:8080")
    assert (up.host, up.port, up.host_header) == ("::1", 8080, b"[::1]:8080")


def test_masked_settings_never_show_the_key():
    cfg = Config(api_key="sk-secret-value-123456")
    assert cfg.masked()["api_key"] == "***"
    assert "sk-secret" not in repr(cfg)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def test_check_prints_the_effective_configuration_with_the_key_masked():
    out = _cli("check", env={"OPENAI_API_KEY": "sk-live-0123456789abcdef"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["api_key"] == "***"
    assert "0123456789" not in out.stdout + out.stderr


def test_check_shows_limits_and_masks_the_state_password():
    limits = '[{"scope": "key", "rpm": 10, "models": ["gpt-4o*"]}]'
    env = {"OPENAI_FORWARD_STATE": "redis://:hunter2pw@redis.internal:6379/0"}
    out = _cli("check", env={**env, "OPENAI_FORWARD_LIMITS": limits})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["state"] == "redis://:***@redis.internal:6379/0"
    assert shown["limits"][0]["limits"]["rpm"] == 10
    assert shown["limits"][0]["models"] == ["gpt-4o*"]
    assert "hunter2pw" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPENAI_FORWARD_LIMITS": '[{"scope": "user", "rpm": 1}]'}, "limits[0].scope"),
        ({"OPENAI_FORWARD_LIMITS": '[{"scope": "key"}]'}, "limits[0]: set at least one"),
        ({"OPENAI_FORWARD_LIMITS": '[{"scope": "key", "rpm": 1.5}]'}, "limits[0].rpm"),
        ({"OPENAI_FORWARD_LIMITS": '[{"scope": "key", "rmp": 1}]'}, "did you mean 'rpm'"),
        ({"OPENAI_FORWARD_PRICES": '{"gpt-4o": {"input": 1}}'}, "prices.gpt-4o.output"),
        ({"OPENAI_FORWARD_STATE": "memcached://x"}, "state:"),
    ],
)
def test_bad_limit_settings_are_refused_naming_the_key(env: dict[str, str], message: str):
    out = _cli("check", env=env)
    assert out.returncode == 2
    assert message in out.stderr


def test_run_with_a_bad_setting_exits_non_zero_before_listening():
    out = _cli("run", "--port", "0", env={"OPENAI_BASE_URL": "ftp://example"})
    assert out.returncode == 2
    assert "base_url: 'ftp://example' is not an http(s) URL" in out.stderr


def test_both_seed_commands_are_installed():
    bindir = Path(sys.executable).parent
    for name in ("openai-forward", "openai_forward"):
        exe = bindir / name
        if not exe.exists():
            pytest.skip(f"{name} is not installed next to {sys.executable} (pip install .)")
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0
        assert out.stdout.startswith("openai-forward ")


def test_check_shows_each_key_pool_by_id_only():
    out = _cli("check", env={"OPENAI_API_KEY": "sk-live-0123456789abcdef"})
    assert out.returncode == 0, out.stderr
    pools = json.loads(out.stdout)["key_pools"]
    assert list(pools) == ["default"]
    assert pools["default"].startswith("<KeyPool 1 key: key-")
    assert "ready" in pools["default"]
    assert "0123456789" not in out.stdout
