"""daemon.tokenizer: loading a model's text tokenizer, chat templates, stop strings (incremental
detokenizing is tested in test_detokenize.py).

Everything runs on real files: the demo model's tokenizer, and tokenizer directories
written here for templates the demo model does not have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors

from daemon.engine.demo_model import BOS, EOS, IM_END, IM_START, ensure_demo_model
from daemon.ipc.messages import ChatOptions
from daemon.tokenizer.detokenize import StopStrings
from daemon.tokenizer.loading import TextTokenizer, TokenizerError, load_text_tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello, café?"},
]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo(demo_dir: Path) -> TextTokenizer:
    return load_text_tokenizer(demo_dir)


@pytest.fixture(scope="session")
def ids_of(demo_dir: Path) -> dict[str, int]:
    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    return {token: raw.token_to_id(token) for token in (BOS, EOS, IM_START, IM_END)}


def tokenizer_dir(
    root: Path, demo_dir: Path, config: dict[str, Any], *, adds_bos: bool = True, files: dict[str, str] | None = None
) -> Path:
    """A tokenizer directory: the demo's vocabulary, with or without its BOS post-processor, and `config`."""
    root.mkdir()
    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    if not adds_bos:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    return root


# --- encoding and decoding ------------------------------------------------------------------------


def test_plain_prompts_start_with_bos_and_round_trip(demo: TextTokenizer, ids_of: dict[str, int]) -> None:
    text = "The river walked quietly, 1850. Naïve 😀 日本語 e\u0301!"
    with_bos = demo.encode(text, add_special_tokens=True)
    without = demo.encode(text, add_special_tokens=False)
    assert with_bos == [ids_of[BOS], *without]
    assert demo.adds_bos and demo.bos_token_id == ids_of[BOS]
    assert demo.decode(with_bos) == text
    assert demo.decode(with_bos, skip_special_tokens=False) == BOS + text
    assert demo.vocab_size == 1024


def test_eos_ids_join_the_configs_and_the_tokenizer(demo: TextTokenizer, ids_of: dict[str, int]) -> None:
    # generation_config.json lists end of turn and end of text; tokenizer_config.json's eos is end of turn.
    assert demo.eos_token_ids == frozenset({ids_of[IM_END], ids_of[EOS]})


def test_eos_ids_from_the_token_alone(tmp_path: Path, demo_dir: Path, ids_of: dict[str, int]) -> None:
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"eos_token": {"content": EOS}}))
    assert loaded.eos_token_ids == frozenset({ids_of[EOS]})


def test_add_bos_token_false_overrides_the_post_processor(
    tmp_path: Path, demo_dir: Path, ids_of: dict[str, int]
) -> None:
    config = {"bos_token": BOS, "add_bos_token": False, "chat_template": CHATML}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config))
    assert not loaded.adds_bos
    assert loaded.encode("Hello", add_special_tokens=True) == loaded.encode("Hello", add_special_tokens=False)
    assert ids_of[BOS] not in loaded.render_chat_prompt(CONVERSATION)


def test_add_bos_token_true_adds_what_the_post_processor_does_not(
    tmp_path: Path, demo_dir: Path, ids_of: dict[str, int]
) -> None:
    config = {"bos_token": BOS, "add_bos_token": True}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config, adds_bos=False))
    assert loaded.encode("Hello", add_special_tokens=True)[0] == ids_of[BOS]


# --- chat templates -------------------------------------------------------------------------------


def test_demo_chat_renders_exactly(demo: TextTokenizer) -> None:
    expected = (
        "<|begin_of_text|><|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHello, café?<|im_end|>\n"
    )
    assert demo.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected
    assert demo.apply_chat_template(CONVERSATION) == expected + "<|im_start|>assistant\n"


def test_text_parts_render_as_their_text(demo: TextTokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "café?"}]}]
    assert demo.apply_chat_template(parts) == demo.apply_chat_template(CONVERSATION[1:])


def test_string_only_templates_get_parts_joined(tmp_path: Path, demo_dir: Path) -> None:
    # This template concatenates content, so it cannot take a list: it gets the texts joined by newlines.
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"chat_template": CHATML}))
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert loaded.apply_chat_template(parts) == "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n"


def test_demo_chat_has_one_bos(demo: TextTokenizer, ids_of: dict[str, int]) -> None:
    ids = demo.render_chat_prompt(CONVERSATION)
    assert ids[:2] == [ids_of[BOS], ids_of[IM_START]]
    assert ids.count(ids_of[BOS]) == 1
    assert ids == demo.encode(demo.apply_chat_template(CONVERSATION), add_special_tokens=False)
    assert demo.decode(ids, skip_special_tokens=False) == demo.apply_chat_template(CONVERSATION)


def test_template_without_bos_gets_the_tokenizers_bos(tmp_path: Path, demo_dir: Path, ids_of: dict[str, int]) -> None:
    config = {"bos_token": {"content": BOS, "special": True}, "eos_token": IM_END, "chat_template": CHATML}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config))
    ids = loaded.render_chat_prompt(CONVERSATION)
    assert ids[:2] == [ids_of[BOS], ids_of[IM_START]]
    assert ids.count(ids_of[BOS]) == 1


