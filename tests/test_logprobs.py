"""Log-probabilities through the real daemon against transformers on the same weights.

The daemon reports each generated token's log-probability and the likeliest tokens' from the
model's raw logits (before any sampling option changes them, vLLM's default): for a greedy
completion of the demo model they must be transformers' log-softmax at each position. The
behaviour of each request field (shapes, bounds, streaming, what options leave alone) is
checked in test_api_fields.py.
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


def test_greedy_logprobs_are_transformers_log_softmax(tmp_path, model_cache):
    model_dir = ensure_demo_model(model_cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=GENERATED, do_sample=False, min_new_tokens=GENERATED
        )[0]
        reference = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), dim=-1)
    generated = ids[len(PROMPT) :].tolist()
    texts = load_text_tokenizer(model_dir).token_texts(generated)
    with serving(tmp_path, model_cache) as daemon:
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
