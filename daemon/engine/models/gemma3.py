"""Gemma 3 (text): Gemma 2's decoder with a (1 + w) RMSNorm over each head of q and of k before
rotation, one global layer in every six (sliding_window_pattern) when config.json lists no
layer_types, and a RoPE per layer type: global layers rotate with rope_theta and its scaling,
sliding ones with rope_local_base_freq, unscaled (in transformers 5's format, one rope_parameters
table per layer type). Soft-capping is off unless config.json sets it."""

from __future__ import annotations

import functools
from typing import Any

from daemon.engine.layers.norm import OffsetRMSNorm
from daemon.engine.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    defaults = Gemma2ForCausalLM.defaults | {
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    }

    @staticmethod
    def window_pattern(config: dict[str, Any]) -> int:
        # transformers 5 writes the older field with an underscore beside the older name
        return config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6

    def qk_norm(self):
        return functools.partial(OffsetRMSNorm, eps=self.shape.rms_norm_eps)
