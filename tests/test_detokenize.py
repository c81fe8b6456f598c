"""daemon.tokenizer.detokenize: generated ids to streamed text, through the tokenizers library's DecodeStream.

Two kinds of tokenizer, as models ship them in tokenizer.json: the demo model's byte-level
BPE (GPT-2, Llama 3, Qwen), where a character may be split across tokens and a space is
part of the token after it; and SentencePiece-style BPE (Llama 2, Mistral, Gemma), where
'▁' stands for a space, decoding drops the first token's leading space, and characters
outside the vocabulary fall back to one token per UTF-8 byte. The second kind is built
by the harness (harness.tokenizer_files), in both layouts transformers converts them to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from harness.tokenizer_files import SENTENCEPIECE_LAYOUTS, sentencepiece_tokenizer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daemon.engine.demo_model import BOS, ensure_demo_model
from daemon.tokenizer.detokenize import MAX_HELD_IDS, IncrementalDetokenizer
from daemon.tokenizer.loading import TextTokenizer, load_text_tokenizer

# Characters of one to four UTF-8 bytes, grapheme clusters of several code points, combining marks.
TRICKY = ["é", "ß", "日本語", "한국어", "😀", "👩‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0323", "\u200d", " ", "\n", "Ω", "€"]
unicode_texts = st.lists(
    st.one_of(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), st.sampled_from(TRICKY)),
    max_size=30,
).map("".join)


@pytest.fixture(scope="session")
def demo(model_cache: Path) -> TextTokenizer:
    return load_text_tokenizer(ensure_demo_model(model_cache))


def sentencepiece_dir(directory: Path, layout: str) -> TextTokenizer:
    sentencepiece_tokenizer(layout).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return load_text_tokenizer(directory)


@pytest.fixture(scope="session", params=SENTENCEPIECE_LAYOUTS)
def sentencepiece(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return sentencepiece_dir(tmp_path_factory.mktemp(f"sentencepiece-{request.param}"), request.param)


@pytest.fixture(scope="session", params=("byte-level", *SENTENCEPIECE_LAYOUTS))
def any_tokenizer(
    request: pytest.FixtureRequest, demo: TextTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> TextTokenizer:
    if request.param == "byte-level":
        return demo
    return sentencepiece_dir(tmp_path_factory.mktemp(f"any-{request.param}"), request.param)


def stream(detokenizer: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int]) -> list[str]:
    """Push `ids` in chunks of the given sizes (cycled), then finish: every delta, in order."""
    deltas, start, turn = [], 0, 0
    while start < len(ids):
        size = chunks[turn % len(chunks)] if chunks else 1
        deltas.append(detokenizer.push(ids[start : start + size]))
        start, turn = start + size, turn + 1
    deltas.append(detokenizer.finish())
    return deltas


def text_after(tokenizer: TextTokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What `ids` add to the text of the prompt: what the deltas must join to (vLLM's output)."""
    return tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]


