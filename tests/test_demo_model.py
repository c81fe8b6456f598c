"""daemon.engine.demo_model: the built-in demo model's directory, built locally and deterministically."""

from __future__ import annotations

import multiprocessing
import os
import re
from pathlib import Path

import pytest
from harness.daemons import run_daemon
from hypothesis import example, given, settings
from hypothesis import strategies as st

from daemon.engine.demo_model import (
    BOS,
    IM_END,
    IM_START,
    DemoModelError,
    _publish,
    demo_dir_name,
    ensure_demo_model,
)
from daemon.engine.demo_spec import DEMO_HF_CONFIG
from daemon.engine.model_dir import inspect_model_dir

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Belt and braces beside local_files_only: nothing may reach for the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(directory.iterdir())}


# --- the directory --------------------------------------------------------------------------------


def test_builds_a_model_directory_that_inspection_accepts(demo: Path) -> None:
    assert {file.name for file in demo.iterdir()} == FILES
    info = inspect_model_dir(demo)
    assert info.architectures == ("LlamaForCausalLM",)
    assert info.num_attention_heads == DEMO_HF_CONFIG["num_attention_heads"]
    assert info.num_key_value_heads == DEMO_HF_CONFIG["num_key_value_heads"]
    assert info.max_position_embeddings == DEMO_HF_CONFIG["max_position_embeddings"]
    assert info.weight_files == (demo / "model.safetensors",)


