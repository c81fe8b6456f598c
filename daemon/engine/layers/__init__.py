"""The parts models are built of: norms, rotary embeddings, projections, attention, MLPs, experts, logits.

A model family's file (daemon/engine/models) composes these; nothing here knows a family by name.
"""
