"""daemon.frontend.reasoning: thinking apart from content, for a whole answer and for a stream.

The invariant that matters most: however the text is cut into feeds (every cut of short texts,
one character at a time, random cuts), the stream sends exactly what parse() gives.
"""

from __future__ import annotations

import itertools
import random

import pytest

from daemon.frontend.reasoning import REASONING_PARSERS, ReasoningDelta, ReasoningParser, Split

STYLES = sorted(REASONING_PARSERS)

# (style, answer, expected split)
CASES = [
    # qwen3: thinking only when the answer opens <think>
    ("qwen3", "<think>\nLet me see.\n</think>\n\nThe answer is 4.", Split("\nLet me see.\n", "The answer is 4.")),
    ("qwen3", "  \n<think>hmm</think>ok", Split("hmm", "ok")),
    ("qwen3", "The answer is 4.", Split(None, "The answer is 4.")),
    ("qwen3", "\n\nThe answer is 4.", Split(None, "\n\nThe answer is 4.")),
    ("qwen3", "no <think> at the start</think>x", Split(None, "no <think> at the start</think>x")),
    ("qwen3", "<think>\n\n</think>\n\nHi", Split("\n\n", "Hi")),
    ("qwen3", "<think></think>Hi", Split(None, "Hi")),
    ("qwen3", "<think></think>", Split(None, None)),
    ("qwen3", "<think>still thinking when the tokens ran out", Split("still thinking when the tokens ran out", None)),
    ("qwen3", "<think>a</think>\n\n", Split("a", None)),
    ("qwen3", "<think>a</think>\n  b\n", Split("a", "  b\n")),
    ("qwen3", "<think>a</think>b</think>c<think>", Split("a", "b</think>c<think>")),
    ("qwen3", "<think><think>a</think>b", Split("<think>a", "b")),
    ("qwen3", "<thi", Split(None, "<thi")),
    ("qwen3", "  ", Split(None, "  ")),
    ("qwen3", "", Split(None, None)),
    # deepseek_r1: the prompt opened <think>, so the answer starts inside it
    ("deepseek_r1", "Okay, 2+2.\n</think>\n\nThe answer is 4.", Split("Okay, 2+2.\n", "The answer is 4.")),
    ("deepseek_r1", "<think>Okay.</think>4", Split("Okay.", "4")),
    ("deepseek_r1", "\n<think>Okay.</think>4", Split("Okay.", "4")),
    ("deepseek_r1", "\nOkay.</think>4", Split("\nOkay.", "4")),
    ("deepseek_r1", "Still thinking when the tokens ran out", Split("Still thinking when the tokens ran out", None)),
    ("deepseek_r1", "</think>\n\n4", Split(None, "4")),
    ("deepseek_r1", "<think></think>4", Split(None, "4")),
    ("deepseek_r1", "a</think>b</think>c", Split("a", "b</think>c")),
    ("deepseek_r1", "a</thin", Split("a</thin", None)),
    ("deepseek_r1", " <thi", Split(" <thi", None)),
    ("deepseek_r1", "", Split(None, None)),
]

# fragments that make markers, near-markers and the whitespace around them likely
FRAGMENTS = ["<think>", "</think>", "<", "</", "<thi", "</thin", "think", ">", "k>", "\n", " ", "a", "bc", "\t"]


def streamed(style: str, pieces: list[str]) -> tuple[str, str]:
    stream = ReasoningParser(style).stream()
    reasoning, content = [], []
    for delta in [*(stream.feed(piece) for piece in pieces), stream.finish()]:
        reasoning.append(delta.reasoning)
        content.append(delta.content)
    return "".join(reasoning), "".join(content)


def expected(style: str, text: str) -> tuple[str, str]:
    split = ReasoningParser(style).parse(text)
    return split.reasoning or "", split.content or ""


def cut(text: str, points: tuple[int, ...] | list[int]) -> list[str]:
    bounds = [0, *sorted(points), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(0, 12))) for _ in range(count)]


