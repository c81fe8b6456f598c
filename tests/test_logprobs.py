"""Log-probabilities through the real daemon against transformers on the same weights.

The daemon reports each generated token's log-probability and the likeliest tokens' from the
model's raw logits (before any sampling option changes them, vLLM's default): for a greedy
completion of the demo model they must be transformers' log-softmax at each position, and so
must a prompt's (echo with logprobs, prompt_logprobs), also when the prompt is prefilled in
chunks and when its blocks are already in the prefix cache. The behaviour of each request
field (shapes, bounds, streaming, what options leave alone) is checked in test_api_fields.py.
"""

from __future__ import annotations

import openai
import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from harness.daemons import serving  # noqa: E402

from daemon.engine.demo_model import ensure_demo_model  # noqa: E402
from daemon.tokenizer.loading import load_text_tokenizer  # noqa: E402

PROMPT = [1, 87, 412, 33, 640, 9, 271]
GENERATED = 8
TOP = 5


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache):
    """One daemon for both tests, prefilling 7 tokens a step: a chunk's first token is scored by
    the previous chunk's last row."""
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, {"scheduler.chunked_prefill_size": 7}) as running:
        yield running


def reference_model(model_cache):
    return transformers.AutoModelForCausalLM.from_pretrained(ensure_demo_model(model_cache), dtype=torch.float32).eval()


def test_greedy_logprobs_are_transformers_log_softmax(daemon, model_cache):
    model_dir = ensure_demo_model(model_cache)
    model = reference_model(model_cache)
    with torch.inference_mode():
        ids = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=GENERATED, do_sample=False, min_new_tokens=GENERATED
        )[0]
        reference = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), dim=-1)
    generated = ids[len(PROMPT) :].tolist()
    texts = load_text_tokenizer(model_dir).token_texts(generated)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=GENERATED,
        temperature=0,
        logprobs=TOP,
        extra_body={"ignore_eos": True},
    )
    found = answer.choices[0].logprobs
    assert found.tokens == texts
    for i, token in enumerate(generated):
        at = reference[len(PROMPT) - 1 + i]  # the logits at the position before the token predict it
        assert found.token_logprobs[i] == pytest.approx(at[token].item(), abs=2e-5)
        top = sorted(found.top_logprobs[i].values(), reverse=True)[:TOP]
        assert top == pytest.approx(at.topk(TOP).values.tolist(), abs=2e-5)


LONG_PROMPT = [(13 * i + 5) % 1000 + 4 for i in range(40)]  # two full blocks and a part


def test_prompt_logprobs_are_transformers_log_softmax_across_chunks_and_cached_blocks(daemon, model_cache):
    model = reference_model(model_cache)
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([LONG_PROMPT])).logits[0].double(), dim=-1)
    expected = [reference[i - 1, token].item() for i, token in enumerate(LONG_PROMPT) if i > 0]
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(2):  # the second time its full blocks are cached: it is computed again anyway
        answer = client.completions.create(
            model="demo", prompt=LONG_PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0
        )
        found = answer.choices[0].logprobs.token_logprobs
        assert found[0] is None and found[1:] == pytest.approx(expected, abs=2e-5)
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=LONG_PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 3}
    )
    entries = raw.http_response.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None
    for i, entry in enumerate(entries[1:], start=1):
        own = entry[str(LONG_PROMPT[i])]
        assert own["logprob"] == pytest.approx(expected[i - 1], abs=2e-5)
        assert own["rank"] == 1 + int((reference[i - 1] > reference[i - 1, LONG_PROMPT[i]]).sum())
        best = sorted(entry.values(), key=lambda e: e["rank"])[0]
        assert best["logprob"] == pytest.approx(reference[i - 1].max().item(), abs=2e-5)
