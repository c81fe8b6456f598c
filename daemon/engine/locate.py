"""From model.path (or tokenizer.path) to a model directory, and the context it serves."""

from __future__ import annotations

from pathlib import Path

from daemon.engine.demo_model import demo_model_dir, ensure_demo_model
from daemon.engine.demo_spec import DEMO_MODEL_REF
from daemon.engine.model_dir import ModelDirError, ModelInfo, Problem


def locate_model(ref: str, cache_dir: Path, *, build: bool) -> Path:
    """The directory behind `ref`. The built-in demo model is built there first when `build`.

    Only the worker builds (it loads torch anyway); the tiers that start after it
    just find the directory.
    """
    if ref == DEMO_MODEL_REF:
        return ensure_demo_model(cache_dir) if build else demo_model_dir(cache_dir)
    if ref.startswith("builtin:"):
        raise ModelDirError(Problem.MISSING, f"there is no built-in model {ref!r}")
    return Path(ref)


def served_context(info: ModelInfo, configured: int | None) -> int:
    """The longest request (prompt plus output) served: model.context_length, else the model's maximum."""
    limit = info.max_context or 2048
    return min(configured, limit) if configured else limit
