"""Combinations SGLang refuses that daemon supports, with the reason it can."""

from __future__ import annotations

from daemon.config.rules.catalogue import LiftedLimit

LIFTED: list[LiftedLimit] = [
    LiftedLimit(
        "lifted.http2-with-tls-refresh",
        ("server.enable_http2", "server.tls.refresh"),
        sglang="refuses --enable-http2 with --enable-ssl-refresh: Granian cannot swap certificates in place",
        why="the supervisor owns the listening socket and rotates certificates by starting a new front-end "
        "on it and draining the old one, so HTTP/2 and refresh work together",
    ),
    LiftedLimit(
        "lifted.http2-with-tokenizer-workers",
        ("server.enable_http2", "tokenizer.workers"),
        sglang="refused --enable-http2 with --tokenizer-worker-num > 1 (lifted upstream later)",
        why="tokenizers are their own process pool behind ZeroMQ, independent of the front-end's HTTP mode",
    ),
]
