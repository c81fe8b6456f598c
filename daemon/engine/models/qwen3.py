"""Qwen3: the Llama decoder with an RMSNorm over each head of q and of k before rotation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from daemon.engine.layers.norm import RMSNorm
from daemon.engine.models.llama import LlamaForCausalLM, LlamaShape
from daemon.engine.models.qwen2 import qwen_windows
from daemon.engine.models.registry import Family


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        shape = LlamaShape.read(config, family)
        return dataclasses.replace(shape, windows=qwen_windows(config, shape.num_layers))

    def qk_norm(self):
        return functools.partial(RMSNorm, eps=self.shape.rms_norm_eps)
