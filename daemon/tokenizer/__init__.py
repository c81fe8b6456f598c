"""The tokenizer tier: prompts to token ids on the way in, generated ids to text deltas on the way out."""