def test_daemon_check_accepts_it_as_model_path(demo: Path, short_tmp: Path) -> None:
    result = run_daemon(
        "check",
        "-c",
        "configs/server.toml",
        "--strict",
        "--set",
        f"model.path={demo}",
        "--set",
        f"runtime.dir={short_tmp}",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_weights_are_float32_llama_tensors_random_but_for_unit_norms(demo: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(demo / "model.safetensors")
    hidden, layers = DEMO_HF_CONFIG["hidden_size"], DEMO_HF_CONFIG["num_hidden_layers"]
    per_layer = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{part}.weight" for i in range(layers) for part in per_layer}
    assert set(weights) == expected
    assert all(tensor.dtype.is_floating_point and tensor.element_size() == 4 for tensor in weights.values())
    assert weights["lm_head.weight"].shape == (DEMO_HF_CONFIG["vocab_size"], hidden)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (
        DEMO_HF_CONFIG["num_key_value_heads"] * DEMO_HF_CONFIG["head_dim"],
        hidden,
    )
    assert weights["model.norm.weight"].eq(1).all()
    embed = weights["model.embed_tokens.weight"]
    assert abs(embed.std().item() - DEMO_HF_CONFIG["initializer_range"]) < 0.002
    assert not embed.equal(weights["lm_head.weight"])  # untied, drawn separately


# --- determinism and caching ----------------------------------------------------------------------


def test_two_builds_are_byte_identical(demo: Path, tmp_path: Path) -> None:
    other = ensure_demo_model(tmp_path / "elsewhere")
    assert other.name == demo.name
    assert snapshot(other) == snapshot(demo)


def test_a_second_call_reuses_the_directory(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path)
    before = {file.name: (file.stat().st_ino, file.stat().st_mtime_ns) for file in first.iterdir()}
    directory_inode = first.stat().st_ino
    second = ensure_demo_model(tmp_path)
    assert second == first
    assert second.stat().st_ino == directory_inode
    assert {file.name: (file.stat().st_ino, file.stat().st_mtime_ns) for file in second.iterdir()} == before
    assert os.listdir(tmp_path) == [first.name]


def test_the_directory_name_follows_the_spec_and_build_version() -> None:
    name = demo_dir_name()
    assert name.startswith("demo-") and name == demo_dir_name(dict(DEMO_HF_CONFIG))
    assert demo_dir_name({**DEMO_HF_CONFIG, "num_hidden_layers": 3}) != name
    assert demo_dir_name(build_version=999) != name


# --- loading with transformers --------------------------------------------------------------------


def test_transformers_loads_the_tokenizer_and_its_chat_template(demo: Path, offline: None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo, local_files_only=True)
    assert len(tokenizer) == DEMO_HF_CONFIG["vocab_size"]
    assert tokenizer.model_max_length == DEMO_HF_CONFIG["max_position_embeddings"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (BOS, IM_END)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, wörld!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"{BOS}{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHello, wörld!{IM_END}\n{IM_START}assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    marker_ids = [tokenizer.convert_tokens_to_ids(token) for token in (BOS, IM_START, IM_END)]
    assert ids[0] == marker_ids[0]
    assert ids.count(marker_ids[1]) == 3 and ids.count(marker_ids[2]) == 2
    assert tokenizer.decode(ids) == rendered


def test_transformers_loads_the_model_and_runs_it(demo: Path, offline: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, loading = AutoModelForCausalLM.from_pretrained(demo, local_files_only=True, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # every weight came from the file
    assert model.dtype == torch.float32
    input_ids = AutoTokenizer.from_pretrained(demo, local_files_only=True)("The quiet river", return_tensors="pt")
    with torch.no_grad():
        logits = model(**input_ids).logits
    tokens = input_ids["input_ids"].shape[1]
    assert logits.shape == (1, tokens, DEMO_HF_CONFIG["vocab_size"])
    assert torch.isfinite(logits).all()


# --- the tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(demo: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(demo / "tokenizer.json"))


def test_every_id_decodes_and_the_vocabulary_is_exactly_vocab_size(tokenizer) -> None:
    vocab_size = DEMO_HF_CONFIG["vocab_size"]
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    assert sorted(tokenizer.get_vocab(with_added_tokens=True).values()) == list(range(vocab_size))
    assert all(tokenizer.id_to_token(i) is not None for i in range(vocab_size))


def test_plain_text_starts_with_bos_only_when_special_tokens_are_added(tokenizer) -> None:
    bos = tokenizer.token_to_id(BOS)
    assert tokenizer.encode("Hello").ids[0] == bos
    assert bos not in tokenizer.encode("Hello", add_special_tokens=False).ids


def test_the_tokenizer_learned_english_like_merges(tokenizer) -> None:
    # A trained BPE encodes its kind of text in far fewer tokens than bytes.
    text = "The curious painter walked slowly across the bridge in the morning."
    assert len(tokenizer.encode(text, add_special_tokens=False).ids) < len(text.encode()) / 3


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
@example(text="")
@example(text="Hello, wörld! 東京 🙂 naïve café")
@example(text="  leading and trailing spaces\t\r\n\x00 ")
@example(text=f"a literal {IM_START}user\nhi{IM_END}")
def test_any_text_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


# --- concurrency and errors -----------------------------------------------------------------------


def build_after_barrier(cache_dir: Path, barrier, results) -> None:
    barrier.wait(timeout=60)
    results.put(str(ensure_demo_model(cache_dir)))


def test_concurrent_builders_agree_and_leave_no_temporary_directories(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    builders = [context.Process(target=build_after_barrier, args=(cache, barrier, results)) for _ in range(2)]
    for builder in builders:
        builder.start()
    try:
        paths = {results.get(timeout=60) for _ in builders}
    finally:
        for builder in builders:
            builder.join(timeout=60)
    assert [builder.exitcode for builder in builders] == [0, 0]
    assert len(paths) == 1
    built = Path(paths.pop())
    assert os.listdir(cache) == [built.name]
    assert {file.name for file in built.iterdir()} == FILES
    inspect_model_dir(built)


def test_a_builder_that_loses_the_race_keeps_the_winners_directory(tmp_path: Path) -> None:
    winner, loser = tmp_path / "demo-x", tmp_path / ".demo-x.building-1"
    winner.mkdir()
    (winner / "config.json").write_text("{}")
    loser.mkdir()
    (loser / "config.json").write_text('{"mine": true}')
    _publish(loser, winner)
    assert (winner / "config.json").read_text() == "{}"


def test_a_cache_dir_under_a_regular_file_raises_demo_model_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = blocker / "cache"
    with pytest.raises(DemoModelError) as caught:
        ensure_demo_model(cache)
    assert str(cache) in str(caught.value)
    assert "Not a directory" in str(caught.value)


def test_a_cache_path_that_is_a_regular_file_raises_demo_model_error(tmp_path: Path) -> None:
    cache = tmp_path / "a-file"
    cache.write_text("not a directory")
    with pytest.raises(DemoModelError, match=re.escape(str(cache))):
        ensure_demo_model(cache)


def test_staging_directories_of_dead_builders_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])  # its PID no longer runs once reaped
    finished.wait()
    dead = tmp_path / f".{demo_dir_name()}.building-{finished.pid}-deadbeef"
    alive = tmp_path / f".{demo_dir_name()}.building-{os.getpid()}-cafecafe"
    dead.mkdir()
    alive.mkdir()
    ensure_demo_model(tmp_path)
    assert not dead.exists()
    assert alive.exists()  # a build still in progress elsewhere is left alone
