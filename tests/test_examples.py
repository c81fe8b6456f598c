"""Every example in configs/ is documented, editor-checkable and passes `daemon check`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import tomli
from harness.daemons import REPO, run_daemon
from harness.files import make_certificate, write_model_dir

EXAMPLES = sorted((REPO / "configs").glob("*.toml"))
SCHEMA = json.loads((REPO / "schemas" / "server.schema.json").read_text())
API_KEY = {"DAEMON_SERVER__API_KEY": "example-key"}


def test_the_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"server.toml", "gpu.toml", "tls.toml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_points_editors_at_the_committed_schema(example: Path):
    first_line = example.read_text().splitlines()[0]
    assert first_line.startswith("#:schema "), "Taplo reads the schema from a first-line #:schema directive"
    assert (example.parent / first_line.split(maxsplit=1)[1]).resolve() == REPO / "schemas" / "server.schema.json"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_json_schema(example: Path):
    jsonschema.Draft202012Validator(SCHEMA).validate(tomli.loads(example.read_text()))


def test_json_schema_rejects_what_the_daemon_rejects():
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for bad in (
        {"model": {"path": "builtin:demo"}, "server": {"port": 70000}},
        {"model": {"path": "builtin:demo"}, "server": {"prot": 1}},
        {"server": {"port": 8000}},
    ):
        assert list(validator.iter_errors(bad)), bad


def test_default_config_passes_strict_check():
    result = run_daemon("check", "-c", "configs/server.toml", "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid (0 errors, 0 warnings)" in result.stdout


@pytest.mark.parametrize("example", ["gpu.toml", "tls.toml"])
def test_deployment_examples_pass_offline_check(example: str):
    # They name paths of the machine they are meant for (/srv/models, /etc/daemon/tls).
    result = run_daemon("check", "-c", f"configs/{example}", "--offline", "--strict", env=API_KEY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tls_example_passes_full_check_with_real_certificates(tmp_path: Path, short_tmp: Path):
    cert, key = make_certificate(tmp_path)
    result = run_daemon(
        "check",
        "-c",
        "configs/tls.toml",
        "--strict",
        "--set",
        f"server.tls.certfile={cert}",
        "--set",
        f"server.tls.keyfile={key}",
        "--set",
        f"runtime.dir={short_tmp}",
        env=API_KEY,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_example_passes_full_check_on_its_model_except_for_the_gpus(tmp_path: Path, short_tmp: Path):
    # A directory shaped like the example's model (Qwen2.5-7B: 28 heads, 4 KV heads, 32k positions).
    model = write_model_dir(
        tmp_path / "qwen", heads=28, kv_heads=4, max_positions=32768, architecture="Qwen2ForCausalLM"
    )
    result = run_daemon(
        "check",
        "-c",
        "configs/gpu.toml",
        "--format",
        "json",
        "--set",
        f"model.path={model}",
        "--set",
        f"runtime.dir={short_tmp}",
        env=API_KEY,
    )
    report = json.loads(result.stdout)
    host_gpu_rules = {"model.cuda-unavailable", "model.tp-exceeds-gpus"}
    assert [e["rule"] for e in report["errors"] if e["rule"] not in host_gpu_rules] == []
    assert report["warnings"] == []
