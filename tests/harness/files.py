"""Files the tests build: model directories of any shape (tiny zero weights), safetensors files, and
certificates (self-signed, or a test authority and the server certificates it signs)."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path


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
    config: dict | None = None,
) -> Path:
    """A Hugging Face-format model directory with the given shape (weights are tiny zero tensors);
    `config`: more config.json fields."""
    root.mkdir(parents=True, exist_ok=True)
    config = (config or {}) | {
        "architectures": [architecture],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": 8 * heads,
        "intermediate_size": 16 * heads,
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


def _certificate(subject: str, issuer, public_key, signing_key, extensions: list) -> object:
    """An X.509 certificate valid from 5 minutes ago for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _write_pem(directory: Path, name: str, cert, key, password: str | None = None) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    encryption = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def make_certificate(
    directory: Path, *, name: str = "server", password: str | None = None, common_name: str = "localhost"
) -> tuple[Path, Path]:
    """A self-signed certificate and its key (encrypted when `password`), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = x509.SubjectAlternativeName([x509.DNSName(common_name)])
    cert = _certificate(common_name, None, key.public_key(), key, [(alt_names, False)])
    return _write_pem(directory, name, cert, key, password)


def make_authority(directory: Path) -> tuple[Path, object]:
    """A certificate authority: its certificate (PEM file ca.crt) and (certificate, key), to sign with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    constraints = x509.BasicConstraints(ca=True, path_length=0)
    cert = _certificate("reload test CA", None, key.public_key(), key, [(constraints, True)])
    path = directory / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, (cert, key)


def make_server_certificate(directory: Path, name: str, authority: object) -> tuple[Path, Path, int]:
    """A server certificate for 127.0.0.1 and localhost signed by `authority`: cert and key files, serial."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert, ca_key = authority  # type: ignore[misc]
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = _certificate(f"localhost {name}", ca_cert.subject, key.public_key(), ca_key, [(alt_names, False)])
    cert_path, key_path = _write_pem(directory, name, cert, key)
    return cert_path, key_path, cert.serial_number
