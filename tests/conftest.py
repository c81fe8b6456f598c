"""Fixtures every suite may ask for. The helpers themselves live in the harness (tests/harness/), which
suites import; pytest puts tests/ on sys.path (rootdir-relative "prepend" imports), so `harness` is a
top-level package there."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.daemons import short_dir
from harness.files import make_certificate, write_model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths must fit in 107 bytes."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache for the whole run: the demo model is built once."""
    return tmp_path_factory.mktemp("model-cache")
