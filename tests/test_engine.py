"""The engine's forward pass matches Hugging Face transformers on the same weights.

Models are random, small and built with transformers by the harness (tests/harness/models.py:
one variant per family of the registry and per RoPE kind, each with its family's distinctive
options on), saved as sharded safetensors and loaded by the engine through its own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness.models import PROMPT, VARIANTS, Sequences, build_hf_model, hf_chunked_logits, hf_logits  # noqa: E402

from daemon.engine import kv_cache  # noqa: E402
from daemon.engine.kernels import cpu as cpu_kernels  # noqa: E402
from daemon.engine.model_dir import ModelDirError  # noqa: E402
from daemon.engine.runner import ModelRunner  # noqa: E402
from daemon.engine.sampler import SamplingParams  # noqa: E402

TOLERANCE = 2e-5  # observed errors are near 1e-7; a RoPE or window mistake moves logits by 1e-3 or more


@pytest.fixture(params=["kernel", "torch"])
def attention(request, monkeypatch) -> str:
    """Which decode attention runs: the CPU kernel reading the cache in place (kernels/cpu.py), or
    torch's operators over gathered blocks (where the kernel was not built, and on CUDA)."""
    if request.param == "torch":
        monkeypatch.setattr(kv_cache, "reads_paged_cache", lambda *_: False)
    return request.param


@pytest.fixture(params=list(VARIANTS))
def models(request, tmp_path: Path, attention: str):
    hf = build_hf_model(tmp_path, request.param)
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    assert runner.cache.keys_transposed == (attention == "kernel")  # every variant's head_dim suits the kernel
    return hf, runner


def test_the_cpu_kernels_are_built():
    """pip install builds them (an optional extension: a failed build installs without them and
    the engine falls back to torch); here, where a compiler exists, a failed build is a failure."""
    assert cpu_kernels.available()


def test_prefill_logits_match(models):
    hf, runner = models
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT)[-1], atol=TOLERANCE, rtol=0)


def test_decode_one_token_at_a_time_matches_every_position(models):
    hf, runner = models
    expected, seqs = hf_chunked_logits(hf, PROMPT, [1] * len(PROMPT)), Sequences(runner)
    for position, token in enumerate(PROMPT):
        ours = runner.logits([seqs.chunk(1, [token], position)])[0]
        torch.testing.assert_close(ours, expected[position], atol=TOLERANCE, rtol=0)


def test_chunked_prefill_matches(models):
    hf, runner = models
    sizes = [3, 7, 1, 9]  # chunks crossing block boundaries, with a one-token chunk between
    expected, seqs, start = hf_chunked_logits(hf, PROMPT, sizes), Sequences(runner), 0
    for size, reference in zip(sizes, expected, strict=True):
        ours = runner.logits([seqs.chunk(1, PROMPT[start : start + size], start)])[0]
        start += size
        torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=0)


def test_mixed_batch_of_prefills_and_decodes_matches(models):
    hf, runner = models
    seqs = Sequences(runner)
    other = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9]
    runner.logits([seqs.chunk(1, PROMPT[:-1], 0), seqs.chunk(2, other[:10], 0)])
    # one step: a decode of sequence 1, the rest of sequence 2's prompt, and a new short prompt 3
    batch = [seqs.chunk(1, PROMPT[-1:], len(PROMPT) - 1), seqs.chunk(2, other[10:], 10), seqs.chunk(3, [44, 45], 0)]
    ours = runner.logits(batch)
    references = [
        hf_chunked_logits(hf, PROMPT, [len(PROMPT) - 1, 1])[-1],
        hf_chunked_logits(hf, other, [10, len(other) - 10])[-1],
        hf_logits(hf, [44, 45])[-1],
    ]
    for row, reference in enumerate(references):
        torch.testing.assert_close(ours[row], reference, atol=TOLERANCE, rtol=0)


