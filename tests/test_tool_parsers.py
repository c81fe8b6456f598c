"""daemon.frontend.tool_parsers: tool calls out of a chat answer's text, whole and streamed.

Every format with one call, several, content around them, and calls that do not hold up (left as
content, as written). Above all, streaming agrees with `parse` for any split of the text into
feeds: every split point, every pair of them for short texts, one character at a time, random cuts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from itertools import islice

import pytest

from daemon.frontend.tool_parsers import (
    PARSERS,
    Parsed,
    StreamDelta,
    ToolParser,
    parser_named,
)
from daemon.frontend.tool_parsers.required import RequiredParser
from daemon.tokenizer.chat import ChatTemplate

TOOLS = ("get_weather", "search", "now")
ID = re.compile(r"call_[0-9a-zA-Z]{24}")

# arguments as a model may write them: spacing kept, brackets and quotes inside strings
WEATHER = '{"city": "Paris",  "unit": "celsius"}'
SEARCH = '{"query": "a } b ] c \\" d", "filters": [{"site": "x"}, [1, 2]]}'
NOW = "{}"


def parser(name: str, tools: tuple[str, ...] = TOOLS) -> ToolParser:
    return parser_named(name)(tools)


def streamed(tool_parser: ToolParser, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The content and (name, arguments) of the calls a stream gives for these feeds, checking the deltas' shape."""
    stream = tool_parser.stream()
    deltas: list[StreamDelta] = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    content = "".join(delta.content for delta in deltas)
    calls: list[list[str]] = []
    ids: list[str] = []
    for delta in deltas:
        for part in delta.tool_calls:
            if part.index == len(calls):  # a new call: the first delta names it, without arguments yet
                assert part.id is not None and ID.fullmatch(part.id) and part.name is not None
                calls.append([part.name, part.arguments])
                ids.append(part.id)
            else:
                assert part.index == len(calls) - 1, "a call's deltas come together, in order"
                assert part.id is None and part.name is None
                calls[-1][1] += part.arguments
    assert len(set(ids)) == len(ids)
    assert [(call.id, call.name, call.arguments) for call in stream.calls] == [
        (i, name, arguments) for i, (name, arguments) in zip(ids, calls, strict=True)
    ]
    return content, [(name, arguments) for name, arguments in calls]


def splits(text: str, seed: int = 0, pairs: bool = True) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    if pairs and len(text) <= 70:
        for first in range(len(text) + 1):
            for second in range(first, len(text) + 1):
                yield [text[:first], text[first:second], text[second:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 8)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def check_streams(tool_parser: ToolParser, text: str, pairs: bool = True) -> Parsed:
    """parse(text), after checking that every split of the text streams the same content and calls."""
    parsed = tool_parser.parse(text)
    assert parsed.content is None or parsed.content.strip() or not parsed.tool_calls
    assert parsed.content != ""
    expected = (parsed.content or "", [(call.name, call.arguments) for call in parsed.tool_calls])
    for pieces in splits(text, pairs=pairs):
        assert streamed(tool_parser, pieces) == expected, pieces
    return parsed


def calls(parsed: Parsed) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed.tool_calls]


# ---------------------------------------------------------------- hermes


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_hermes_one_call():
    parsed = check_streams(parser("hermes"), hermes_call("get_weather", WEATHER))
    assert parsed.content is None
    assert calls(parsed) == [("get_weather", WEATHER)]
    assert ID.fullmatch(parsed.tool_calls[0].id)


def test_hermes_several_calls_after_content():
    text = "Let me look both up.\n" + hermes_call("get_weather", WEATHER) + "\n" + hermes_call("search", SEARCH) + "\n"
    parsed = check_streams(parser("hermes"), text, pairs=False)
    assert parsed.content == "Let me look both up.\n"  # the whitespace between and after calls is layout
    assert calls(parsed) == [("get_weather", WEATHER), ("search", SEARCH)]
    assert len({call.id for call in parsed.tool_calls}) == 2


