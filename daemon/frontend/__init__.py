"""The front-end tier: Granian serving the OpenAI-compatible API; it never imports torch."""
