"""engine/grammar.py on the demo vocabulary, without processes: what each constraint lets through,
text by text (xgrammar's matcher), and how a constraint that cannot be used is reported."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from daemon.engine.demo_model import ensure_demo_model
from daemon.engine.grammar import Constraint, GrammarError, compiler_for_dir


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    directory = ensure_demo_model(tmp_path_factory.mktemp("cache"))
    return compiler_for_dir(directory, 1024, [1, 3])


def accepts(compiler, constraint: Constraint, text: str) -> bool:
    """Whether `text` is a whole answer the constraint allows."""
    matcher = xgr.GrammarMatcher(compiler.compile(constraint))
    return matcher.accept_string(text) and matcher.is_completed()


SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 4}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
)


TAGGED = {  # as the front-end makes it of vLLM's {structures, triggers}
    "type": "structural_tag",
    "format": {
        "type": "triggered_tags",
        "triggers": ["<f="],
        "tags": [
            {
                "type": "tag",
                "begin": "<f=item>",
                "content": {"type": "json_schema", "json_schema": json.loads(SCHEMA)},
                "end": "</f>",
            }
        ],
    },
}


@pytest.mark.parametrize(
    ("constraint", "text", "allowed"),
    [
        (Constraint("json_schema", SCHEMA), '{"name": "ab", "n": 3}', True),
        (Constraint("json_schema", SCHEMA), '{\n  "name": "ab",\n  "n": 3\n}', True),
        (Constraint("json_schema", SCHEMA, compact=True), '{\n  "name": "ab",\n  "n": 3\n}', False),
        (Constraint("json_schema", SCHEMA, compact=True), '{"name": "ab", "n": 3}', True),
        (Constraint("json_schema", SCHEMA), '{"name": "ab", "n": 3, "x": 1}', False),  # strict
        (Constraint("json_schema", SCHEMA), '{"name": "abcde", "n": 3}', False),
        (Constraint("json_schema", SCHEMA), '{"name": "a\tb", "n": 3}', False),  # JSON forbids a raw tab
        (Constraint("json_schema", SCHEMA), '{"name": "a bé", "n": -3}', True),  # any other character
        (Constraint("json_schema", SCHEMA), '{"name": "' + " " * 17 + '"}', False),
        (Constraint("json_object"), '{"anything": [1, {"b": null}]}', True),
        (Constraint("json_object"), "[1, 2]", False),  # an object, not any JSON
        (Constraint("regex", r"\d{3}-[a-z]+"), "123-abc", True),
        (Constraint("regex", r"\d{3}-[a-z]+"), "12-abc", False),
        (Constraint("choice", json.dumps(["yes", 'say "no"'])), 'say "no"', True),
        (Constraint("choice", json.dumps(["yes", 'say "no"'])), "no", False),
        (Constraint("grammar", 'root ::= "a" root | "b"'), "aaab", True),
        # a structural tag: free text, and after a trigger, a tag whose content follows its schema
        (Constraint("structural_tag", json.dumps(TAGGED)), 'Sure. <f=item>{"name": "ab", "n": 1}</f> done', True),
        (Constraint("structural_tag", json.dumps(TAGGED)), "No call at all.", True),
        (Constraint("structural_tag", json.dumps(TAGGED)), 'Sure. <f=item>{"n": 1}</f>', False),
        # a reasoning model thinks first, freely, and the constraint holds after its thinking
        (Constraint("regex", "[0-9]+", thinking="qwen3"), "<think>\nwell, 4 > 3</think>\n\n42", True),
        (Constraint("regex", "[0-9]+", thinking="qwen3"), "42", True),  # thinking is optional for qwen3
        (Constraint("regex", "[0-9]+", thinking="qwen3"), "<think>hmm</think>abc", False),
        (Constraint("regex", "[0-9]+", thinking="deepseek_r1"), "let me see</think>\n7", True),
        (Constraint("regex", "[0-9]+", thinking="deepseek_r1"), "7", False),  # the prompt opened <think>
    ],
)
def test_what_a_constraint_allows(compiler, constraint, text, allowed):
    assert accepts(compiler, constraint, text) is allowed


def test_strings_refuse_utf16_surrogates(compiler):
    """A random model picks byte tokens that spell a surrogate (ED A0 80): invalid UTF-8, which
    xgrammar would let into a string and no JSON parser takes."""
    matcher = xgr.GrammarMatcher(compiler.compile(Constraint("json_schema", SCHEMA)))
    assert matcher.accept_string('{"name": "')
    # the demo vocabulary's single-byte tokens, by byte
    info = compiler.info
    singles = {bytes(token)[0]: i for i, token in enumerate(info.decoded_vocab) if len(bytes(token)) == 1}
    assert matcher.accept_token(singles[0xED])
    assert not matcher.accept_token(singles[0xA0])  # U+D800's second byte
    assert matcher.accept_token(singles[0x9F])  # U+D7FF and below are characters


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (Constraint("json_schema", '{"type": "nonsense"}'), 'Unsupported type "nonsense"'),
        (Constraint("regex", "(?<=a)b"), "Lookbehind is not supported"),
        (Constraint("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
    ],
)
def test_a_constraint_that_does_not_compile_says_why_without_xgrammars_source_lines(compiler, constraint, words):
    with pytest.raises(GrammarError) as raised:
        compiler.compile(constraint)
    assert words in str(raised.value) and ".cc:" not in str(raised.value)
