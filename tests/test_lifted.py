"""Combinations SGLang refuses and daemon supports (rule catalogue: LIFTED): they start and serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from harness.daemons import run_daemon, short_dir, start_daemon
from harness.files import make_certificate

from daemon.config import load_config


def _http2_with_tls_refresh(tmp: Path) -> dict[str, object]:
    cert, key = make_certificate(tmp)
    return {
        "server.enable_http2": True,
        "server.tls.certfile": cert,
        "server.tls.keyfile": key,
        "server.tls.refresh": True,
    }


def _http2_with_tokenizer_workers(tmp: Path) -> dict[str, object]:
    return {"server.enable_http2": True, "tokenizer.workers": 2}


@pytest.mark.parametrize("combination", [_http2_with_tls_refresh, _http2_with_tokenizer_workers])
def test_lifted_combination_is_accepted_starts_and_serves_http2(combination, tmp_path: Path, model_cache: Path):
    settings = combination(tmp_path)
    runtime = short_dir()
    try:
        daemon = start_daemon(tmp_path, runtime, model_cache, settings)
        try:
            sets = [
                arg
                for key, value in settings.items()
                for arg in ("--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}")
            ]
            check = run_daemon("check", "-c", str(daemon.config_path), "--strict", *sets)
            assert check.returncode == 0, check.stdout
            config = load_config(daemon.config_path, environ={}, sets=sets[1::2])
            assert config.warnings == () and config.settings.server.enable_http2
            with httpx.Client(
                http2=True, http1=daemon.scheme == "https", verify=False, base_url=daemon.url, timeout=30
            ) as client:
                for _ in range(4):  # several requests: with two tokenizers, both get some
                    response = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
                    assert response.status_code == 200, response.text
                    assert response.http_version == "HTTP/2"  # over TLS: ALPN chose h2
        finally:
            assert daemon.stop() == 0, daemon.log_tail()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