def test_hermes_content_after_calls():
    parsed = check_streams(parser("hermes"), hermes_call("now", NOW) + "\nDone.")
    assert (parsed.content, calls(parsed)) == ("\nDone.", [("now", NOW)])


@pytest.mark.parametrize("ending", ["", "\n", "\n</tool", "\n</tool_call"])
def test_hermes_unclosed_last_call(ending):
    text = 'Sure.<tool_call>\n{"name": "now", "arguments": {}}' + ending
    parsed = check_streams(parser("hermes"), text)
    assert (parsed.content, calls(parsed)) == ("Sure.", [("now", NOW)])


@pytest.mark.parametrize(
    "inner",
    [
        '{"name": "now", "arguments": {}',  # bad JSON
        '{"arguments": {}}',  # no name
        '{"name": "now", "arguments": "{}"}',  # arguments not an object
        '{"name": "now"}',  # no arguments
        '{"name": "delete_everything", "arguments": {}}',  # a tool the request did not offer
        '[{"name": "now", "arguments": {}}]',
        '{"name": "now", "arguments": {}} and more',
        "",
    ],
)
def test_hermes_malformed_call_is_content(inner):
    for text in (
        f"<tool_call>{inner}</tool_call>",
        f"Hi <tool_call>\n{inner}\n</tool_call> bye",
        f"<tool_call>{inner}",
    ):
        parsed = check_streams(parser("hermes"), text, pairs=False)
        assert (parsed.content, parsed.tool_calls) == (text, [])


