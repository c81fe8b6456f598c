"""The engine on a CUDA GPU: logits match transformers there too. Skipped without CUDA.

Run on a GPU host with: pytest tests/test_engine_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")

from harness.models import PROMPT, VARIANTS, Sequences, build_hf_model  # noqa: E402

from daemon.engine.runner import ModelRunner  # noqa: E402


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.15)])
def test_cuda_logits_match_transformers(tmp_path: Path, variant: str, dtype: str, tolerance: float):
    hf = build_hf_model(tmp_path, variant).to("cuda", getattr(torch, dtype))
    runner = ModelRunner(tmp_path, num_blocks=64, device="cuda", dtype=dtype)
    seqs = Sequences(runner)
    prefill = runner.logits([seqs.chunk(1, PROMPT[:-1], 0)])[0]
    decode = runner.logits([seqs.chunk(1, PROMPT[-1:], len(PROMPT) - 1)])[0]
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT], device="cuda")).logits[0].float()
    torch.testing.assert_close(prefill, reference[-2], atol=tolerance, rtol=0)
    torch.testing.assert_close(decode, reference[-1], atol=tolerance, rtol=0)