def test_template_and_tokenizer_without_bos(tmp_path: Path, demo_dir: Path, ids_of: dict[str, int]) -> None:
    # As Qwen: no BOS token at all, and a template that writes none.
    config = {"bos_token": None, "eos_token": {"content": IM_END}, "chat_template": CHATML}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config, adds_bos=False))
    ids = loaded.render_chat_prompt(CONVERSATION)
    assert ids[0] == ids_of[IM_START]
    assert ids_of[BOS] not in ids
    assert loaded.encode("Hi", add_special_tokens=True) == loaded.encode("Hi", add_special_tokens=False)
    assert loaded.eos_token_ids == frozenset({ids_of[IM_END]})


def test_named_templates_use_default(tmp_path: Path, demo_dir: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain {{ messages|length }}"}]
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"chat_template": named}))
    assert loaded.apply_chat_template(CONVERSATION) == "plain 2"


def test_chat_template_file_wins_over_the_config(tmp_path: Path, demo_dir: Path) -> None:
    files = {"chat_template.jinja": "from the file"}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"chat_template": CHATML}, files=files))
    assert loaded.apply_chat_template(CONVERSATION) == "from the file"


def test_template_helpers_of_transformers(tmp_path: Path, demo_dir: Path) -> None:
    template = (
        "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}|{{ tools is none }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}"
    )
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"bos_token": BOS, "chat_template": template}))
    rendered = loaded.apply_chat_template([{"role": "user", "content": "café <b>"}])
    assert rendered == '{"role": "user", "content": "café <b>"}|4|<|begin_of_text|>|True|user'


def test_template_kwargs_reach_the_template_but_not_the_messages(tmp_path: Path, demo_dir: Path) -> None:
    config = {"chat_template": "{{ enable_thinking }} {{ messages|length }}"}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config))
    rendered = loaded.apply_chat_template(CONVERSATION, template_kwargs={"enable_thinking": False, "messages": []})
    assert rendered == "False 2"


# --- errors ---------------------------------------------------------------------------------------


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json does not exist"):
        load_text_tokenizer(tmp_path)


def test_invalid_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not a valid tokenizer file"):
        load_text_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "config.json"])
def test_invalid_json_names_the_file(tmp_path: Path, demo_dir: Path, name: str) -> None:
    directory = tokenizer_dir(tmp_path / "t", demo_dir, {})
    (directory / name).write_text('{"eos_token": ')
    with pytest.raises(TokenizerError, match=rf"{name} is not valid JSON"):
        load_text_tokenizer(directory)


def test_bad_eos_id_names_the_file(tmp_path: Path, demo_dir: Path) -> None:
    directory = tokenizer_dir(tmp_path / "t", demo_dir, {})
    (directory / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id"):
        load_text_tokenizer(directory)


def test_no_chat_template_fails_chat_only(tmp_path: Path, demo_dir: Path) -> None:
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"bos_token": BOS}))
    assert loaded.encode("Hi", add_special_tokens=False)  # plain completions still work
    with pytest.raises(TokenizerError, match="no chat template.*tokenizer_config.json"):
        loaded.render_chat_prompt(CONVERSATION)


def test_named_templates_without_default(tmp_path: Path, demo_dir: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "x"}]}
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, config))
    with pytest.raises(TokenizerError, match=r"names chat templates \(tool_use\) but none is 'default'"):
        loaded.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "rejected the messages: Conversation roles"),
        ("line one\n{% for m in messages %}{{ m.role }", "syntax error at line 2"),
        ("{{ messages.append(1) }}", "failed: .*unsafe"),
        ("{{ 'a' + messages }}", "failed: TypeError"),
        ("{% set ns = namespace() %}{% set ns._hidden = 1 %}", "failed: .*cannot store '_hidden'"),
        ("{{ namespace(__class__=1) }}", "failed: .*cannot store '__class__'"),
    ],
)
def test_template_failures(tmp_path: Path, demo_dir: Path, template: str, message: str) -> None:
    loaded = load_text_tokenizer(tokenizer_dir(tmp_path / "t", demo_dir, {"chat_template": template}))
    with pytest.raises(TokenizerError, match=message):
        loaded.apply_chat_template(CONVERSATION)


