"""daemon.engine.model_dir: inspecting a Hugging Face model directory without loading it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from harness.files import write_model_dir, write_safetensors

from daemon.config import check_config
from daemon.config.facts import Facts
from daemon.config.rules import RULES_BY_ID
from daemon.config.schema import DaemonSettings
from daemon.engine.model_dir import (
    SAFETENSORS_INDEX,
    ModelDirError,
    ModelInfo,
    Problem,
    check_safetensors_header,
    has_tokenizer_files,
    inspect_model_dir,
    model_info_from_config,
    weight_files,
)


def problem_of(path: Path) -> ModelDirError:
    with pytest.raises(ModelDirError) as caught:
        inspect_model_dir(path)
    assert caught.value.message == str(caught.value)
    return caught.value


def write_config(root: Path, **config: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    write_safetensors(root / "model.safetensors", {"w": [2, 2]})
    return root


def write_raw_safetensors(path: Path, header: bytes, data: bytes = b"", *, declared: int | None = None) -> Path:
    length = len(header) if declared is None else declared
    path.write_bytes(length.to_bytes(8, "little") + header + data)
    return path


# --- good directories ---------------------------------------------------------------------------


def test_single_file_model(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", heads=8, kv_heads=2, max_positions=1024)
    info = inspect_model_dir(root)
    assert info == ModelInfo(
        architectures=("LlamaForCausalLM",),
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        weight_files=(root / "model.safetensors",),
        max_context=1024,
    )


def test_sharded_model(tmp_path: Path) -> None:
    root = write_model_dir(
        tmp_path / "m", heads=16, kv_heads=4, max_positions=8192, shards=3, architecture="Qwen2ForCausalLM"
    )
    (root / "stray.safetensors").write_bytes(b"not used: the index decides")
    info = inspect_model_dir(root)
    assert info.architectures == ("Qwen2ForCausalLM",)
    assert (info.num_attention_heads, info.num_key_value_heads, info.max_position_embeddings) == (16, 4, 8192)
    assert info.weight_files == tuple(root / f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3))
    assert weight_files(root) == info.weight_files


def test_several_unindexed_files_are_all_weights(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    write_safetensors(root / "extra.safetensors", {"lm_head.weight": [4, 4]})
    assert inspect_model_dir(root).weight_files == (root / "extra.safetensors", root / "model.safetensors")


def test_optional_config_fields(tmp_path: Path) -> None:
    root = write_config(tmp_path / "m", num_attention_heads=6)
    info = inspect_model_dir(root)
    assert info.num_key_value_heads == 6  # no GQA: as many KV heads as attention heads
    assert info.max_position_embeddings is None
    assert info.architectures == ()


def test_metadata_entry_is_not_a_tensor(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    file = write_raw_safetensors(tmp_path / "x.safetensors", header.encode(), bytes(8))
    check_safetensors_header(file)  # valid: no exception


# --- the directory and config.json --------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    error = problem_of(tmp_path / "nowhere")
    assert error.problem is Problem.MISSING
    assert error.message == f"{tmp_path / 'nowhere'} does not exist"


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    error = problem_of(tmp_path / "file")
    assert error.problem is Problem.MISSING
    assert "is not a directory" in error.message


def test_directory_without_config(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    (root / "config.json").unlink()
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert error.message == f"{root} has no config.json"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"num_attention_heads": 4,', "is not readable JSON"),
        (b"", "is not readable JSON"),
        (b'{"num_attention_heads": 4, "name": "caf\xe9"}', "is not readable JSON"),  # latin-1, not UTF-8
        (b"[4, 2]", "is not a JSON object"),
        (b'"LlamaForCausalLM"', "is not a JSON object"),
        (b"null", "is not a JSON object"),
    ],
    ids=["truncated-json", "empty", "not-utf8", "array", "string", "null"],
)
def test_unusable_config_json(tmp_path: Path, content: bytes, expected: str) -> None:
    root = write_model_dir(tmp_path / "m")
    (root / "config.json").write_bytes(content)
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert expected in error.message
    assert str(root / "config.json") in error.message


def test_config_json_is_a_directory(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    (root / "config.json").unlink()
    (root / "config.json").mkdir()
    assert problem_of(root).problem is Problem.CONFIG


def test_missing_heads(tmp_path: Path) -> None:
    root = write_config(tmp_path / "m", architectures=["LlamaForCausalLM"], num_key_value_heads=2)
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert error.message.endswith("num_attention_heads is missing")


@pytest.mark.parametrize("heads", ["32", 32.0, 32.5, True, 0, -4, [32]], ids=repr)
def test_heads_not_a_positive_integer(tmp_path: Path, heads: Any) -> None:
    root = write_config(tmp_path / "m", num_attention_heads=heads)
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert f"num_attention_heads must be a positive integer, not {heads!r}" in error.message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_key_value_heads", "8"),
        ("num_key_value_heads", 0),
        ("max_position_embeddings", 4096.0),
        ("max_position_embeddings", -1),
    ],
)
def test_other_dimensions_not_positive_integers(tmp_path: Path, name: str, value: Any) -> None:
    root = write_config(tmp_path / "m", num_attention_heads=8, **{name: value})
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert f"{name} must be a positive integer" in error.message


@pytest.mark.parametrize("architectures", ["LlamaForCausalLM", [1], {"a": "b"}])
def test_architectures_not_a_list_of_names(tmp_path: Path, architectures: Any) -> None:
    root = write_config(tmp_path / "m", num_attention_heads=8, architectures=architectures)
    error = problem_of(root)
    assert error.problem is Problem.CONFIG
    assert "architectures must be a list of names" in error.message


def test_model_info_from_config_names_its_source() -> None:
    info = model_info_from_config({"num_attention_heads": 4, "num_key_value_heads": 1}, "builtin:x")
    assert (info.num_attention_heads, info.num_key_value_heads, info.weight_files) == (4, 1, ())
    with pytest.raises(ModelDirError, match=r"^builtin:x: num_attention_heads is missing$"):
        model_info_from_config({}, "builtin:x")


def test_unsupported_architecture_reaches_the_rule(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", architecture="GPT2LMHeadModel")
    info = inspect_model_dir(root)  # the directory itself is fine ...
    assert info.architectures == ("GPT2LMHeadModel",)
    # ... it is the rule that refuses the architecture.
    rule = RULES_BY_ID["model.architecture-unsupported"]
    findings = rule.findings(DaemonSettings(model={"path": str(root)}), Facts())
    assert [f.message for f in findings] == ["config.json architectures ['GPT2LMHeadModel'] are not supported"]
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\npath = "{root}"\n')
    report = check_config(config, environ={})
    assert [(v.rule, v.key) for v in report.errors] == [("model.architecture-unsupported", "model.path")]
    # A supported architecture passes the same rule.
    good = write_model_dir(tmp_path / "good", architecture="MistralForCausalLM")
    assert rule.findings(DaemonSettings(model={"path": str(good)}), Facts()) == []


# --- weights ------------------------------------------------------------------------------------


def test_no_safetensors(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    (root / "model.safetensors").unlink()
    (root / "pytorch_model.bin").write_bytes(b"pickles are not read")
    error = problem_of(root)
    assert error.problem is Problem.WEIGHTS_MISSING
    assert error.message == f"{root} has no *.safetensors weights"


def test_index_names_a_missing_shard(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", shards=3)
    (root / "model-00002-of-00003.safetensors").unlink()
    error = problem_of(root)
    assert error.problem is Problem.WEIGHTS_MISSING
    assert error.message.endswith("lacks shard(s) named by its index: model-00002-of-00003.safetensors")


def test_index_shard_that_is_a_directory_is_missing(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", shards=2)
    (root / "model-00001-of-00002.safetensors").unlink()
    (root / "model-00001-of-00002.safetensors").mkdir()
    assert problem_of(root).problem is Problem.WEIGHTS_MISSING


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ("{not json", "is not a valid safetensors index"),
        ('{"metadata": {}}', "is not a valid safetensors index"),  # no weight_map
        ('{"weight_map": ["a.safetensors"]}', "is not a valid safetensors index"),
        ('{"weight_map": {}}', "maps no tensors to shard files"),
        ('{"weight_map": {"w": 3}}', "maps no tensors to shard files"),
    ],
    ids=["not-json", "no-weight-map", "weight-map-list", "empty-weight-map", "non-string-shard"],
)
def test_invalid_index(tmp_path: Path, index: str, expected: str) -> None:
    root = write_model_dir(tmp_path / "m", shards=2)
    (root / SAFETENSORS_INDEX).write_text(index)
    error = problem_of(root)
    assert error.problem is Problem.WEIGHTS_CORRUPT
    assert expected in error.message


@pytest.mark.parametrize("shards", [1, 3])
def test_truncated_shard(tmp_path: Path, shards: int) -> None:
    root = write_model_dir(tmp_path / "m", shards=shards)
    last = sorted(root.glob("*.safetensors"))[-1]
    tensors = {"embed.weight": [16, 8]} if shards == 1 else {f"layers.{shards - 1}.weight": [8, 8]}
    write_safetensors(last, tensors, truncate_by=1)
    error = problem_of(root)
    assert error.problem is Problem.WEIGHTS_CORRUPT
    assert f"{last} is truncated" in error.message
    size = last.stat().st_size
    assert error.message.endswith(f"need {size + 1} bytes, it has {size}")


def test_shard_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    file.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ModelDirError, match=r"too short to be safetensors \(3 bytes\)") as caught:
        check_safetensors_header(file)
    assert caught.value.problem is Problem.WEIGHTS_CORRUPT


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    write_safetensors(file, {"w": [4, 4]})
    full = file.read_bytes()
    header_length = int.from_bytes(full[:8], "little")
    file.write_bytes(full[: 8 + header_length // 2])
    with pytest.raises(ModelDirError, match=f"corrupt header \\(declared length {header_length}\\)"):
        check_safetensors_header(file)


def test_garbage_header(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", b"this is no JSON!")
    with pytest.raises(ModelDirError, match=r"corrupt header \(not UTF-8 JSON\)") as caught:
        check_safetensors_header(file)
    assert caught.value.problem is Problem.WEIGHTS_CORRUPT


def test_garbage_header_through_the_directory(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    write_raw_safetensors(root / "model.safetensors", b"\xff\xfe\x00garbage", bytes(64))
    error = problem_of(root)
    assert error.problem is Problem.WEIGHTS_CORRUPT
    assert "corrupt header (not UTF-8 JSON)" in error.message


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"w": {"dtype": "F32", "shape": [2]}},  # no data_offsets
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": []}},
        {"w": "F32"},
    ],
    ids=["list", "no-offsets", "empty-offsets", "entry-not-object"],
)
def test_bad_tensor_entries(tmp_path: Path, header: Any) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", json.dumps(header).encode(), bytes(64))
    with pytest.raises(ModelDirError, match=r"corrupt (header|entry)"):
        check_safetensors_header(file)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", b'{"w": {}}', declared=1_000_000)
    with pytest.raises(ModelDirError, match=r"corrupt header \(declared length 1000000\)") as caught:
        check_safetensors_header(file)
    assert caught.value.problem is Problem.WEIGHTS_CORRUPT


def test_header_length_beyond_the_cap(tmp_path: Path) -> None:
    """A declared header over 100 MiB is refused even when the file is that large (sparse here)."""
    declared = 100 * 1024 * 1024 + 1
    file = write_raw_safetensors(tmp_path / "x.safetensors", b"{}", declared=declared)
    os.truncate(file, declared + 64)
    with pytest.raises(ModelDirError, match=f"declared length {declared}"):
        check_safetensors_header(file)


def test_header_length_exactly_the_file(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", b"{}")
    check_safetensors_header(file)  # an empty (tensor-less) header, all of the file: valid


def test_negative_data_offsets_are_corrupt(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, -8]}}).encode()
    file = write_raw_safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(ModelDirError):
        check_safetensors_header(file)


def test_first_bad_shard_is_reported(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", shards=3)
    write_safetensors(root / "model-00002-of-00003.safetensors", {"layers.1.weight": [8, 8]}, truncate_by=8)
    write_safetensors(root / "model-00003-of-00003.safetensors", {"layers.2.weight": [8, 8]}, truncate_by=8)
    assert "model-00002-of-00003.safetensors is truncated" in problem_of(root).message


# --- tokenizer files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "vocab.json"])
def test_has_tokenizer_files(tmp_path: Path, name: str) -> None:
    assert not has_tokenizer_files(tmp_path)
    (tmp_path / name).write_text("{}")
    assert has_tokenizer_files(tmp_path)


def test_tokenizer_files_must_be_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").mkdir()
    (tmp_path / "tokenizer_config.json").write_text("{}")  # config alone is not a tokenizer
    assert not has_tokenizer_files(tmp_path)
    assert not has_tokenizer_files(tmp_path / "missing")


def test_model_dir_helper_tokenizer_flag(tmp_path: Path) -> None:
    assert has_tokenizer_files(write_model_dir(tmp_path / "with"))
    assert not has_tokenizer_files(write_model_dir(tmp_path / "without", tokenizer=False))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "end before they begin"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes but data_offsets span 8"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape '2' is not a list"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, True]}, "not two non-negative integers"),
    ],
)
def test_tensor_entries_must_describe_their_bytes(tmp_path: Path, entry: dict, problem: str) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", json.dumps({"w": entry}).encode(), bytes(64))
    with pytest.raises(ModelDirError, match=re.escape(problem)):
        check_safetensors_header(file)


def test_header_must_be_utf8(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode("utf-16")
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(ModelDirError, match="not UTF-8 JSON"):
        check_safetensors_header(file)


@pytest.mark.parametrize(
    ("fields", "served"),
    [
        ({"sliding_window": 4096}, 32768),  # a window limits what a layer sees, not the context served
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 65536),
        ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, 131072),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}, 32768),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16384}}, 65536),
    ],
)
def test_rope_scaling_extends_the_context_served(tmp_path: Path, fields: dict, served: int) -> None:
    """As vLLM derives it: linear and dynamic stretch max_position_embeddings, YaRN the original context."""
    root = write_model_dir(tmp_path / "m", max_positions=32768, config=fields)
    assert inspect_model_dir(root).max_context == served


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 1e4},
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        },
    ],
)
def test_gemma3_positions_already_count_its_global_layers_scaling(tmp_path: Path, fields: dict) -> None:
    """Gemma 3's max_position_embeddings is the extended context (vLLM reads it so); its sliding layers are unscaled."""
    root = write_model_dir(tmp_path / "m", architecture="Gemma3ForCausalLM", max_positions=131072, config=fields)
    assert inspect_model_dir(root).max_context == 131072
