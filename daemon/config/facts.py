"""Facts about the host that rules depend on: model directories, files, certificates, GPUs.

Rules never probe the machine themselves; they ask a `Facts`, which probes
lazily and at most once per question. `OfflineFacts` answers "unknown" (None)
to every question about the host, for `daemon check --offline`: validating a
config meant for another machine. Rules skip what they cannot know.
"""

from __future__ import annotations

import os
import ssl
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from daemon.config.ownership import unsafe_directory
from daemon.config.schema import BUILTIN_PREFIX
from daemon.engine.demo_spec import BUILTIN_MODELS
from daemon.engine.model_dir import (
    ModelDirError,
    ModelInfo,
    Problem,
    has_tokenizer_files,
    inspect_model_dir,
    model_info_from_config,
)


@dataclass(frozen=True)
class CudaProbe:
    devices: int  # visible CUDA devices; 0 when there is no usable CUDA
    reason: str = ""  # why there are none, for the error message


def builtin_model(ref: str) -> ModelInfo | ModelDirError:
    if ref not in BUILTIN_MODELS:
        names = ", ".join(sorted(BUILTIN_MODELS))
        return ModelDirError(Problem.MISSING, f"there is no built-in model {ref!r} (built-ins: {names})")
    return model_info_from_config(BUILTIN_MODELS[ref], ref)


@dataclass
class Facts:
    _models: dict[str, ModelInfo | ModelDirError] = field(default_factory=dict)

    def model(self, ref: str) -> ModelInfo | ModelDirError | None:
        """What `model.path` (a directory or builtin: name) holds, or why it is unusable."""
        if ref not in self._models:
            self._models[ref] = builtin_model(ref) if ref.startswith(BUILTIN_PREFIX) else _inspect_dir(ref)
        return self._models[ref]

    def tokenizer_problem(self, ref: str) -> str | None:
        """Why `tokenizer.path` cannot be loaded, or None when it looks loadable."""
        if ref.startswith(BUILTIN_PREFIX):
            return None if ref in BUILTIN_MODELS else f"there is no built-in tokenizer {ref!r}"
        return _path_problem(Path(ref), want_dir=True) or (
            None if has_tokenizer_files(Path(ref)) else f"{ref} has no tokenizer.json, tokenizer.model or vocab.json"
        )

    def file_problem(self, path: Path) -> str | None:
        """Why `path` is not a readable regular file, or None."""
        return _path_problem(path, want_dir=False)

    def tls_problem(self, certfile: Path, keyfile: Path, password: str | None) -> tuple[str, str] | None:
        """(key to blame, why) if the certificate and key do not load as a server identity."""
        encrypted = _looks_encrypted(keyfile)
        if encrypted and password is None:
            return "keyfile_password", f"keyfile {keyfile} is encrypted and no keyfile_password is set"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A callable, never None: with None OpenSSL would prompt on the terminal.
            context.load_cert_chain(certfile, keyfile, password=lambda: (password or "").encode())
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if encrypted and reason != "KEY_VALUES_MISMATCH":
                return "keyfile_password", f"keyfile_password does not decrypt keyfile {keyfile} ({reason})"
            return "certfile", f"certfile {certfile} and keyfile {keyfile} do not load together ({reason})"
        except (OSError, ValueError) as exc:
            return "certfile", f"cannot load {certfile} / {keyfile}: {exc}"
        return None

    def ca_problem(self, ca_certs: Path) -> str | None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_verify_locations(cafile=ca_certs)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return f"ca_certs {ca_certs} holds no usable PEM certificates: {getattr(exc, 'reason', None) or exc}"
        return None

    def dir_problem(self, path: Path) -> tuple[bool, str] | None:
        """(whether it is certain, why) this user could not create sockets in directory `path`, or None.

        A file where the directory (or a parent) should be can never work; a
        permission may differ for the daemon's own user, so it is not certain.
        """
        try:
            existing = path
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir():
                return True, f"{existing} is not a directory"
            if not os.access(existing, os.W_OK | os.X_OK):
                return False, f"{existing} is not writable by uid {os.geteuid()}"
        except (OSError, ValueError) as exc:
            return True, f"{path!s} is not a usable directory: {exc}"
        return None

    def dir_unsafe(self, path: Path) -> str | None:
        """Why `path` is not a directory the user running this alone controls, or None."""
        return unsafe_directory(path)

    @property
    def may_bind_privileged_ports(self) -> bool | None:
        return os.geteuid() == 0

    @cached_property
    def cuda(self) -> CudaProbe | None:
        """Visible CUDA devices. Imports torch, so only rules about device = cuda ask."""
        try:
            with warnings.catch_warnings():  # torch warns about optional extras (NumPy) on import
                warnings.simplefilter("ignore")
                import torch
        except ImportError:
            return CudaProbe(0, "PyTorch is not installed")
        try:
            if not torch.cuda.is_available():
                return CudaProbe(0, f"PyTorch {torch.__version__} sees no CUDA device")
            return CudaProbe(torch.cuda.device_count())
        except Exception as exc:  # noqa: BLE001 - a broken driver fails in many ways
            return CudaProbe(0, f"CUDA initialisation failed: {exc}")


class OfflineFacts(Facts):
    """Knows built-in models and nothing about this machine."""

    def model(self, ref: str) -> ModelInfo | ModelDirError | None:
        return builtin_model(ref) if ref.startswith(BUILTIN_PREFIX) else None

    def tokenizer_problem(self, ref: str) -> str | None:
        return super().tokenizer_problem(ref) if ref.startswith(BUILTIN_PREFIX) else None

    def file_problem(self, path: Path) -> str | None:
        return None

    def tls_problem(self, certfile: Path, keyfile: Path, password: str | None) -> tuple[str, str] | None:
        return None

    def ca_problem(self, ca_certs: Path) -> str | None:
        return None

    def dir_problem(self, path: Path) -> tuple[bool, str] | None:
        return None

    def dir_unsafe(self, path: Path) -> str | None:
        return None

    @property
    def may_bind_privileged_ports(self) -> bool | None:
        return None

    @cached_property
    def cuda(self) -> CudaProbe | None:
        return None


def _inspect_dir(ref: str) -> ModelInfo | ModelDirError:
    try:
        return inspect_model_dir(Path(ref))
    except ModelDirError as exc:
        return exc
    except (OSError, ValueError) as exc:  # a path with a NUL byte, too long, ...
        return ModelDirError(Problem.MISSING, f"{ref!r} is not a usable path: {exc}")


def _path_problem(path: Path, *, want_dir: bool) -> str | None:
    try:
        if not path.exists():
            return f"{path} does not exist"
        if want_dir and not path.is_dir():
            return f"{path} is not a directory"
        if not want_dir and not path.is_file():
            return f"{path} is not a regular file"
        if not os.access(path, os.R_OK):
            return f"{path} is not readable by uid {os.geteuid()}"
    except (OSError, ValueError) as exc:
        return f"{str(path)!r} is not a usable path: {exc}"
    return None


def _looks_encrypted(keyfile: Path) -> bool:
    try:
        return b"ENCRYPTED" in keyfile.read_bytes()[:4096]
    except OSError:
        return False