def test_a_prefix_taken_from_the_cache_gives_the_logits_of_one_computed_afresh(models):
    """Two prompts share their first two blocks: the second, admitted on the first's cached blocks,
    computes only its own tokens, and its logits are those of the whole prompt computed from scratch."""
    hf, runner = models
    if not runner.prefix_cacheable:
        pytest.skip("its keys follow the sequence's length: no prefix is shared (the test below)")
    shared = [(7 * i + 3) % 160 for i in range(32)]  # two blocks of 16
    first, second = shared + [5, 17, 33], shared + [99, 150, 7, 42, 11]
    seqs = Sequences(runner)
    assert seqs.admit(1, first) == 0
    runner.logits([seqs.chunk(1, first, 0)])
    seqs.computed(1, len(first))
    start = seqs.admit(2, second)
    assert start == 32 and seqs.blocks.table(2) == seqs.blocks.table(1)[:2]
    cached = runner.logits([seqs.chunk(2, second[start:], start)])[0]
    fresh = runner.logits([seqs.chunk(3, second, 0)])[0]  # not admitted through the cache: its own blocks
    assert not set(seqs.blocks.table(3)) & set(seqs.blocks.table(2))
    torch.testing.assert_close(cached, fresh, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(cached, hf_logits(hf, second)[-1], atol=TOLERANCE, rtol=0)


def test_decodes_sharing_cached_blocks_read_them_with_the_logits_of_transformers(models):
    """Three prompts share three blocks through the prefix cache and a fourth shares none: their
    decodes in one step each read the shared blocks where they are, and every row's logits are
    transformers' for that whole sequence."""
    hf, runner = models
    if not runner.prefix_cacheable:
        pytest.skip("its keys follow the sequence's length: no prefix is shared")
    shared = [(11 * i + 5) % 160 for i in range(48)]
    prompts = {1: shared + [3, 9], 2: shared + [150, 7, 42], 3: shared + [1] * 12, 4: [(3 * i) % 97 for i in range(50)]}
    seqs = Sequences(runner)
    for seq_id, prompt in prompts.items():  # each prefilled up to its last token, the next decodes it
        start = seqs.admit(seq_id, prompt)
        runner.logits([seqs.chunk(seq_id, prompt[start:-1], start)])
        seqs.computed(seq_id, len(prompt) - 1)
    assert seqs.blocks.table(2)[:3] == seqs.blocks.table(3)[:3] == seqs.blocks.table(1)[:3]
    decodes = [seqs.chunk(seq_id, prompt[-1:], len(prompt) - 1) for seq_id, prompt in prompts.items()]
    ours = runner.logits(decodes)
    for row, prompt in enumerate(prompts.values()):
        torch.testing.assert_close(ours[row], hf_logits(hf, prompt)[-1], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("variant", ["dynamic-rope", "phi3-longrope"])
def test_models_whose_keys_follow_the_sequence_length_share_no_prefix(tmp_path: Path, variant: str):
    """Dynamic NTK and longrope rotate a key by how long its sequence was when it was computed: the
    same prefix within a longer prompt has other keys, so a cached one would change the logits."""
    build_hf_model(tmp_path, variant, shard=False)
    assert not ModelRunner(tmp_path, num_blocks=8, device="cpu", dtype="float32").prefix_cacheable
    build_hf_model(tmp_path / "plain", "llama", shard=False)
    assert ModelRunner(tmp_path / "plain", num_blocks=8, device="cpu", dtype="float32").prefix_cacheable


def test_greedy_generation_matches_transformers_generate(models):
    hf, runner = models
    seqs, generated = Sequences(runner), []
    greedy = SamplingParams(temperature=0.0)
    token = runner.step([seqs.chunk(1, PROMPT, 0, sampling=greedy)])[1]
    for _ in range(15):
        generated.append(token)
        token = runner.step([seqs.chunk(1, [token], len(PROMPT) + len(generated) - 1, sampling=greedy)])[1]
    generated.append(token)
    with torch.no_grad():
        reference = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert generated == reference[0, len(PROMPT) :].tolist()


def test_sampling_is_reproducible_under_a_seed(tmp_path: Path):
    build_hf_model(tmp_path, "llama", shard=False)

    def generate(seed: int, companions: int) -> list[int]:
        runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
        seqs, params = Sequences(runner), SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        out = []
        batch = [seqs.chunk(1, PROMPT, 0, sampling=params)]
        batch += [
            seqs.chunk(100 + i, PROMPT[i:], 0, sampling=SamplingParams(temperature=1.0)) for i in range(companions)
        ]
        for _ in range(12):
            tokens = runner.step(batch)
            out.append(tokens[1])
            batch = [
                seqs.chunk(c.seq_id, [tokens[c.seq_id]], c.start + len(c.token_ids), sampling=c.sampling) for c in batch
            ]
        return out

    first = generate(seed=7, companions=0)
    assert generate(seed=7, companions=0) == first
    assert generate(seed=7, companions=3) == first  # other requests in the batch do not change it
    assert generate(seed=8, companions=0) != first


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path):
    build_hf_model(tmp_path, "llama", shard=False)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"intermediate_size": 96', '"intermediate_size": 128'))
    with pytest.raises(ModelDirError, match="has shape"):
        ModelRunner(tmp_path, num_blocks=8, device="cpu", dtype="float32")


def test_checkpoints_with_the_older_rope_config_format_match(tmp_path: Path):
    """Most checkpoints in the wild have top-level rope_theta and rope_scaling (transformers < 5)."""
    import json

    hf = build_hf_model(tmp_path, "llama3-rope")
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT)[-1], atol=TOLERANCE, rtol=0)