@pytest.mark.parametrize(("style", "text", "split"), CASES)
def test_parse(style: str, text: str, split: Split) -> None:
    assert ReasoningParser(style).parse(text) == split


@pytest.mark.parametrize(("style", "text", "split"), CASES)
def test_stream_whole_and_by_character(style: str, text: str, split: Split) -> None:
    want = (split.reasoning or "", split.content or "")
    assert streamed(style, [text]) == want
    assert streamed(style, list(text)) == want


@pytest.mark.parametrize(("style", "text", "split"), CASES)
def test_stream_every_one_and_two_cuts(style: str, text: str, split: Split) -> None:
    want = (split.reasoning or "", split.content or "")
    for count in (1, 2):
        for points in itertools.combinations(range(1, len(text)), count):
            assert streamed(style, cut(text, points)) == want, points


@pytest.mark.parametrize("style", STYLES)
def test_stream_matches_parse_on_random_texts(style: str) -> None:
    rng = random.Random(1234)
    for text in random_texts(400, seed=99):
        want = expected(style, text)
        assert streamed(style, list(text)) == want, text
        for _ in range(5):
            points = rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))) if text else []
            assert streamed(style, cut(text, points)) == want, (text, points)


@pytest.mark.parametrize("style", STYLES)
def test_stream_every_cut_of_short_random_texts(style: str) -> None:
    """Every way of cutting a short text: 2**(n-1) splits of n characters."""
    for text in random_texts(60, seed=7):
        if len(text) > 11:
            text = text[:11]
        want = expected(style, text)
        inner = range(1, len(text))
        for count in range(len(inner) + 1):
            for points in itertools.combinations(inner, count):
                assert streamed(style, cut(text, points)) == want, (text, points)


def test_stream_holds_back_only_a_possible_marker() -> None:
    stream = ReasoningParser("qwen3").stream()
    assert stream.feed("\n<thi").reasoning == ""  # may still open thinking
    assert stream.feed("nk>Let") == ReasoningDelta(reasoning="Let")
    assert stream.feed(" me see</th").reasoning == " me see"  # "</th" may close it
    delta = stream.feed("ank")  # it did not
    assert (delta.reasoning, delta.content) == ("</thank", "")
    assert stream.feed("</think>\n").reasoning == ""  # the newline may lead the content
    delta = stream.feed("\nHi <think>")
    assert (delta.reasoning, delta.content) == ("", "Hi <think>")
    assert stream.feed("</").content == "</"  # markers mean nothing in the content
    finished = stream.finish()
    assert (finished.reasoning, finished.content) == ("", "")


def test_stream_sends_content_at_once_without_thinking() -> None:
    stream = ReasoningParser("qwen3").stream()
    assert stream.feed("Hello").content == "Hello"
    assert stream.feed(" <think>").content == " <think>"


def test_stream_flushes_an_unfinished_marker() -> None:
    qwen = ReasoningParser("qwen3").stream()
    assert qwen.feed(" <thin").content == ""
    assert qwen.finish().content == " <thin"
    r1 = ReasoningParser("deepseek_r1").stream()
    assert r1.feed("a</thin").reasoning == "a"
    assert r1.finish().reasoning == "</thin"


def test_in_reasoning() -> None:
    qwen = ReasoningParser("qwen3").stream()
    assert not qwen.in_reasoning
    qwen.feed("<think")
    assert not qwen.in_reasoning  # not yet known
    qwen.feed(">a</think")
    assert qwen.in_reasoning
    qwen.feed(">")
    assert not qwen.in_reasoning

    r1 = ReasoningParser("deepseek_r1").stream()
    assert r1.in_reasoning
    r1.feed("a</think>b")
    assert not r1.in_reasoning

    plain = ReasoningParser("qwen3").stream()
    plain.feed("Hi")
    assert not plain.in_reasoning


@pytest.mark.parametrize("style", STYLES)
def test_end_marker(style: str) -> None:
    assert ReasoningParser(style).end_marker == "</think>"


def test_unknown_style() -> None:
    with pytest.raises(ValueError, match=r"'granite'.*deepseek_r1, qwen3"):
        ReasoningParser("granite")
