"""Tokenizers built with the tokenizers library, in the layouts models ship them in tokenizer.json.

The demo model's tokenizer is byte-level BPE (GPT-2, Llama 3, Qwen); the SentencePiece-style
BPE of Llama 2, Mistral, Gemma and Phi-3 is built here, with byte fallback, in both layouts
transformers converts a tokenizer.model to.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

# The SentencePiece vocabulary: these words (and their letters) are tokens, any other character is bytes.
SENTENCEPIECE_WORDS = ("▁the", "▁river", "▁hello", "▁world", "▁walked", "▁café", "日", "▁日本")
SENTENCEPIECE_LAYOUTS = ("llama2", "metaspace")


def sentencepiece_tokenizer(layout: str, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback, as transformers converts a tokenizer.model:
    "llama2" spells spaces as '▁' in a normalizer and strips the first space in a decoder chain;
    "metaspace" does both in Metaspace pre-tokenizer and decoder. <unk>, <s> and </s> take ids
    0, 1, 2; `special_tokens` (a chat format's markers) are added after the vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    merges = []
    for word in SENTENCEPIECE_WORDS:  # each word merged letter by letter, left to right
        piece = word[0]
        vocab.setdefault(piece, len(vocab))
        for char in word[1:]:
            vocab.setdefault(char, len(vocab))
            if piece + char not in vocab:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
            piece += char
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if layout == "llama2":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="always")])
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in ("<s>", "</s>", *special_tokens)])
    return tokenizer
