"""The scheduler tier: admission, continuous batching, KV-cache accounting."""
