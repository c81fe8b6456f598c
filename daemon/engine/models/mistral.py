"""Mistral: the Llama decoder with sliding-window attention on every layer (config.json's sliding_window)."""

from __future__ import annotations

from daemon.engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Everything Mistral adds is read by LlamaShape: its window applies to every layer when set."""
