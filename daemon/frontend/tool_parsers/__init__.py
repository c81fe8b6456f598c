"""Tool calls out of a chat answer's text, for the `tool_calls` of a chat completion.

Pure text, so the front end can parse both a whole answer (`ToolParser.parse`) and a stream of
detokenized text (`ToolParser.stream`), where a marker may arrive split across feeds, down to
one character each. The two agree: any split of a text into feeds streams out exactly the
content and calls that `parse` gives, because `parse` is the stream fed once and finished.

Each format is a `Scanner`: given the text not yet decided on, it says what its start is
(content, a call, markup around calls) or that it needs more text. It only decides what more
text could not change, which is what makes every split agree.

A call that does not hold up (bad JSON, no name, arguments not an object, a tool the request
did not offer) is left in the content as the model wrote it: the client sees what happened.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from json.decoder import scanstring
from typing import Any, ClassVar


def new_call_id() -> str:
    """A tool call's id, as OpenAI's look: "call_" and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" and 24 random hex digits
    name: str
    arguments: str  # the arguments object as the model wrote it, whitespace and all


@dataclass(frozen=True)
class ToolCallDelta:
    index: int  # the call's position in this answer, from 0
    id: str | None = None  # on the first delta of a call only
    name: str | None = None  # on the first delta of a call only
    arguments: str = ""  # a piece of the arguments text


@dataclass(frozen=True)
class Parsed:
    content: str | None  # None when empty, or only whitespace around calls
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class Kind(enum.Enum):
    CONTENT = enum.auto()  # text for the client, with any pending markup before it
    MARKUP = enum.auto()  # belongs to a call if one follows, else it is content after all
    CALL = enum.auto()  # a whole, valid call; pending markup before it is dropped
    DROP = enum.auto()  # markup that closes the calls before it (a closing bracket, trailing space)


@dataclass(frozen=True, slots=True)
class Step:
    kind: Kind
    length: int  # characters of the text it covers; 0 only for CONTENT, to flush pending markup
    name: str = ""
    arguments: str = ""


class Scanner(ABC):
    """The state of one answer in one format."""

    def __init__(self, tool_names: frozenset[str]):
        self.tool_names = tool_names
        # what a look at the same undecided text found so far (how far a search got), so that a
        # long call arriving a token at a time is not scanned from its start on every feed;
        # emptied after every step, since positions shift when text is taken off the front
        self.memo: dict[str, Any] = {}

    @abstractmethod
    def step(self, text: str, final: bool) -> Step | None:
        """What the start of `text` is, or None to wait for more (never when `final`: no more comes)."""

    def call(self, obj: str, keys: tuple[str, ...] = ("arguments",)) -> tuple[str, str] | None:
        """(name, arguments text) of a JSON object `{"name": ..., "<key>": {...}}`; None when it is not a valid call."""
        value = _load(obj)
        if not isinstance(value, dict):
            return None
        key = next((k for k in keys if k in value), None)
        if key is None or not isinstance(value[key], dict) or not self._offered(value.get("name")):
            return None
        return value["name"], raw_members(obj)[key]

    def named_call(self, name: str, arguments: str) -> tuple[str, str] | None:
        """(name, arguments text) when the request offered that tool and the arguments are a JSON object."""
        if not self._offered(name) or not isinstance(_load(arguments), dict):
            return None
        return name, arguments

    def _offered(self, name: Any) -> bool:
        return isinstance(name, str) and name in self.tool_names

    def json_end(self, text: str, start: int) -> int | None:
        """Where the JSON object or array at `start` ends, or None when it has not ended yet (memoized)."""
        brackets = self.memo.get("brackets")
        if brackets is None:
            brackets = self.memo["brackets"] = _Brackets(start)
        return brackets.end(text)


