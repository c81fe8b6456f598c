"""Every family and RoPE kind of the registry served through the whole daemon, as a user would.

Each variant of SERVED (a tiny random checkpoint built with transformers by the harness, sharded
safetensors, a word-level tokenizer.json) is served by a real daemon; greedy completions of
several prompts of mixed lengths, sent in one batched request, must be the tokens transformers'
`generate` picks on the same weights (each token decodes to its own word, "w<id>"). SERVED is
one variant per family, chosen so that together they use every RoPE kind (a daemon per variant
costs seconds of CI; tests/test_engine.py runs every variant of the harness at the engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from harness.daemons import serving  # noqa: E402
from harness.models import PROMPT, VARIANTS, build_hf_model, word_tokenizer  # noqa: E402

SERVED = [
    "llama3-rope",
    "linear-rope",  # Mistral
    "qwen2-yarn",
    "dynamic-rope",  # Qwen3
    "qwen2-moe",
    "qwen3-moe",
    "mixtral",
    "gemma2",
    "gemma3",
    "phi3-longrope",
]
NEW_TOKENS = 12
PROMPTS = [PROMPT, PROMPT[5:9], [7, 3, 150, 42, 8, 8, 19, 1, 64, 12, 13, 99, 101, 2, 5, 6, 33, 71, 90, 11, 23, 45]]


def expected_tokens(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_the_served_variants_cover_every_family_and_rope_kind():
    from daemon.engine.models.registry import BY_ARCHITECTURE, FAMILIES, ROPE_PARAMETERS

    families = {BY_ARCHITECTURE[VARIANTS[v][1].__name__].name for v in SERVED}
    assert families == {family.name for family in FAMILIES}
    kinds = {(VARIANTS[v][2].get("rope_scaling") or {}).get("rope_type", "default") for v in SERVED}
    assert kinds == set(ROPE_PARAMETERS)


@pytest.mark.parametrize("variant", SERVED)
def test_greedy_completions_through_the_daemon_match_transformers(tmp_path: Path, model_cache: Path, variant: str):
    model_dir = tmp_path / "model"
    hf = build_hf_model(model_dir, variant)
    hf.generation_config.eos_token_id = None  # the request ignores EOS too: both run NEW_TOKENS steps
    tokenizer = word_tokenizer(hf.config.vocab_size)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    expected = [[f"w{token}" for token in expected_tokens(hf, prompt)] for prompt in PROMPTS]
    settings = {"model.path": str(model_dir), "model.served_model_name": "tiny", "model.device": "cpu"}
    (tmp_path / "daemon").mkdir()
    with serving(tmp_path / "daemon", model_cache, settings) as daemon:
        assert daemon.wait_for_event("worker.ready")["architecture"] == type(hf).__name__  # the family served
        body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert [c["text"].split() for c in choices] == expected, json.dumps(choices)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_prompt_by_prompt(tmp_path: Path, model_cache: Path):
    """tokenizer.path of another model, whose ids go past the model's vocabulary (160 here): the
    daemon serves, warns at start, and refuses a prompt with such an id with a 400 that says so,
    rather than failing the step (and every request in it) in the worker."""
    model_dir = tmp_path / "model"
    build_hf_model(model_dir, "llama")
    word_tokenizer(400).save(str(model_dir / "tokenizer.json"))
    settings = {"model.path": str(model_dir), "model.served_model_name": "tiny", "model.device": "cpu"}
    (tmp_path / "daemon").mkdir()
    with serving(tmp_path / "daemon", model_cache, settings) as daemon:
        warning = daemon.wait_for_event("tokenizer.vocab_exceeds_model")
        assert (warning["tokenizer_ids"], warning["model_ids"]) == (400, 160), warning
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0}
        fits = httpx.post(f"{daemon.url}/v1/completions", json={**body, "prompt": "w3 w159"}, timeout=60)
        assert fits.status_code == 200, fits.text
        for prompt in ("w3 w300", [3, 300]):
            refused = httpx.post(f"{daemon.url}/v1/completions", json={**body, "prompt": prompt}, timeout=60)
            assert refused.status_code == 400, refused.text
            message = refused.json()["error"]["message"]
            assert "token id 300, outside the model's vocabulary of 160 ids" in message, message
        assert not daemon.events("worker.step_failed")
