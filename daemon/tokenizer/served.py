"""The context the model worker serves, as the worker announced it: the limit the tokenizer checks.

The worker owns this fact: it loads the model and derives the context from model.context_length and
the model's own maximum. It reports it when ready; the supervisor records it in the status file and
sends it with the worker's "up" event. The tokenizer follows that news rather than deriving its own
value from the config, since a reload replaces the worker but not the tokenizer pool: its limit
changes when the new worker serves, in drain and blue-green mode alike. The scheduler refuses by the
same value, from the worker's own announcement; the tokenizer's checks only refuse earlier, for less.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from daemon.ipc.messages import LoadedModel, TierEvent, read_status_file, serving_worker

log = structlog.get_logger("daemon.tokenizer")


class ServedContext:
    """The newest serving worker's context length, and its model's vocabulary; None while no worker
    has ever served."""

    def __init__(self, socket_dir: Path, tokenizer_ids: int):
        self._socket_dir = socket_dir
        self._tokenizer_ids = tokenizer_ids
        self._epoch = 0  # the worker it came from: news of an older one is stale
        self.length: int | None = None
        self.vocab: int | None = None  # the model's ids: a tokenizer that has more would send ids it cannot embed
        self.refresh()

    def refresh(self) -> None:
        """Take it from the status file: at start, and while it is unknown (the worker's event may
        have gone out before this process listened)."""
        worker = serving_worker(read_status_file(self._socket_dir))
        if worker is not None and worker.model is not None:
            self._take(worker.epoch, worker.model)

    def follow(self, event: TierEvent) -> None:
        """A worker came up: the newest one serves new requests from now on."""
        if event.tier == "worker" and event.state == "up" and event.model is not None:
            self._take(event.epoch, event.model)

    def known(self) -> int | None:
        if self.length is None:
            self.refresh()
        return self.length

    def _take(self, epoch: int, model: LoadedModel) -> None:
        if epoch < self._epoch:
            return
        length = model.max_model_len
        if length != self.length:
            log.info("tokenizer.context", context=length, previous=self.length, worker_epoch=epoch)
        vocab = model.vocab_size or None
        if vocab is not None and vocab != self.vocab and self._tokenizer_ids > vocab:
            log.warning(
                "tokenizer.vocab_exceeds_model",
                tokenizer_ids=self._tokenizer_ids,
                model_ids=vocab,
                detail="prompts with ids the model does not have are refused with a 400",
            )
        self._epoch, self.length, self.vocab = epoch, length, vocab
