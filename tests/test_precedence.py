"""Sources layer in a fixed order: default < TOML file < environment < env file < --set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.daemons import run_daemon

from daemon.config import OriginKind, load_config

FILE = """
[server]
port = 8100

[server.tls]
min_version = "1.3"

[model]
path = "builtin:demo"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(FILE)
    return path


def test_default_when_no_source_sets_a_key(config_file: Path):
    config = load_config(config_file, environ={})
    assert config.settings.scheduler.max_running_requests == 128
    assert config.settings.server.tls.verify_client is False
    assert config.origin("scheduler.max_running_requests").kind is OriginKind.DEFAULT


@pytest.mark.parametrize(
    ("key", "env_var", "file_value", "env_value", "cli_value"),
    [
        ("server.port", "DAEMON_SERVER__PORT", 8100, 8200, 8300),  # scalar in a table
        ("server.tls.min_version", "DAEMON_SERVER__TLS__MIN_VERSION", "1.3", "1.2", "1.3"),  # nested table
    ],
)
def test_file_then_env_then_cli(config_file: Path, key, env_var, file_value, env_value, cli_value):
    def value(config):
        node = config.settings
        for part in key.split("."):
            node = getattr(node, part)
        return node

    from_file = load_config(config_file, environ={})
    assert value(from_file) == file_value
    assert from_file.origin(key).kind is OriginKind.FILE and from_file.origin(key).line is not None

    from_env = load_config(config_file, environ={env_var: str(env_value)})
    assert value(from_env) == env_value
    assert from_env.origin(key).name == env_var

    from_cli = load_config(config_file, environ={env_var: str(env_value)}, sets=[f"{key}={cli_value}"])
    assert value(from_cli) == cli_value
    assert from_cli.origin(key).kind is OriginKind.CLI


def test_env_file_sits_between_environment_and_cli(config_file: Path, tmp_path: Path):
    env_file = tmp_path / "daemon.env"
    env_file.write_text("DAEMON_SERVER__PORT=8250\n")
    config = load_config(config_file, environ={"DAEMON_SERVER__PORT": "8200"}, env_file=env_file)
    assert config.settings.server.port == 8250
    assert config.origin("server.port").kind is OriginKind.ENV_FILE
    config = load_config(config_file, environ={}, env_file=env_file, sets=["server.port=8300"])
    assert config.settings.server.port == 8300


def test_precedence_through_the_cli_with_sources(config_file: Path):
    shown = run_daemon(
        "config",
        "show",
        "-c",
        str(config_file),
        "--sources",
        "--set",
        "server.tls.min_version=1.2",
        env={"DAEMON_SERVER__PORT": "8200", "DAEMON_SCHEDULER__POLICY": "lof"},
    )
    assert shown.returncode == 0, shown.stderr
    lines = {line.split("=")[0].strip(): line for line in shown.stdout.splitlines() if "=" in line}
    assert lines["port"].startswith("port = 8200") and "environment variable DAEMON_SERVER__PORT" in lines["port"]
    assert lines["policy"].startswith('policy = "lof"')
    assert (
        lines["min_version"].startswith('min_version = "1.2"')
        and "--set server.tls.min_version" in lines["min_version"]
    )
    assert f"{config_file}:" in lines["host"] or "default" in lines["host"]
    assert "default" in lines["max_running_requests"]


def test_each_layer_changes_the_effective_config_hash(config_file: Path):
    outputs = [
        run_daemon("check", "-c", str(config_file), "--format", "json", *extra, env=env)
        for env, extra in [({}, ()), ({"DAEMON_SERVER__PORT": "8200"}, ()), ({}, ("--set", "server.port=8300"))]
    ]
    for out in outputs:
        assert out.returncode == 0, out.stdout + out.stderr
    assert len({json.loads(out.stdout)["hash"] for out in outputs}) == 3
