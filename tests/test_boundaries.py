"""The layout's promises: tiers import only ipc, not each other; the light tiers never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from harness.daemons import REPO

TIERS = ("frontend", "tokenizer", "scheduler", "worker", "supervisor")


def imported_modules(package: str) -> set[str]:
    found = set()
    for path in (REPO / "daemon" / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("tier", TIERS)
def test_tiers_do_not_import_each_other(tier: str):
    others = {f"daemon.{t}" for t in TIERS if t != tier}
    crossing = {m for m in imported_modules(tier) if any(m == o or m.startswith(o + ".") for o in others)}
    assert crossing == set()


def test_config_imports_no_process_code():
    # the engine's pure-Python descriptions of models: the demo model's spec, a model directory's
    # facts, config.json's RoPE settings and the registry's capability table (no torch, no processes)
    allowed = (
        "daemon.config",
        "daemon.engine.demo_spec",
        "daemon.engine.model_dir",
        "daemon.engine.hf_config",
        "daemon.engine.models.registry",
    )
    daemon_imports = {m for m in imported_modules("config") if m.startswith("daemon.")}
    assert {m for m in daemon_imports if not m.startswith(allowed)} == set()


@pytest.mark.parametrize(
    "module",
    [
        "daemon.frontend.app",
        "daemon.frontend.server",
        "daemon.tokenizer.service",
        "daemon.scheduler.service",
        "daemon.supervisor.supervisor",
        "daemon.cli",
    ],
)
def test_light_tiers_never_import_torch(module: str):
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=Path("/"))
    assert result.stdout.strip() == "False", result.stderr


def test_frontend_never_imports_the_tokenizers_library():
    """Tokenization happens in the tokenizer tier, reached over ZeroMQ: /tokenize included."""
    probe = "import sys, daemon.frontend.app; print('tokenizers' in sys.modules, 'jinja2' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=Path("/"))
    assert result.stdout.strip() == "False False", result.stderr