GOOD = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([GOOD, "hi"], "message 1 must be an object"),
        ([GOOD, {"content": "hi"}], "message 1: role must be a non-empty string"),
        ([GOOD, {"role": "", "content": "hi"}], "message 1: role must be a non-empty string"),
        ([GOOD, {"role": 3, "content": "hi"}], "message 1: role must be a non-empty string"),
        ([GOOD, {"role": "user"}], "message 1: content is missing"),
        ([GOOD, {"role": "user", "content": 5}], "message 1: content must be a string or a list of text parts"),
        ([GOOD, {"role": "user", "content": None}], "message 1: content must be .* not null"),
        ([GOOD, {"role": "user", "content": ["hi"]}], "message 1: content part 0 must be an object"),
        (
            [GOOD, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "message 1: content part 0 has type 'image_url'; only text parts",
        ),
        ([GOOD, {"role": "user", "content": [{"type": "text"}]}], "message 1: content part 0 must have a string text"),
    ],
)
def test_bad_messages_name_the_message(demo: TextTokenizer, messages: Any, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        demo.render_chat_prompt(messages)


# --- stop strings ---------------------------------------------------------------------------------


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(cut, len(text)) for cut in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text("abc\n", max_size=40),
    stops=st.lists(st.text("abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
@example(text="xxSTxOPyySTOP", stops=["STOP"], cuts=[3, 10, 11])
def test_stop_strings_cut_at_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    # The stop completed first, the longer of those that end together: as if fed one character at a time.
    found = [(at + len(stop), at) for stop in stops if (at := text.find(stop)) >= 0]
    expected = text[: min(found)[1]] if found else text
    stopper, emitted, stopped, consumed = StopStrings(stops), "", False, ""
    for delta in split(text, cuts):
        out, stopped = stopper.feed(delta)
        emitted += out
        consumed += delta
        assert expected.startswith(emitted)  # never ahead of the truth
        if stopped:
            break
        held = consumed[len(emitted) :]
        assert any(stop.startswith(held) for stop in stops)  # only what may begin a stop is held back
    if not stopped:
        emitted += stopper.flush()
    assert emitted == expected
    assert stopped == bool(found)


@pytest.mark.parametrize("deltas", [["\naa"], ["\na", "a"], ["\n", "a", "a"]])
def test_the_stop_completed_first_wins(deltas: list[str]) -> None:
    # "\naa" starts earlier, but "a" is complete first: generation ends there, however the text is split.
    stopper = StopStrings(["\naa", "a"])
    emitted = ""
    for delta in deltas:
        out, stopped = stopper.feed(delta)
        emitted += out
    assert (emitted, stopped) == ("\n", True)


def test_of_stops_ending_together_the_longer_wins() -> None:
    assert StopStrings(["b", "ab"]).feed("xab") == ("x", True)


def test_after_a_stop_nothing_more_comes() -> None:
    stopper = StopStrings(["\n\n"])
    assert stopper.feed("one\n") == ("one", False)
    assert stopper.feed("\ntwo") == ("", True)
    assert stopper.feed("three") == ("", True)
    assert stopper.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    stopper = StopStrings(["", "END"])
    assert stopper.feed("text E") == ("text ", False)
    assert stopper.feed("NDING") == ("", True)


@pytest.mark.parametrize("deltas", [["text END more"], ["text E", "ND more"], ["te", "xt EN", "D"]])
def test_an_included_stop_ends_the_text_it_is_found_in(deltas: list[str]) -> None:
    stopper, emitted = StopStrings(["END"], include_stop=True), ""
    for delta in deltas:
        out, stopped = stopper.feed(delta)
        emitted += out
    assert (emitted, stopped) == ("text END", True)


# --- chat options --------------------------------------------------------------------------------------


def test_continue_final_message_ends_the_prompt_inside_the_last_message(demo: TextTokenizer) -> None:
    conversation = [*CONVERSATION, {"role": "assistant", "content": "Bonjour, it is"}]
    ids = demo.render_chat_prompt(conversation, ChatOptions(add_generation_prompt=False, continue_final_message=True))
    text = demo.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nBonjour, it is")
    closed = demo.decode(demo.render_chat_prompt(conversation, ChatOptions(add_generation_prompt=False)), False)
    assert closed == text + "<|im_end|>\n"


@pytest.mark.parametrize(
    ("messages", "options", "reason"),
    [
        (CONVERSATION, ChatOptions(continue_final_message=True), "cannot both be true"),
        (
            [{"role": "user", "content": ""}],
            ChatOptions(add_generation_prompt=False, continue_final_message=True),
            "final message with text",
        ),
    ],
)
def test_impossible_chat_options_are_tokenizer_errors(demo: TextTokenizer, messages, options, reason) -> None:
    with pytest.raises(TokenizerError, match=reason):
        demo.render_chat_prompt(messages, options)


def test_generation_prompt_and_special_tokens_are_options(demo: TextTokenizer, ids_of: dict[str, int]) -> None:
    opened = demo.decode(demo.render_chat_prompt(CONVERSATION), skip_special_tokens=False)
    plain = demo.decode(demo.render_chat_prompt(CONVERSATION, ChatOptions(add_generation_prompt=False)), False)
    assert opened == plain + "<|im_start|>assistant\n"
    # the template writes its BOS; asking for the tokenizer's specials too adds its own, as vLLM does
    ids = demo.render_chat_prompt(CONVERSATION, ChatOptions(add_special_tokens=True))
    assert ids[:2] == [ids_of[BOS], ids_of[BOS]] and ids[2:] == demo.render_chat_prompt(CONVERSATION)[1:]