def continuation(tokenizer: TextTokenizer, prompt: str, text: str) -> tuple[list[int], list[int]]:
    """The ids of `prompt`, and those of `text` as a model generates them after it: the rest of
    the ids of both together (a SentencePiece text alone would start with a lone '▁')."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    ids = tokenizer.encode(prompt + text, add_special_tokens=True)
    assert ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, ids[len(prompt_ids) :]


# --- byte-level BPE -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=unicode_texts, text=unicode_texts, chunks=st.lists(st.integers(1, 5), max_size=8))
@example(prompt="", text="😀👩‍👩‍👧日本", chunks=[1])
@example(prompt="", text="000𐀀👩\u200d👩\u200d👧", chunks=[1, 3])  # no push ends on a whole character
def test_deltas_join_to_the_decoded_text(demo: TextTokenizer, prompt: str, text: str, chunks: list[int]) -> None:
    ids = demo.encode(text, add_special_tokens=False)
    detokenizer = demo.incremental_detokenizer(demo.encode(prompt, add_special_tokens=True), skip_special_tokens=True)
    deltas = stream(detokenizer, ids, chunks)
    assert "".join(deltas) == demo.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)  # no character is ever sent in pieces


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.integers(0, 1023), max_size=MAX_HELD_IDS),
    chunks=st.lists(st.integers(1, 4), max_size=4),
    skip=st.booleans(),
)
def test_any_ids_stream_to_their_decoding(demo: TextTokenizer, ids: list[int], chunks: list[int], skip: bool) -> None:
    # Random ids: invalid byte sequences and special tokens, not only text the tokenizer wrote.
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=skip)
    assert "".join(stream(detokenizer, ids, chunks)) == demo.decode(ids, skip_special_tokens=skip)


def test_partial_characters_are_held_back(demo: TextTokenizer) -> None:
    ids = demo.encode("😀", add_special_tokens=False)
    assert len(ids) == 4  # one byte token each: the demo vocabulary has no merges for emoji
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=True)
    assert [detokenizer.push([i]) for i in ids] == ["", "", "", "😀"]
    assert detokenizer.finish() == ""


def test_a_push_gives_every_whole_character_it_holds(demo: TextTokenizer) -> None:
    # One push of several ids ending inside a character: what comes before it is not held back with it.
    ids = demo.encode("ab😀", add_special_tokens=False)
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=True)
    assert detokenizer.push(ids[:-1]) == "ab"
    assert detokenizer.push(ids[-1:]) == "😀"


def test_finish_flushes_an_incomplete_character(demo: TextTokenizer) -> None:
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=True)
    ids = demo.encode("a😀", add_special_tokens=False)[:-1]
    assert "".join(detokenizer.push([i]) for i in ids) == "a"
    assert detokenizer.finish() == "\ufffd"
    assert detokenizer.finish() == ""  # flushed once


def test_prompt_ending_inside_a_character(demo: TextTokenizer) -> None:
    # A prompt given as ids may stop mid-character; its context is then left out, not half-reused.
    emoji = demo.encode("😀", add_special_tokens=False)
    detokenizer = demo.incremental_detokenizer(emoji[:2], skip_special_tokens=True)
    generated = emoji[2:] + demo.encode(" ok", add_special_tokens=False)
    assert "".join(stream(detokenizer, generated, [1])) == demo.decode(generated)


def test_a_long_stream_decodes_exactly(demo: TextTokenizer) -> None:
    unit = "The golden river 1850, café 日本語 😀 👩‍👩‍👧 e\u0301!\n"
    ids: list[int] = []
    while len(ids) < 5000:
        ids += demo.encode(unit, add_special_tokens=False)
    detokenizer = demo.incremental_detokenizer(demo.encode("prompt", add_special_tokens=True), True)
    assert "".join(detokenizer.push([i]) for i in ids) + detokenizer.finish() == demo.decode(ids)


def test_garbage_that_never_completes_is_emitted_after_a_bound(demo: TextTokenizer) -> None:
    # DecodeStream alone would hold every id (and decode them all at each step) until one ends a character.
    lead_byte = demo.encode("😀", add_special_tokens=False)[0]  # starts a 4-byte character that never comes
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=True)
    deltas = [detokenizer.push([lead_byte]) for _ in range(200)] + [detokenizer.finish()]
    assert set("".join(deltas)) == {"\ufffd"}
    gaps = [len(run) for run in "".join("x" if delta else "." for delta in deltas).split("x")]
    assert max(gaps) <= MAX_HELD_IDS  # text comes out at least every MAX_HELD_IDS + 1 ids


# --- SentencePiece-style BPE with byte fallback ---------------------------------------------------


def test_sentencepiece_tokenizers_split_characters_into_bytes(sentencepiece: TextTokenizer) -> None:
    # The premise of the tests below: a character outside the vocabulary is one token per UTF-8 byte.
    assert len(sentencepiece.encode("😀", add_special_tokens=False)) == 1 + 4  # '▁' and four bytes
    assert len(sentencepiece.encode("語", add_special_tokens=False)) == 1 + 3
    assert sentencepiece.decode(sentencepiece.encode("hello 😀", add_special_tokens=False)) == "hello 😀"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=unicode_texts, text=unicode_texts, chunks=st.lists(st.integers(1, 5), max_size=8))
@example(prompt="the river", text="hello 😀 world 日本語", chunks=[1])
@example(prompt="語", text="語😀", chunks=[2, 3])
@example(prompt=" ", text="0", chunks=[])  # the prompt's only text is a '▁' that decodes to nothing
def test_sentencepiece_deltas_join_to_the_decoded_text(
    sentencepiece: TextTokenizer, prompt: str, text: str, chunks: list[int]
) -> None:
    prompt_ids = sentencepiece.encode(prompt, add_special_tokens=True)
    ids = sentencepiece.encode(text, add_special_tokens=False)
    deltas = stream(sentencepiece.incremental_detokenizer(prompt_ids, skip_special_tokens=True), ids, chunks)
    assert "".join(deltas) == text_after(sentencepiece, prompt_ids, ids)
    assert not any("\ufffd" in delta for delta in deltas)
    alone = stream(sentencepiece.incremental_detokenizer([], skip_special_tokens=True), ids, chunks)
    assert "".join(alone) == sentencepiece.decode(ids)  # not always `text`: Metaspace drops a leading space


def test_sentencepiece_bytes_are_held_until_their_character_is_whole(sentencepiece: TextTokenizer) -> None:
    ids = sentencepiece.encode("日本語 😀", add_special_tokens=False)  # '▁日本', then 3 bytes, '▁', 4 bytes
    detokenizer = sentencepiece.incremental_detokenizer([], skip_special_tokens=True)
    assert [detokenizer.push([i]) for i in ids] == ["日本", "", "", "語", " ", "", "", "", "😀"]
    assert detokenizer.finish() == ""


def test_sentencepiece_finish_flushes_an_incomplete_character(sentencepiece: TextTokenizer) -> None:
    ids = sentencepiece.encode("hello😀", add_special_tokens=False)[:-2]  # the emoji's last two bytes never come
    detokenizer = sentencepiece.incremental_detokenizer(sentencepiece.encode("the", True), skip_special_tokens=True)
    assert "".join(detokenizer.push([i]) for i in ids) == " hello"
    assert detokenizer.finish() == "\ufffd\ufffd"  # byte fallback writes one per byte of an invalid run
    assert sentencepiece.decode(ids) == "hello\ufffd\ufffd"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 300), max_size=40), chunks=st.lists(st.integers(1, 4), max_size=4))
def test_sentencepiece_any_ids_stream_without_failing(
    sentencepiece: TextTokenizer, ids: list[int], chunks: list[int]
) -> None:
    # Random ids, mostly bytes. Byte fallback decodes a run of bytes with an invalid one in it
    # as all invalid, valid bytes before it included, so text already sent may differ from the
    # decoding of all ids; streaming goes on whatever the ids.
    prompt_ids = sentencepiece.encode("the river", add_special_tokens=True)
    deltas = stream(sentencepiece.incremental_detokenizer(prompt_ids, skip_special_tokens=True), ids, chunks)
    valid = ids and all(i > 258 for i in ids)  # no byte token: nothing to rewrite
    assert not valid or "".join(deltas) == text_after(sentencepiece, prompt_ids, ids)


def test_bytes_that_break_the_stream_are_given_as_they_are(sentencepiece: TextTokenizer) -> None:
    # 'ß' as two bytes, then a stray continuation byte: byte fallback now decodes all three as
    # invalid, so the text no longer starts with the 'ß' already sent, and DecodeStream raises.
    lead, continuation_byte = sentencepiece.encode("ß", add_special_tokens=False)[-2:]
    the = sentencepiece.encode("the", add_special_tokens=False)
    detokenizer = sentencepiece.incremental_detokenizer([], skip_special_tokens=True)
    deltas = [detokenizer.push([lead, continuation_byte]), detokenizer.push([continuation_byte])]
    deltas += [detokenizer.push(the), detokenizer.finish()]
    assert deltas == ["ß", "", "\ufffd the", ""]
    assert detokenizer.push(the) == " the"  # a fresh stream goes on, 'the' as its context


# --- both kinds -----------------------------------------------------------------------------------


def test_the_first_generated_token_keeps_its_leading_space(any_tokenizer: TextTokenizer) -> None:
    # As vLLM does: the prompt's last ids give the first generated token its context, so a
    # SentencePiece '▁hello' starts with a space after the prompt, not as the start of a text.
    prompt_ids, ids = continuation(any_tokenizer, "the river", " hello 😀 日本語")
    detokenizer = any_tokenizer.incremental_detokenizer(prompt_ids, skip_special_tokens=True)
    assert "".join(stream(detokenizer, ids, [1])) == " hello 😀 日本語" == text_after(any_tokenizer, prompt_ids, ids)


def test_a_run_of_skipped_special_tokens_keeps_the_context(any_tokenizer: TextTokenizer) -> None:
    # More special tokens in a row than are held: they give no text, and the space after them stays.
    prompt_ids, world = continuation(any_tokenizer, "hello", " world")
    ids = [any_tokenizer.bos_token_id] * (2 * MAX_HELD_IDS) + world
    detokenizer = any_tokenizer.incremental_detokenizer(prompt_ids, skip_special_tokens=True)
    assert "".join(stream(detokenizer, ids, [1])) == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(demo: TextTokenizer, skip: bool) -> None:
    bos = demo.bos_token_id
    ids = [bos, *demo.encode(" river", add_special_tokens=False), bos]
    detokenizer = demo.incremental_detokenizer([], skip_special_tokens=skip)
    assert "".join(stream(detokenizer, ids, [1])) == (" river" if skip else f"{BOS} river{BOS}")
