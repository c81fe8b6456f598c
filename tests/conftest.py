"""Shared test helpers: run the real `daemon` command, build model directories and certificates."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAEMON = Path(sys.executable).parent / "daemon"  # the installed console script


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without DAEMON_* overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DAEMON_")}
    env.update(extra)
    return env


def run_daemon(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the installed `daemon` command to completion and capture its output."""
    return subprocess.run(
        [str(DAEMON), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_environ(**(env or {})),
        cwd=cwd or REPO,
    )


def write_safetensors(path: Path, tensors: dict[str, list[int]], *, truncate_by: int = 0) -> None:
    """Write a float32 safetensors file of zero tensors with the given shapes."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = len(blob).to_bytes(8, "little") + blob + bytes(offset)
    path.write_bytes(data[: len(data) - truncate_by])


def write_model_dir(
    root: Path,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int | None = 4096,
    architecture: str = "LlamaForCausalLM",
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """A Hugging Face-format model directory with the given shape (weights are tiny zero tensors)."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [architecture],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": 8 * heads,
        "num_hidden_layers": shards,
        "vocab_size": 16,
    }
    if max_positions is not None:
        config["max_position_embeddings"] = max_positions
    (root / "config.json").write_text(json.dumps(config))
    if shards == 1:
        write_safetensors(root / "model.safetensors", {"embed.weight": [16, 8]})
    else:
        weight_map = {}
        for index in range(shards):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(root / name, {f"layers.{index}.weight": [8, 8]})
            weight_map[f"layers.{index}.weight"] = name
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


def make_certificate(
    directory: Path, *, name: str = "server", password: str | None = None, common_name: str = "localhost"
) -> tuple[Path, Path]:
    """A self-signed certificate and its key (encrypted when `password`), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    encryption = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths must fit in 107 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache for the whole run: the demo model is built once."""
    return tmp_path_factory.mktemp("model-cache")
