"""Work too long for the tokenizer's loop, done on a thread beside it.

Tokenizing a prompt of a few megabytes takes seconds; done on the loop, every other
request in this worker waits that long. Such prompts go to one thread instead (the
tokenizers library lets go of the GIL while it encodes, see TextTokenizer.tokenize),
and the loop goes on serving; each result comes back to the loop, through a pipe the
loop polls beside its sockets, and the loop alone touches sockets and request state.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

# Continuations run on the loop: with the work's result, or the exception it raised.
Then = Callable[[Any, BaseException | None], None]


class OffLoop:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[str, Callable[[], Any]]] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[str, Any, BaseException | None]] = queue.SimpleQueue()
        self._waiting: dict[str, Then] = {}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        # A daemon thread: a process told to stop does not wait for a tokenization nobody will read.
        threading.Thread(target=self._work, name="tokenize-off-loop", daemon=True).start()

    @property
    def fd(self) -> int:
        """Readable when results are back: for the loop's poller."""
        return self._wake_read

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, key: str, work: Callable[[], Any], then: Then) -> None:
        self._waiting[key] = then
        self._jobs.put((key, work))

    def cancel(self, key: str) -> bool:
        """Forget `key`'s work: it runs to its end (it cannot be interrupted), and its result is dropped."""
        return self._waiting.pop(key, None) is not None

    def finished(self) -> list[tuple[Then, Any, BaseException | None]]:
        """The continuations of the work done since the last call, with their results; on the loop."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass
        ready = []
        while True:
            try:
                key, result, error = self._done.get_nowait()
            except queue.Empty:
                return ready
            then = self._waiting.pop(key, None)
            if then is not None:  # else cancelled meanwhile
                ready.append((then, result, error))

    def _work(self) -> None:
        while True:
            key, work = self._jobs.get()
            result, error = None, None
            try:
                result = work()
            except BaseException as exc:  # handed to the loop, which decides what it means
                error = exc
            self._done.put((key, result, error))
            os.write(self._wake_write, b"\0")
