"""Generated token ids to streamed text: incremental detokenizing and stop strings.

Decoding all generated ids again at every step would cost O(n) per step and O(n^2)
per request. Decoding a token alone is wrong too: byte-level tokens may carry part
of a UTF-8 character, and SentencePiece drops a token's leading space at the start
of a text. The tokenizers library's DecodeStream solves both, as vLLM uses it: it
decodes a short window (the ids of the last text it gave, then the new ones) and
gives what the new ids add once they end on a whole character.

Every tokenizer the daemon loads is a `tokenizers.Tokenizer` (only tokenizer.json is
supported), and DecodeStream decodes through the tokenizer's own decode, whatever its
decoder: there is no tokenizer it does not apply to, so no other algorithm is kept.
What is added around it: the prompt's context (a clean tail, not the whole prompt),
a bound on ids held back, and recovery when the library gives up on a stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"
# How many prompt ids give the first generated ids their context (vLLM's slow path uses 5).
PROMPT_CONTEXT_IDS = 5
# Ids held back over this many steps do not end in a character being completed but in
# invalid bytes (or in a run of skipped special tokens): emitting them as they are keeps
# the window, and so the cost of a step, bounded. DecodeStream alone would hold them all.
MAX_HELD_IDS = 16
# DecodeStream raises a bare Exception with this message when the text of its window no
# longer starts with the text it already gave (invalid bytes regrouped by byte fallback).
INVALID_PREFIX = "Invalid prefix"


class IncrementalDetokenizer:
    """Turns one request's generated ids, a few at a time, into the text each push adds.

    The deltas concatenate to the decoding of all generated ids, except that the
    prompt's context keeps a leading space that decoding the ids alone would drop
    (SentencePiece, as vLLM does), and except where ids never make a valid character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._restart(self._clean_tail(prompt_ids))

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that `new_ids` complete; "" while they end inside a character."""
        return "".join([self._step(token_id) for token_id in new_ids])

    def finish(self) -> str:
        """Whatever is still held back at the end of the stream, incomplete characters included."""
        return self._force([]) if self._held else ""

    def _step(self, token_id: int) -> str:
        forced = self._force([]) if len(self._held) >= MAX_HELD_IDS else ""
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception as exc:  # the Rust side raises a bare Exception for every kind of error
            if not str(exc).startswith(INVALID_PREFIX):
                raise
            return forced + self._force([token_id])  # the stream is broken: what it held is out here
        if text is None:
            self._held.append(token_id)
            return forced
        # As the stream does: the ids of the text just given are the next window's context.
        self._context, self._held = [*self._held, token_id], []
        return forced + text

    def _force(self, new_ids: list[int]) -> str:
        """The text of the held ids and `new_ids` as they are, then a fresh stream."""
        ids = [*self._held, *new_ids]
        context_text = self._decode(self._context)
        text = self._decode([*self._context, *ids])
        text = text[len(context_text) :] if text.startswith(context_text) else self._decode(ids)
        # Ids that gave no text (skipped special tokens) leave the old context as good as it was;
        # else the forced ids' own clean tail is the context, as it may end inside a character.
        self._restart(self._context if not text else self._clean_tail(ids))
        return text

    def _restart(self, context: list[int]) -> None:
        self._stream = DecodeStream(ids=context, skip_special_tokens=self._skip_special_tokens)
        # What the stream holds, mirrored to flush it: DecodeStream has no way to give it back.
        self._context = context  # ids whose text is out, decoded before the next ones
        self._held: list[int] = []  # ids stepped since the stream last gave text

    def _clean_tail(self, ids: Sequence[int]) -> list[int]:
        """The last few of `ids`, cut to start and end on whole characters (or none): a context.

        Of a prompt, not all of it, as vLLM gives it: the stream would decode all of it at
        the first step, and a prompt given as ids may end inside a character, whose bytes
        the stream would then give as if they were generated text. A tail whose text is
        empty is a context too, as it is to vLLM: a SentencePiece '▁' the decoder drops at
        the start of a text still makes the '▁' after it a space."""
        for start in range(max(len(ids) - PROMPT_CONTEXT_IDS, 0), len(ids)):
            context = list(ids[start:])
            text = self._decode(context)
            if not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                return context
        return []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)


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