def test_hermes_malformed_between_valid_calls():
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    text = hermes_call("now", NOW) + bad + hermes_call("get_weather", WEATHER)
    parsed = check_streams(parser("hermes"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == (bad, [("now", NOW), ("get_weather", WEATHER)])


def test_hermes_no_tools_offered():
    text = hermes_call("now", NOW)
    assert parser("hermes", ()).parse(text) == Parsed(text, [])


def test_hermes_streams_content_early_and_calls_when_whole():
    stream = parser("hermes").stream()
    assert stream.feed("It is <").content == "It is "  # "<" may start a marker
    assert stream.feed("b>").content == "<b>"
    assert stream.feed("<tool_").content == ""
    delta = stream.feed('call>{"name": "now", "arguments": {}}')
    assert delta == StreamDelta()  # held: the closing tag decides
    delta = stream.feed("</tool_call>")
    assert [(d.index, d.name, d.arguments) for d in delta.tool_calls] == [(0, "now", ""), (0, None, "{}")]
    assert delta.tool_calls[0].id == stream.calls[0].id
    assert stream.finish() == StreamDelta()


def test_plain_text_and_empty_answers():
    for name in PARSERS:
        for text in ("", "  \n", "Hello, world.", "a < b and [x] {y}"):
            parsed = check_streams(parser(name), text)
            assert (parsed.content, parsed.tool_calls) == (text or None, [])


# ---------------------------------------------------------------- llama3_json


def llama_call(name: str, arguments: str, key: str = "parameters") -> str:
    return f'{{"name": "{name}", "{key}": {arguments}}}'


@pytest.mark.parametrize("prefix", ["", "<|python_tag|>", " \n", "\n<|python_tag|> "])
def test_llama3_one_call(prefix):
    parsed = check_streams(parser("llama3_json"), prefix + llama_call("get_weather", WEATHER), pairs=not prefix)
    assert (parsed.content, calls(parsed)) == (None, [("get_weather", WEATHER)])


def test_llama3_arguments_key():
    parsed = check_streams(parser("llama3_json"), llama_call("search", SEARCH, "arguments"), pairs=False)
    assert calls(parsed) == [("search", SEARCH)]


@pytest.mark.parametrize("separator", ["; ", ";", "\n", " ; "])
def test_llama3_several_calls(separator):
    text = "<|python_tag|>" + separator.join([llama_call("now", NOW), llama_call("get_weather", WEATHER)])
    for ending in ("", ";", "\n"):
        parsed = check_streams(parser("llama3_json"), text + ending, pairs=False)
        assert (parsed.content, calls(parsed)) == (None, [("now", NOW), ("get_weather", WEATHER)])


@pytest.mark.parametrize(
    "text",
    [
        "The call would be " + llama_call("now", NOW),  # only an answer that starts with the JSON is a call
        '{"answer": 42}',  # JSON, not a call
        llama_call("launch", NOW),  # a tool the request did not offer
        llama_call("now", "[]"),
        '{"name": "now", "parameters": {}',  # cut off
        '{"name": "now", "parameters": {}]',
        '<|python_tag|>brave_search.call(query="weather")',  # a built-in tool, not JSON
        "<|python_tag|>",
        "<|python",
    ],
)
def test_llama3_malformed_is_content(text):
    parsed = check_streams(parser("llama3_json"), text, pairs=False)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def test_llama3_text_after_a_call_is_content():
    text = llama_call("now", NOW) + " is what I would call; " + llama_call("now", NOW)
    parsed = check_streams(parser("llama3_json"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == (" is what I would call; " + llama_call("now", NOW), [("now", NOW)])


def test_llama3_a_bad_second_call_is_content():
    text = llama_call("now", NOW) + "; " + llama_call("nope", NOW) + "; " + llama_call("now", NOW)
    parsed = check_streams(parser("llama3_json"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == (
        "; " + llama_call("nope", NOW) + "; " + llama_call("now", NOW),
        [("now", NOW)],
    )


# ---------------------------------------------------------------- mistral


def mistral_element(name: str, arguments: str) -> str:
    return f'{{"name": "{name}", "arguments": {arguments}}}'


def test_mistral_list_one_call():
    parsed = check_streams(parser("mistral"), "[TOOL_CALLS][" + mistral_element("get_weather", WEATHER) + "]")
    assert (parsed.content, calls(parsed)) == (None, [("get_weather", WEATHER)])


def test_mistral_list_several_calls_after_content():
    elements = ", ".join([mistral_element("now", NOW), mistral_element("search", SEARCH)])
    text = "Looking it up. [TOOL_CALLS] [" + elements + "]"
    parsed = check_streams(parser("mistral"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == ("Looking it up. ", [("now", NOW), ("search", SEARCH)])


def test_mistral_named_calls():
    text = "[TOOL_CALLS]get_weather[ARGS]" + WEATHER + "[TOOL_CALLS]now[ARGS]{}"
    parsed = check_streams(parser("mistral"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == (None, [("get_weather", WEATHER), ("now", NOW)])
    parsed = check_streams(parser("mistral"), "Sure.\n[TOOL_CALLS]now[ARGS]{}\nDone.")
    assert (parsed.content, calls(parsed)) == ("Sure.\n\nDone.", [("now", NOW)])


@pytest.mark.parametrize(
    "text",
    [
        "[TOOL_CALLS][" + mistral_element("nope", NOW) + "]",
        "[TOOL_CALLS][" + mistral_element("now", "[1]") + "]",
        '[TOOL_CALLS][{"arguments": {}}]',
        '[TOOL_CALLS][{"name": "now", "arguments": {}]',
        "[TOOL_CALLS][]",
        "[TOOL_CALLS]",
        "[TOOL_CALLS]now",
        "[TOOL_CALLS]now[ARGS]",
        "[TOOL_CALLS]now[ARGS][]",
        '[TOOL_CALLS]now[ARGS]{"a": }',
        "[TOOL_CALLS]nope[ARGS]{}",
        "[TOOL_CALLS]now{}",
        "Text [TOOL_CALLS] and more text",
    ],
)
def test_mistral_malformed_is_content(text):
    parsed = check_streams(parser("mistral"), text, pairs=False)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def test_mistral_calls_in_a_list_count_one_by_one():
    text = "[TOOL_CALLS][" + mistral_element("now", NOW) + ", " + mistral_element("nope", NOW) + "]"
    parsed = check_streams(parser("mistral"), text, pairs=False)
    assert (parsed.content, calls(parsed)) == (", " + mistral_element("nope", NOW) + "]", [("now", NOW)])
    stream = parser("mistral").stream()
    assert len(stream.feed(text[: text.index("}}, ") + 2]).tool_calls) == 2  # out before the list ends


# ---------------------------------------------------------------- all formats


FRAGMENTS = {
    "hermes": [
        hermes_call("now", NOW),
        hermes_call("search", SEARCH),
        hermes_call("nope", NOW),
        '<tool_call>{"name": "now", "arguments": {}}',
        "<tool_call>{bad",
        "</tool_call>",
        "<tool_",
        "<",
    ],
    "llama3_json": [
        llama_call("now", NOW),
        llama_call("search", SEARCH, "arguments"),
        llama_call("nope", NOW),
        "<|python_tag|>",
        "<|python",
        '{"name": "now", "parameters": {',
        ";",
        "; ",
        "}",
    ],
    "mistral": [
        "[TOOL_CALLS]",
        "[TOOL_CALLS][",
        mistral_element("now", NOW),
        mistral_element("nope", NOW),
        ", ",
        "]",
        "[TOOL_CALLS]search[ARGS]" + SEARCH,
        "now[ARGS]{}",
        "[ARGS]",
        "[TOOL",
    ],
}
FILLER = ["", " ", "\n", "Hi.", "x", "{", "[", '"']


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_random_texts_stream_as_parsed(name):
    """Texts made of the format's pieces, well and badly put together: any split streams what parse gives."""
    rng = random.Random(name)
    tool_parser = parser(name)
    found = 0
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS[name] + FILLER) for _ in range(rng.randint(1, 6)))
        parsed = tool_parser.parse(text)
        found += len(parsed.tool_calls)
        expected = (parsed.content or "", calls(parsed))
        for pieces in [list(text), *islice(splits(text, seed=rng.random(), pairs=False), 6)]:
            assert streamed(tool_parser, pieces) == expected, (text, pieces)
        for call in parsed.tool_calls:
            assert isinstance(json.loads(call.arguments), dict) and call.arguments in text
    assert found > 20


def test_parser_named():
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}
    assert all(parser_named(name).name == name for name in PARSERS)
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        parser_named("qwen")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{%- if tools %}<tool_call>\n{{ tool_call | tojson }}\n</tool_call>{% endif %}", "hermes"),
        ("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' + tool_calls | tojson }}", "mistral"),
        ("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", "llama3_json"),
        ("{{ '<|start_header_id|>' + role }}{%- if tools is not none %}{{ tools | tojson }}{% endif %}", "llama3_json"),
        ("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}", None),  # Llama 3.0: no tools
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}", None),
        ("", None),
    ],
)
def test_model_tool_parser_auto_reads_the_chat_templates_markers(template, expected):
    assert ChatTemplate(template, "tokenizer_config.json", {}).tool_call_format == expected


# --- tool_choice required: the JSON array the grammar writes ------------------------------------------


def required_call(name: str, arguments: str) -> str:
    return f'{{"name": "{name}", "parameters": {arguments}}}'


@pytest.mark.parametrize("separator", [", ", ","])
def test_required_array_of_calls(separator):
    text = "[" + separator.join([required_call("get_weather", WEATHER), required_call("search", SEARCH)]) + "]"
    parsed = check_streams(RequiredParser(TOOLS), text)
    assert parsed.content is None and calls(parsed) == [("get_weather", WEATHER), ("search", SEARCH)]


def test_required_array_cut_short_keeps_the_whole_calls_and_shows_the_rest():
    text = "[" + required_call("now", NOW) + ', {"name": "search", "param'
    parsed = check_streams(RequiredParser(TOOLS), text)
    assert calls(parsed) == [("now", NOW)] and parsed.content == ', {"name": "search", "param'
