"""The GPU worker tier: loads the model, owns the KV cache tensors, runs the scheduler's steps."""
