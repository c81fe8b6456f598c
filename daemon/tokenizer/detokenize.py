"""Generated token ids to streamed text: incremental detokenizing and stop strings.

Decoding all generated ids again at every step would cost O(n) per step and O(n^2)
per request. Decoding a token alone is wrong too: byte-level tokens may carry part
of a UTF-8 character, and SentencePiece drops a token's leading space at the start
of a text. So, as vLLM and TGI do, each step decodes a short window: the ids since
the last emitted text plus a few before them for context, and emits what that
window adds to the text of its context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"
# How many prompt ids give the first generated ids their context (vLLM uses 5).
PROMPT_CONTEXT_IDS = 5
# A character cut at the end of a push spans at most 3 of its last ids: so many earlier
# places inside the push are tried for a clean end before holding all of it back.
MAX_PROBES = 3
# Ids held back over this many calls do not end in a character being completed but in
# invalid bytes (or in a rare run of tokens that each straddle two characters); emitting
# them as they are keeps the window, and so the cost of a call, bounded.
MAX_HELD_IDS = 16


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated ids, a few at a time, into the text each push adds.

    The deltas concatenate to the decoding of all generated ids, except that the
    prompt's context keeps a leading space that decoding the ids alone would drop
    (SentencePiece), and except after MAX_HELD_IDS ids that never make a character.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # ids[:read] is context whose text is already out, ids[read:] is held back.
        self._ids = self._prompt_context(prompt_ids)
        self._read = len(self._ids)

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that `new_ids` complete; "" while they end inside a character."""
        held = len(self._ids) - self._read
        tried = len(self._ids)  # the ends up to here were tried by earlier pushes
        self._ids.extend(new_ids)
        return self._advance(tried, force=held >= MAX_HELD_IDS)

    def finish(self) -> str:
        """Whatever is still held back at the end of the stream, incomplete characters included."""
        return self._advance(len(self._ids), force=True)

    def _advance(self, tried: int, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        context_text = self._decode(self._ids[: self._read])
        last = len(self._ids)
        # The end of this push first, then places inside it that no earlier call tried.
        lowest = max(tried + 1, self._read + 1, last - MAX_PROBES)
        for end in [last, *range(last - 1, lowest - 1, -1)]:
            text = self._decode(self._ids[:end])
            if force or (len(text) > len(context_text) and not text.endswith(REPLACEMENT_CHAR)):
                break
        else:
            return ""  # every end tried cuts a character whose last bytes are still to come
        if force:
            self._ids.clear()  # forced text may end inside a character: it can be no one's context
            self._read = 0
        else:
            del self._ids[: self._read]  # the ids just emitted are the next window's context
            self._read = end - self._read
        return text[len(context_text) :]

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, cut to start and end on whole characters (or none)."""
        for start in range(max(len(prompt_ids) - PROMPT_CONTEXT_IDS, 0), len(prompt_ids)):
            context = list(prompt_ids[start:])
            text = self._decode(context)
            if text and not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                return context
        return []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class StopStrings:
    """Cuts a stream of text deltas at the first of the client's stop strings.

    The first is the one completed first, as generation ends the moment a stop string
    appears; of two that end on the same character, the longer. So where the deltas
    split the text never changes where it is cut. Text that might be the start of a
    stop string is held back until the next delta settles it, so a stop split across
    deltas is still found and never shown.
    """

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False):
        self._stops = tuple(stop for stop in stops if stop)  # an empty stop would match before any text
        self._include_stop = include_stop  # the stop string found ends the text instead of being cut
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(the text that may be sent now, whether a stop string was reached); nothing more after a stop."""
        if self.stopped:
            return "", True
        text = self._held + delta
        found = self._first_stop(text)
        if found is not None:
            self._held, self.stopped = "", True
            start, end = found
            return text[: end if self._include_stop else start], True
        keep = self._longest_stop_start(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of the stream: the held-back text, which turned out to start no stop string."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """Where the stop string that `text` completes first begins and ends, if it holds one."""
        found = [(at + len(stop), at) for stop in self._stops if (at := text.find(stop)) >= 0]
        if not found:
            return None
        end, start = min(found)
        return start, end

    def _longest_stop_start(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
