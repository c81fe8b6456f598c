"""Loading a model directory's safetensors into a model, strictly.

Every tensor the model needs must be in the checkpoint with the right shape,
and every tensor in the checkpoint must be used: a partial or mismatched load
is an error that names the tensors, never a model with random weights.

A model split across tensor-parallel ranks says which slices of each tensor it holds
(layers/linear.py's Pieces); a rank reads only those from the files, not whole tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from daemon.engine.layers.linear import CheckpointTensor
from daemon.engine.model_dir import ModelDirError, Problem, inspect_model_dir
from daemon.engine.models.base import CausalLM


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Copy the checkpoint's tensors into `model` (already on its device, in its dtype)."""
    info = inspect_model_dir(model_dir)
    params = model.checkpoint_tensors()
    loaded: set[str] = set()
    unexpected: list[str] = []
    for shard in info.weight_files:
        try:
            with safe_open(shard, framework="pt", device="cpu") as tensors:
                for name in tensors.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if model.is_ignored(name):
                        continue
                    if name not in params:
                        unexpected.append(name)
                        continue
                    _copy_into(params[name], tensors.get_slice(name), name, shard)
                    loaded.add(name)
        except (SafetensorError, OSError) as exc:
            raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"cannot read {shard}: {exc}") from None
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors {_names(unexpected)}")
        raise ModelDirError(Problem.WEIGHTS_CORRUPT, f"{model_dir} does not match its config: {'; '.join(problems)}")


def _copy_into(wanted: CheckpointTensor, stored, name: str, shard: Path) -> None:
    """Copy each Piece of `wanted` from `stored` (a safetensors slice: nothing is read until indexed)."""
    shape = tuple(stored.get_shape())
    if shape != wanted.shape:
        raise ModelDirError(
            Problem.WEIGHTS_CORRUPT,
            f"{shard}: tensor {name} has shape {list(shape)}, the config implies {list(wanted.shape)}",
        )
    with torch.no_grad():
        for piece in wanted.pieces:
            index: tuple = (...,)
            if piece.dim is not None:
                index = (slice(None),) * piece.dim + (slice(piece.start, piece.start + piece.length),)
            part = stored[index]
            piece.target.copy_(part.to(dtype=piece.target.dtype))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
