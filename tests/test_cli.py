"""The `daemon` command line, run as operators and Ansible run it."""

from __future__ import annotations

import json
from pathlib import Path

import tomli
from harness.daemons import run_daemon

BROKEN = """
[server]
port = "eighty"
host = "0.0.0.0"
prot = 8000

[server.tls]
keyfile = "missing.key"

[scheduler]
policy = "fifo"
chunked_prefill_size = 0

[model]
path = "builtin:demo"
tp_size = 3
"""


def write(tmp_path: Path, text: str, name: str = "server.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_valid_file_exits_0():
    result = run_daemon("check", "-c", "configs/server.toml")
    assert result.returncode == 0
    assert result.stdout.strip() == "configs/server.toml: valid (0 errors, 0 warnings)"


def test_check_reports_every_violation_at_once(tmp_path: Path):
    path = write(tmp_path, BROKEN)
    result = run_daemon("check", "-c", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    found = {line.split("]")[0] + "]" + line.split("]")[1].split(" (")[0] for line in lines[:-1]}
    assert found >= {
        "error[schema.type] server.port",
        "error[schema.unknown-key] server.prot",
        "error[scheduler.policy-choice] scheduler.policy",
        "error[tls.key-without-cert] server.tls.keyfile",
        "error[tls.file-missing] server.tls.keyfile",
        "error[scheduler.chunked-prefill-size] scheduler.chunked_prefill_size",
        "error[model.tp-divides-heads] model.tp_size",
        "warning[server.public-without-api-key] server.host",
    }
    assert f"({path}:3)" in next(line for line in lines if "server.port" in line)
    assert lines[-1].startswith(f"{path}: INVALID (")


def test_check_json_format(tmp_path: Path):
    result = run_daemon("check", "-c", str(write(tmp_path, BROKEN)), "--format", "json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False and report["hash"] is None
    error = next(e for e in report["errors"] if e["rule"] == "schema.type")
    assert error == {**error, "key": "server.port", "severity": "error", "line": 3}
    assert error["fix"] and error["message"] and error["source"].endswith(":3")
    assert [w["rule"] for w in report["warnings"]] == ["server.public-without-api-key"]


def test_warnings_fail_only_with_strict(tmp_path: Path):
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n[model]\npath = "builtin:demo"\n')
    relaxed = run_daemon("check", "-c", str(path))
    assert relaxed.returncode == 0 and "valid (0 errors, 1 warning)" in relaxed.stdout
    strict = run_daemon("check", "-c", str(path), "--strict")
    assert strict.returncode == 2 and "INVALID (0 errors, 1 warning)" in strict.stdout
    with_key = run_daemon("check", "-c", str(path), "--strict", env={"DAEMON_SERVER__API_KEY": "k"})
    assert with_key.returncode == 0


def test_check_with_env_file(tmp_path: Path):
    path = write(tmp_path, '[model]\npath = "builtin:demo"\n')
    env_file = write(tmp_path, "# overrides\nDAEMON_SERVER__PORT=70000\n", "daemon.env")
    result = run_daemon("check", "-c", str(path), "--env-file", str(env_file))
    assert result.returncode == 2
    assert f"DAEMON_SERVER__PORT in env file {env_file}" in result.stdout
    assert "error[server.port-range] server.port" in result.stdout


def test_missing_config_file_is_an_error_not_defaults(tmp_path: Path):
    for args in (["check", "-c"], ["config", "show", "-c"], ["-c"]):
        result = run_daemon(*args, str(tmp_path / "nope.toml"))
        assert result.returncode == 2, args
        output = result.stdout + result.stderr
        assert "file.missing" in output and "nope.toml does not exist" in output and "Traceback" not in output


def test_check_and_show_need_a_config_file():
    for args in (["check"], ["config", "show"], []):
        result = run_daemon(*args)
        assert result.returncode == 2
        assert "-c FILE" in result.stderr and "Traceback" not in result.stderr


def test_config_show_masks_secrets_and_round_trips(tmp_path: Path):
    path = write(tmp_path, '[model]\npath = "builtin:demo"\n[server]\napi_key = "file-secret-123"\n')
    result = run_daemon("config", "show", "-c", str(path), env={"DAEMON_SERVER__TLS__KEYFILE_PASSWORD": "pw-456"})
    # keyfile_password without a keyfile is invalid, so show refuses, without echoing the secret
    assert result.returncode == 2 and "pw-456" not in result.stdout + result.stderr
    result = run_daemon("config", "show", "-c", str(path), "--sources")
    assert result.returncode == 0
    assert "file-secret-123" not in result.stdout
    assert 'api_key = "********"' in result.stdout
    shown = tomli.loads(result.stdout)
    assert shown["model"] == {
        "path": "builtin:demo",
        "served_model_name": "demo",
        "dtype": "auto",
        "device": "auto",
        "tp_size": 1,
        "dp_size": 1,
        "enforce_eager": False,
        "seed": 0,
        "tool_parser": "auto",
        "reasoning_parser": "none",
    }
    assert shown["tokenizer"]["path"] == "builtin:demo"


def test_run_refuses_an_invalid_config_with_one_line_per_error(tmp_path: Path):
    result = run_daemon("-c", str(write(tmp_path, BROKEN)))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error[") for line in lines)
    assert "Traceback" not in result.stderr


def test_rules_command_lists_the_catalogue():
    text = run_daemon("rules")
    assert text.returncode == 0 and "tls.key-without-cert" in text.stdout
    catalogue = json.loads(run_daemon("rules", "--format", "json").stdout)
    assert len([r for r in catalogue if r["severity"] in ("error", "warning")]) >= 25
    assert {r["id"] for r in catalogue if r["severity"] == "lifted"} == {
        "lifted.http2-with-tls-refresh",
        "lifted.http2-with-tokenizer-workers",
    }


def test_version_and_usage():
    assert run_daemon("--version").stdout.startswith("daemon ")
    assert run_daemon("frobnicate").returncode == 2