_OUTSIDE = re.compile(r'[\[\]{}"]')
_IN_STRING = re.compile(r'["\\]')
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
SPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def _load(text: str) -> Any:
    """The JSON value of `text`, or None when it is not JSON (or nests deeper than Python recurses)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class _Brackets:
    """Matches brackets from an opening one, outside strings, resuming where the last look stopped.

    It only finds where the value would end; json.loads judges it. A closing bracket of the wrong
    kind ends the value too, so that broken JSON is given up on as soon as it shows.
    """

    def __init__(self, start: int):
        self.pos = start
        self.open: list[str] = []
        self.in_string = False

    def end(self, text: str) -> int | None:
        pos = self.pos
        while True:
            if self.in_string:
                found = _IN_STRING.search(text, pos)
                if found is None or (found.group() == "\\" and found.end() >= len(text)):
                    self.pos = len(text) if found is None else found.start()
                    return None
                if found.group() == "\\":
                    pos = found.end() + 1  # the escaped character, whatever it is
                    continue
                self.in_string, pos = False, found.end()
                continue
            found = _OUTSIDE.search(text, pos)
            if found is None:
                self.pos = len(text)
                return None
            char, pos = found.group(), found.end()
            if char == '"':
                self.in_string = True
            elif char in "[{":
                self.open.append(char)
            elif not self.open or self.open.pop() != ("{" if char == "}" else "[") or not self.open:
                return pos


def raw_members(obj: str) -> dict[str, str]:
    """Each member of a valid JSON object text as the text of its value (a repeated key: the last, as json.loads)."""
    members: dict[str, str] = {}
    pos = _JSON_SPACE.match(obj).end() + 1  # past "{"
    while True:
        pos = _JSON_SPACE.match(obj, pos).end()
        if obj[pos] == "}":
            return members
        key, pos = scanstring(obj, pos + 1)
        pos = _JSON_SPACE.match(obj, pos).end() + 1  # past ":"
        start = _JSON_SPACE.match(obj, pos).end()
        _, end = _DECODER.raw_decode(obj, start)
        members[key] = obj[start:end]
        pos = _JSON_SPACE.match(obj, end).end()
        if obj[pos] == ",":
            pos += 1


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def content_until(text: str, marker: str, final: bool) -> Step | None:
    """Content up to `marker` (which `text` does not start with), holding back what may be its start."""
    end = text.find(marker)
    if end < 0:
        end = len(text) if final else len(text) - held_prefix(text, marker)
    return Step(Kind.CONTENT, end) if end else None


class ToolStream:
    """One streamed answer: feed it the text as it comes, then finish it."""

    def __init__(self, scanner: Scanner):
        self._scanner = scanner
        self._text = ""  # not decided on yet
        self._pending = ""  # markup that is content unless a call follows it
        # whitespace-only content so far: an answer of calls alone has no content, so it waits
        # for text that is not whitespace, or for the end of an answer without calls
        self._space = ""
        self._spoken = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> StreamDelta:
        self._text += text
        return self._advance(final=False)

    def finish(self) -> StreamDelta:
        delta = self._advance(final=True)
        self._content(delta, self._pending)
        self._pending = ""
        if not self.calls:
            delta.content += self._space
        self._space = ""
        return delta

    def _advance(self, final: bool) -> StreamDelta:
        delta = StreamDelta()
        while self._text:
            step = self._scanner.step(self._text, final)
            if step is None:
                if not final:
                    break
                step = Step(Kind.CONTENT, len(self._text))  # a scanner that cannot decide at the end
            self._scanner.memo.clear()
            piece, self._text = self._text[: step.length], self._text[step.length :]
            if step.kind is Kind.MARKUP:
                self._pending += piece
                continue
            if step.kind is Kind.CONTENT:
                self._content(delta, self._pending + piece)
            elif step.kind is Kind.CALL:
                call = ToolCall(new_call_id(), step.name, step.arguments)
                index = len(self.calls)
                self.calls.append(call)
                delta.tool_calls.append(ToolCallDelta(index, call.id, call.name))
                delta.tool_calls.append(ToolCallDelta(index, arguments=call.arguments))
            self._pending = ""
        return delta

    def _content(self, delta: StreamDelta, text: str) -> None:
        if self._spoken:
            delta.content += text
        elif text.strip():
            delta.content += self._space + text
            self._space, self._spoken = "", True
        else:
            self._space += text


class ToolParser(ABC):
    """One format, for the tools of one request: calls to other names are left as content."""

    name: ClassVar[str]
    scanner: ClassVar[type[Scanner]]

    def __init__(self, tool_names: Collection[str]):
        self.tool_names = frozenset(tool_names)

    def parse(self, text: str) -> Parsed:
        """A whole answer."""
        stream = self.stream()
        content = stream.feed(text).content + stream.finish().content
        return Parsed(content or None, stream.calls)

    def stream(self) -> ToolStream:
        """A fresh parser for one streamed answer."""
        return ToolStream(self.scanner(self.tool_names))


def parser_named(name: str) -> type[ToolParser]:
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None


# the formats import the shared parts above
from daemon.frontend.tool_parsers.hermes import HermesParser  # noqa: E402
from daemon.frontend.tool_parsers.llama3 import Llama3JsonParser  # noqa: E402
from daemon.frontend.tool_parsers.mistral import MistralParser  # noqa: E402

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)
}
