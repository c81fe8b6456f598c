"""Defaults that depend on other settings or on the environment, filled into the effective config.

They are written into the config (and marked as derived in its origins) rather
than computed where used, so that `config show` prints them and a reload diff
sees them change: a new model.path is also a new tokenizer.path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from daemon.config.errors import Origin, OriginKind
from daemon.config.schema import BUILTIN_PREFIX, DaemonSettings
from daemon.engine.demo_spec import DEMO_MODEL_REF, DEMO_SERVED_NAME


def derive_defaults(
    settings: DaemonSettings, origins: Mapping[str, Origin], environ: Mapping[str, str]
) -> tuple[DaemonSettings, dict[str, Origin]]:
    """Fill settings whose default depends on other settings or on the environment."""
    origins = dict(origins)
    tokenizer, model, runtime = settings.tokenizer, settings.model, settings.runtime
    if tokenizer.path is None:
        tokenizer = tokenizer.model_copy(update={"path": model.path})
        origins["tokenizer.path"] = Origin(OriginKind.DERIVED, "model.path")
    if model.served_model_name is None:
        model = model.model_copy(update={"served_model_name": default_served_name(model.path)})
        origins["model.served_model_name"] = Origin(OriginKind.DERIVED, "model.path")
    if runtime.dir is None:
        runtime = runtime.model_copy(update={"dir": default_runtime_dir(environ)})
        origins["runtime.dir"] = Origin(OriginKind.DERIVED, "the environment")
    if runtime.cache_dir is None:
        runtime = runtime.model_copy(update={"cache_dir": default_cache_dir(environ)})
        origins["runtime.cache_dir"] = Origin(OriginKind.DERIVED, "the environment")
    return settings.model_copy(update={"tokenizer": tokenizer, "model": model, "runtime": runtime}), origins


def default_served_name(model_path: str) -> str:
    if model_path == DEMO_MODEL_REF:
        return DEMO_SERVED_NAME
    if model_path.startswith(BUILTIN_PREFIX):
        return model_path[len(BUILTIN_PREFIX) :] or model_path
    return Path(model_path).name or model_path


def default_runtime_dir(environ: Mapping[str, str]) -> Path:
    # Relative values are ignored, as the XDG base directory spec asks.
    if (systemd_dir := environ.get("RUNTIME_DIRECTORY", "").split(":")[0]).startswith("/"):
        return Path(systemd_dir)
    if (xdg := environ.get("XDG_RUNTIME_DIR", "")).startswith("/"):
        return Path(xdg) / "daemon"
    return Path(f"/tmp/daemon-{os.getuid()}")


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    if (systemd_dir := environ.get("CACHE_DIRECTORY", "").split(":")[0]).startswith("/"):
        return Path(systemd_dir)
    if (xdg := environ.get("XDG_CACHE_HOME", "")).startswith("/"):
        return Path(xdg) / "daemon"
    home = environ.get("HOME", "")
    return Path(home if home.startswith("/") else os.path.expanduser("~")) / ".cache" / "daemon"
