"""How many bytes of text one token can stand for, from a tokenizer's own description.

A prompt of B bytes then has at least B / that many tokens, known before it is
tokenized: a prompt far beyond the context is refused for the price of its length.
The bound must never refuse a prompt that fits, so it is given only for tokenizers
where every input byte is provably part of some token: byte-level BPE (every byte
has a symbol, none is dropped or fused into one unknown token), with pre-tokenizers
that split but never remove text, added tokens that never swallow whitespace, and
no normalizer or only a Unicode normalization form. Anything else has no bound
(None), and its prompts are simply tokenized.
"""

from __future__ import annotations

from typing import Any

from tokenizers import pre_tokenizers

# Unicode normalization can shrink text: a character's canonical decomposition has
# at most 4 code points (U+1F82 and the like), so an input whose normalized form is
# one character had at most 4 characters of at most 4 bytes each, while that one
# character is at least 1 byte. NFD and NFKD never shrink the count of characters.
UNICODE_FORMS = {"NFC": 16, "NFKC": 16, "NFD": 4, "NFKD": 4}
# Pre-tokenizers that split the text into pieces and keep every byte of it, unless told to remove.
SPLITTING = {"Split", "Digits", "Punctuation", "ByteLevel"}
BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def bytes_per_token(config: dict[str, Any]) -> int | None:
    """The most bytes of prompt one token can cover, for a parsed tokenizer.json; None when unknown."""
    if config.get("truncation") is not None:
        return None  # the tokenizer cuts long texts itself: a long prompt can still have few tokens
    shrink = _normalizer_shrink(config.get("normalizer"))
    pre = config.get("pre_tokenizer")
    model = config.get("model") or {}
    if shrink is None or not _keeps_every_byte(pre) or not _has_byte_level(pre) or model.get("type") != "BPE":
        return None
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab.keys() >= BYTE_ALPHABET:
        return None  # a byte without a symbol is dropped or unknown: no token stands for it
    added = config.get("added_tokens") or []
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None  # such a token takes the whitespace beside it, however long
    # A byte-level symbol is one byte; prefixes and suffixes only make a token look longer.
    longest = max(len(token) for token in vocab)
    longest = max([longest, *(len(str(token.get("content", "")).encode()) for token in added)])
    return longest * shrink


def _normalizer_shrink(normalizer: dict[str, Any] | None) -> int | None:
    """How many input bytes become one byte of normalized text, at most; None when unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers") or []:
            shrink = _normalizer_shrink(part)
            if shrink is None:
                return None
            factor *= shrink
        return factor
    if kind == "Prepend":  # adds text, never removes any
        return 1
    return UNICODE_FORMS.get(kind)  # Replace, Strip, Lowercase, BertNormalizer...: may remove text


def _pre_tokenizers(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [part for inner in pre.get("pretokenizers") or [] for part in _pre_tokenizers(inner)]
    return [pre]


def _keeps_every_byte(pre: dict[str, Any] | None) -> bool:
    return all(part.get("type") in SPLITTING and part.get("behavior") != "Removed" for part in _pre_tokenizers(pre))


def _has_byte_level(pre: dict[str, Any] | None) -> bool:
    return any(part.get("type") == "ByteLevel" for part in _pre_tokenizers(pre))
