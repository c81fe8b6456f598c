"""The one test harness: every suite imports it, and no suite imports another.

- harness.wait: `until` a state is reached, `never` (for a while) a state that must not come.
- harness.procs: processes and ports, from /proc: a daemon's process tree, children, parents,
  file watches; free and taken ports.
- harness.logs: the daemon's JSON log, read as it grows, and waits for its events.
- harness.daemons: the real `daemon` command: run it, start a daemon and stop it with all it started.
- harness.reloadable: a daemon started from a config file that the test edits and reloads.
- harness.metrics: /metrics scraped; the engine's figures (running requests, KV cache) and waits on them.
- harness.load: the clients: one request and how it ended, sets of requests held in flight,
  steady traffic; httpx over HTTP/1.1 and HTTP/2, and curl for HTTP/2 drains.
- harness.raw_h2: a bare HTTP/2 client, for what well-behaved clients never send.
- harness.notify: a stand-in for systemd's notification socket.
- harness.files: model directories, safetensors files, certificates.
- harness.tokenizer_files: SentencePiece-style tokenizers (Llama 2, Mistral, Gemma, Phi-3 layouts).
- harness.models: small random transformers models, for the engine's logits tests.
"""