def test_gemma3_checkpoints_with_the_older_config_format_match(tmp_path: Path):
    """Gemma 3's released checkpoints: rope_theta and rope_scaling for the global layers,
    rope_local_base_freq for the sliding ones, and sliding_window_pattern instead of layer_types."""
    import json

    hf = build_hf_model(tmp_path, "gemma3")
    config = json.loads((tmp_path / "config.json").read_text())
    ropes = config.pop("rope_parameters")
    del config["layer_types"], config["_sliding_window_pattern"]
    config["rope_local_base_freq"] = ropes["sliding_attention"]["rope_theta"]
    config["rope_theta"] = ropes["full_attention"].pop("rope_theta")
    config["rope_scaling"] = ropes["full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT)[-1], atol=TOLERANCE, rtol=0)


def test_the_demo_model_runs_through_the_same_code_and_matches(tmp_path: Path):
    from daemon.engine.demo_model import ensure_demo_model

    directory = ensure_demo_model(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    runner = ModelRunner(directory, num_blocks=16, device="cpu", dtype="float32")
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT)[-1], atol=TOLERANCE, rtol=0)


# A bfloat16 forward is held to transformers' own: against the float32 logits, its error may be at
# most twice what transformers' bfloat16 forward of the same weights shows (floor 1e-3, for the
# variants where transformers happens to land very close).
BF16_ERROR_RATIO, BF16_ERROR_FLOOR = 2.0, 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_is_as_close_to_float32_as_transformers_own(tmp_path: Path, variant: str):
    hf = build_hf_model(tmp_path, variant)
    reference = hf_logits(hf, PROMPT)[-1]
    theirs = (hf_logits(hf.to(torch.bfloat16), PROMPT)[-1] - reference).abs().max().item()
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="bfloat16")
    ours = (runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0] - reference).abs().max().item()
    assert ours <= max(BF16_ERROR_RATIO * theirs, BF16_ERROR_FLOOR), (ours, theirs)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_run_in_the_dtype_asked(tmp_path: Path, stored: str):
    """A checkpoint stored in bfloat16 or float16 runs in float32 on CPU under dtype auto (exactly the
    stored weights, upcast), or in the stored dtype when asked."""
    hf = build_hf_model(tmp_path, "qwen3").to(getattr(torch, stored))
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == stored
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="auto")
    assert runner.dtype == torch.float32
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf.float(), PROMPT)[-1], atol=TOLERANCE, rtol=0)
    assert ModelRunner(tmp_path, num_blocks=8, device="cpu", dtype=stored).dtype == getattr(torch, stored)


def test_every_family_and_rope_kind_has_a_variant():
    """The parity tests above cover the whole registry: a family or RoPE kind added without a
    variant in tests/harness/models.py fails here."""
    from daemon.engine.models.registry import BY_ARCHITECTURE, FAMILIES, ROPE_PARAMETERS

    covered = {BY_ARCHITECTURE[model_class.__name__].name for _config, model_class, _options in VARIANTS.values()}
    assert covered == {family.name for family in FAMILIES}
    kinds = {(options.get("rope_scaling") or {}).get("rope_type", "default") for *_, options in VARIANTS.values()}
    assert kinds == set(ROPE_PARAMETERS)


def test_a_half_precision_model_keeps_its_rotary_tables_in_float32(tmp_path: Path):
    """Weights take the dtype asked, made in it (no float32 copy first); rotary tables are the same
    float32 numbers as in a float32 model, not rounded through bfloat16."""
    build_hf_model(tmp_path, "gemma3")
    exact = dict(ModelRunner(tmp_path, num_blocks=8, device="cpu", dtype="float32").model.named_buffers())
    half = ModelRunner(tmp_path, num_blocks=8, device="cpu", dtype="bfloat16").model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for name, table in half.named_buffers():
        assert table.dtype == torch.float32 and torch.equal(table, exact[name]), name
