"""The built-in demo model as a Hugging Face model directory, built locally on first use.

Nothing is downloaded: the weights are random (from a fixed seed) and the tokenizer
is a byte-level BPE trained on English-like text generated here. The build is
deterministic: with the same torch and tokenizers versions, every build gives
byte-identical files. It takes well under a second once torch is imported.

The directory is named after a hash of the demo spec and BUILD_VERSION: a changed
spec, or a changed build (bump BUILD_VERSION), lands in a new directory instead
of reusing a stale one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from daemon.engine.demo_spec import BUILD_VERSION, DEMO_HF_CONFIG, demo_dir_name, demo_model_dir  # noqa: F401 - re-exported
from daemon.pids import pid_alive

if TYPE_CHECKING:
    import torch

WEIGHT_SEED = 20240601
CORPUS_SEED = 1234
CORPUS_SENTENCES = 2000

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# In this order they take the first ids: 0, 1, 2, 3.
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)

# ChatML turns, preceded by BOS as Llama 3 does: the template supplies the BOS, so a
# rendered chat is tokenized without adding special tokens. Content may be a string
# or OpenAI-style parts, of which only the text parts are shown.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is iterable %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The training text is drawn from these; enough distinct words that BPE finds the
# merges to fill the vocabulary. A few accented words give common non-ASCII bytes merges.
_WORD_TEXT = """
the of and to in is was that for on as with by at from his her it an be this are which or had not but were
they one all have she there their has been more new when who will would can may time people year world city
river house light water garden morning evening story letter window music voice small great little old long
first last early between under through after before during about against without again always never often
quickly slowly quietly brightly across along around behind beyond near north south east west mountain valley
forest island harbour market station library bridge village winter summer spring autumn child teacher doctor
farmer painter sailor writer stranger friend family number question answer reason history language science
nature machine engine signal pattern message memory journey silver golden yellow purple orange green blue
white black bright quiet gentle strong simple careful curious famous ancient modern distant familiar walked
carried opened closed watched listened remembered discovered followed answered wondered travelled painted
gathered learned wrote spoke found began turned seemed became brought thought heard called asked café naïve
façade über
"""
WORDS = tuple(_WORD_TEXT.split())
PUNCTUATION = (".", ".", ".", "!", "?", ";", ":")


class DemoModelError(Exception):
    """The demo model's cache directory cannot be created or written."""


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo model's directory under `cache_dir`, built there first if absent."""
    cache_dir = Path(cache_dir)
    target = cache_dir / demo_dir_name()
    try:
        if target.is_dir():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoModelError(f"cannot create the demo model cache directory {cache_dir}: {_reason(exc)}") from None
    _remove_abandoned_builds(cache_dir)
    # Built beside its final place, then renamed in: a reader never sees a half-built directory.
    staging = cache_dir / f".{target.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        write_demo_model(staging)
        _publish(staging, target)
    except OSError as exc:
        raise DemoModelError(f"cannot build the demo model in {cache_dir}: {_reason(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless the build failed or lost a race
    return target


def _remove_abandoned_builds(cache_dir: Path) -> None:
    """Delete staging directories of builders that died mid-build (their PID is in the name)."""
    for leftover in cache_dir.glob(".demo-*.building-*"):
        pid = leftover.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished `staging` to `target`, unless another builder got there first."""
    try:
        os.rename(staging, target)
    except OSError:
        if target.is_dir():  # another process won the race; its build is identical to ours
            return
        raise
    _fsync(target.parent)


def write_demo_model(directory: Path) -> None:
    """Write the demo model's files into the existing, empty `directory`."""
    tokenizer = build_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if tokenizer.get_vocab_size() != DEMO_HF_CONFIG["vocab_size"]:
        # A corpus too small to find enough merges: a bug of this module, not of the machine.
        raise RuntimeError(
            f"the demo tokenizer has {tokenizer.get_vocab_size()} tokens, not {DEMO_HF_CONFIG['vocab_size']}"
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "config.json", {**DEMO_HF_CONFIG, "bos_token_id": ids[BOS], "eos_token_id": ids[IM_END]})
    _write_json(
        directory / "generation_config.json",
        # A reply ends at the end of its turn; a plain completion at the end of the text.
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[IM_END], ids[EOS]], "pad_token_id": ids[EOS]},
    )
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(
        directory / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": IM_END, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]},
    )
    # Serialized here and written by us: safetensors' own save_file makes the file 0600 whatever the umask.
    from safetensors.torch import save  # torch only where weights are made: finding the directory needs none

    (directory / "model.safetensors").write_bytes(save(random_weights(DEMO_HF_CONFIG), metadata={"format": "pt"}))
    for file in directory.iterdir():
        _fsync(file)
    _fsync(directory)


def random_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Llama weights under Hugging Face names: normal(0, initializer_range) matrices, unit norms."""
    import torch

    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    std = config["initializer_range"]
    weights = {}
    for name, shape in llama_tensor_shapes(config):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    return weights


def llama_tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied, bias-free Llama, in a fixed order (it fixes the random draws)."""
    hidden, vocab, ffn = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes += [
            (f"{layer}.self_attn.q_proj.weight", (q_size, hidden)),
            (f"{layer}.self_attn.k_proj.weight", (kv_size, hidden)),
            (f"{layer}.self_attn.v_proj.weight", (kv_size, hidden)),
            (f"{layer}.self_attn.o_proj.weight", (hidden, q_size)),
            (f"{layer}.mlp.gate_proj.weight", (ffn, hidden)),
            (f"{layer}.mlp.up_proj.weight", (ffn, hidden)),
            (f"{layer}.mlp.down_proj.weight", (hidden, ffn)),
            (f"{layer}.input_layernorm.weight", (hidden,)),
            (f"{layer}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE of exactly vocab_size tokens, special tokens included.

    Byte-level: all 256 bytes are in the vocabulary, so any UTF-8 text round-trips.
    The trainer is deterministic (ties between pair counts go to the lower pair ids),
    and so is the corpus.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_HF_CONFIG["vocab_size"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer)
    # A plain prompt starts with BOS, as a rendered chat does through its template.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
            ),
        ]
    )
    return tokenizer


def training_corpus() -> Iterator[str]:
    """English-like sentences from WORDS, the same on every run."""
    # Only random() is promised to repeat across Python versions for a given seed, so draw with it alone.
    rng = random.Random(CORPUS_SEED)

    def pick(choices: tuple[str, ...]) -> str:
        return choices[int(rng.random() * len(choices))]

    for _ in range(CORPUS_SENTENCES):
        words = [pick(WORDS) for _ in range(4 + int(rng.random() * 12))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(1 + int(rng.random() * (len(words) - 1)), f"{1800 + int(rng.random() * 225)},")
        ending = "\n" if rng.random() < 0.3 else " "
        yield " ".join(words) + pick(PUNCTUATION) + ending


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(ids[token]): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        },
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        # Byte-level decoding is already exact; "cleaning up" spaces would break round trips.
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": DEMO_HF_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    """Flush a file or directory, so a crash after the rename cannot publish empty files.

    Best effort: some file systems refuse to fsync (directories especially), and a
    build that cannot be flushed is still better than none.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
