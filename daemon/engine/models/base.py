"""What every model class offers the runner and the weight loader."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daemon.engine.layers.attention import AttentionBatch, LayerCache
from daemon.engine.layers.linear import CheckpointTensor


class CausalLM(nn.Module):
    """A decoder-only model over a paged KV cache. Subclasses build `self.model` (embedding, layers, norm)
    and `self.head` (a LogitsHead) and set the cache layout; parameter names mirror the checkpoint's,
    so most tensors load by name (whole: norms, routers), and a layer that fuses, stacks or splits
    checkpoint tensors across tensor-parallel ranks says which slices of which through its
    `checkpoint_parts(name)` (such a layer holds no submodules)."""

    num_layers: int
    num_kv_heads: int  # this rank's (all of them at tensor-parallel size 1)
    head_dim: int
    tie_word_embeddings: bool
    # checkpoint tensors a model recomputes or does not use, by name suffix
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        context_ends: torch.Tensor,
        caches: list[LayerCache],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """input_ids, positions, context_ends [T] -> final hidden states [T, hidden]."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [N, hidden] -> next-token logits [N, vocab], float32."""
        return self.head(hidden)

    def checkpoint_tensors(self) -> dict[str, CheckpointTensor]:
        """Every tensor a checkpoint of this model holds, by its name there: its shape there, and what
        of it this model (this rank's share of it) takes where."""
        tensors: dict[str, CheckpointTensor] = {}
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            if hasattr(module, "checkpoint_parts"):
                parent, _, own = prefix.rpartition(".")
                parent_dot = f"{parent}." if parent else ""
                tensors.update({f"{parent_dot}{name}": t for name, t in module.checkpoint_parts(own).items()})
                continue
            for name, param in module.named_parameters(recurse=False):
                tensors[f"{dot}{name}"] = CheckpointTensor.whole(param)
        renamed = {self.checkpoint_name(name): tensor for name, tensor in tensors.items()}
        if self.tie_word_embeddings:
            renamed.pop("lm_head.weight", None)
        return renamed

    def checkpoint_name(self, name: str) -> str:
        """A parameter's name in the checkpoint: the same, except the head's lm_head sits at the top."""
        return name.removeprefix("head.")

    def is_ignored(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes) or (self.tie_word_embeddings and name == "lm_head.weight")


def config_int(config: dict[str, Any], name: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if value is None:
        raise KeyError(f"config.json lacks {name}")
    return int(value)
