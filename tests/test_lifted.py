"""Combinations SGLang refuses and daemon supports (rule catalogue: LIFTED).

Here: the config layer accepts them, and the daemon starts with them. That they
also serve is tested with the serving path (the front-end and tokenizer tiers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_certificate, run_daemon

from daemon.config import load_config


def _http2_with_tls_refresh(tmp: Path) -> str:
    cert, key = make_certificate(tmp)
    return f'[server]\nenable_http2 = true\n[server.tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\nrefresh = true\n'


def _http2_with_tokenizer_workers(tmp: Path) -> str:
    return "[server]\nenable_http2 = true\n[tokenizer]\nworkers = 2\n"


@pytest.mark.parametrize("combination", [_http2_with_tls_refresh, _http2_with_tokenizer_workers])
def test_lifted_combination_is_accepted(combination, tmp_path: Path, short_tmp: Path):
    path = tmp_path / "server.toml"
    path.write_text(combination(tmp_path) + f'[model]\npath = "builtin:demo"\n[runtime]\ndir = "{short_tmp}"\n')
    config = load_config(path, environ={})
    assert config.warnings == ()
    assert config.settings.server.enable_http2
    check = run_daemon("check", "-c", str(path), "--strict")
    assert check.returncode == 0, check.stdout
    started = run_daemon("-c", str(path))
    assert started.returncode == 0, started.stderr
