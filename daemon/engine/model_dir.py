"""Inspect a Hugging Face-format model directory without loading it.

Reads config.json and the safetensors headers only, so `daemon check` can
report a missing or corrupt shard in milliseconds instead of failing after a
model load. Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.engine.hf_config import ConfigFieldError
from daemon.engine.models.registry import UnsupportedModel, family_of, unsupported

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class Problem(enum.StrEnum):
    MISSING = "missing"  # no such directory
    CONFIG = "config"  # config.json absent or not a usable model config
    WEIGHTS_MISSING = "weights-missing"  # no safetensors, or a shard the index names is absent
    WEIGHTS_CORRUPT = "weights-corrupt"  # a shard whose header or size is wrong


class ModelDirError(Exception):
    def __init__(self, problem: Problem, message: str):
        super().__init__(message)
        self.problem = problem
        self.message = message


@dataclass(frozen=True)
class ModelInfo:
    architectures: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int | None
    weight_files: tuple[Path, ...] = ()
    # the longest context the model is made for: max_position_embeddings, or what RoPE scaling extends it to
    max_context: int | None = None
    unsupported: tuple[UnsupportedModel, ...] = ()  # what of its config the engine cannot run


def model_info_from_config(config: dict[str, Any], where: str = "config.json") -> ModelInfo:
    """The facts the config rules need, from a parsed config.json."""

    def positive_int(name: str, default: int | None = None) -> int | None:
        value = config.get(name, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelDirError(Problem.CONFIG, f"{where}: {name} must be a positive integer, not {value!r}")
        return value

    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelDirError(Problem.CONFIG, f"{where}: architectures must be a list of names")
    heads = positive_int("num_attention_heads")
    if heads is None:
        raise ModelDirError(Problem.CONFIG, f"{where}: num_attention_heads is missing")
    max_positions = positive_int("max_position_embeddings")
    problems = tuple(unsupported(config))
    family = family_of(config)
    for names in family.required_fields() if family else ():
        names = (names,) if isinstance(names, str) else names
        if all(positive_int(name) is None for name in names):
            fields = " or ".join(names)
            raise ModelDirError(Problem.CONFIG, f"{where}: {fields} is missing ({family.model_class} needs it)")
    max_context = max_positions
    if family is not None and not problems:
        try:
            max_context = family.served_positions(config)
        except ConfigFieldError as exc:
            raise ModelDirError(Problem.CONFIG, f"{where}: {exc}") from None
    return ModelInfo(
        architectures=tuple(architectures),
        num_attention_heads=heads,
        num_key_value_heads=positive_int("num_key_value_heads", heads) or heads,
        max_position_embeddings=max_positions,
        max_context=max_context,
        unsupported=problems,
    )


def inspect_model_dir(path: Path) -> ModelInfo:
    """Check that `path` holds a loadable model; raise ModelDirError naming the first problem."""
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ModelDirError(Problem.MISSING, f"{path} is not a usable path: {exc.strerror or exc}") from None
    if not is_dir:
        raise ModelDirError(Problem.MISSING, f"{path} is not a directory" if exists else f"{path} does not exist")
    info = model_info_from_config(read_config(path), str(path / "config.json"))
    weights = weight_files(path)
    for shard in weights:
        check_safetensors_header(shard)
    return dataclasses.replace(info, weight_files=weights)


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(Problem.CONFIG, f"{path} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(Problem.CONFIG, f"{config_file} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelDirError(Problem.CONFIG, f"{config_file} is not a JSON object")
    return config


def weight_files(path: Path) -> tuple[Path, ...]:
    """The safetensors files of a model directory, from its index when it is sharded."""
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{index} is not a valid safetensors index: {exc}") from None
        if not names or not all(isinstance(n, str) for n in names):
            raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{index} maps no tensors to shard files")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelDirError(
                Problem.WEIGHTS_MISSING, f"{path} lacks shard(s) named by its index: {', '.join(missing)}"
            )
        return tuple(path / n for n in names)
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise ModelDirError(Problem.WEIGHTS_MISSING, f"{path} has no *.safetensors weights")
    return files


# Bytes per element of the safetensors dtypes a Llama-family checkpoint may use.
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def check_safetensors_header(file: Path) -> None:
    """Validate a safetensors file's header, and that its tensor data is all there."""
    try:
        size = file.stat().st_size
        with file.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{file} is too short to be safetensors ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ModelDirError(
                    Problem.WEIGHTS_CORRUPT, f"{file} has a corrupt header (declared length {header_len})"
                )
            header = json.loads(stream.read(header_len).decode("utf-8"))
    except OSError as exc:
        raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"cannot read {file}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{file} has a corrupt header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{file} has a corrupt header (not a JSON object)")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if (problem := _tensor_entry_problem(entry)) is not None:
            raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{file} has a corrupt entry for tensor {name!r}: {problem}")
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_len + data_end > size:
        raise ModelDirError(
            Problem.WEIGHTS_CORRUPT,
            f"{file} is truncated: its tensors need {8 + header_len + data_end} bytes, it has {size}",
        )


def _tensor_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return f"data_offsets {offsets!r} are not two non-negative integers"
    if offsets[0] > offsets[1]:
        return f"data_offsets {offsets} end before they begin"
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return f"shape {shape!r} is not a list of non-negative integers"
    if dtype in _DTYPE_BYTES:
        expected = _DTYPE_BYTES[dtype]
        for dim in shape:
            expected *= dim
        if expected != offsets[1] - offsets[0]:
            return f"{dtype}{shape} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)
