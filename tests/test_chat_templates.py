"""Chat templates in the style of each family the engine serves render exactly as transformers renders them.

Each template below is written here (none is copied from a model repository) with the Jinja
features its family's real template uses. A tokenizer directory is written per family
(tokenizer.json, and tokenizer_config.json with the template and special tokens); the same
conversation goes through our TextTokenizer and through transformers' AutoTokenizer, and the
prompt text and ids must be identical. Templates that refuse a conversation must refuse it
with their own words, in the tokenizer and as a 400 from a real daemon.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import jinja2
import pytest
from harness.daemons import RunningDaemon, serving
from harness.tokenizer_files import sentencepiece_tokenizer
from tokenizers import AddedToken, Tokenizer, processors
from transformers import AutoTokenizer

from daemon.engine.demo_model import BOS as DEMO_BOS
from daemon.engine.demo_model import ensure_demo_model
from daemon.ipc.messages import ChatOptions
from daemon.tokenizer.loading import TextTokenizer, TokenizerError, load_text_tokenizer

# Llama 3.x style: BOS from the special tokens; `is defined` overrides (custom_tools, date_string);
# a "Cutting Knowledge Date" line with strftime_now's date; the system message pulled out of
# messages through a namespace; tools branches that must stay silent when tools is none; content
# trimmed; a tool-call branch entered by `'tool_calls' in message`.
LLAMA3 = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- set ns = namespace(system="") %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for tool in tools %}{{- tool | tojson(indent=4) + "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- ns.system + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("Only one tool call at a time is supported.") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + call.name + '"}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

# Qwen2.5 / Qwen3 style: a default system prompt when none is given; a tools loop with `| tojson`;
# a namespace found by a reversed scan with loop.index0 (the last real user query); `is string`
# tests; assistant reasoning shown in <think> after that query, or split out of the content before
# it; enable_thinking from the template kwargs.
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' + (messages[0].content + '\\n\\n' if messages[0].role == 'system' else '') }}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" + tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a test assistant who answers plainly.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

# Gemma 2/3 style: no system role (the system message folded into the first user turn), raise_exception
# when roles do not alternate, assistant renamed model, `| trim`, content as a string or text parts.
GEMMA_REFUSAL = "Conversation roles must alternate user/assistant/user/assistant/..."
GEMMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("%s") }}
    {%- endif %}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for item in message['content'] %}
            {%- if item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}""".replace("%s", GEMMA_REFUSAL)

# Mistral style: [INST] wrappers, raise_exception when roles do not alternate, the system message
# prepended to the last user message, each answer closed by the EOS from the special tokens.
MISTRAL_REFUSAL = "After the optional system message, roles must alternate between user and assistant"
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('%s') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}""".replace("%s", MISTRAL_REFUSAL)

# Phi-3 style: <|role|> ... <|end|> turns, no BOS in the template (and add_bos_token false), the EOS
# after a finished conversation.
PHI3 = """{%- for message in messages %}
    {%- if message['role'] in ['system', 'user', 'assistant'] %}
        {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"""

SYSTEM = {"role": "system", "content": "  Be brief, the river said.\n"}
USER = {"role": "user", "content": "hello the world, café? 日本 😀"}
ANSWER = {"role": "assistant", "content": " the river walked \n"}
# An assistant turn echoed back by an OpenAI client: the fields it does not use are null.
ECHOED = {**ANSWER, "tool_calls": None, "refusal": None, "name": None}
AGAIN = {"role": "user", "content": "hello again"}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [USER],
    "system": [SYSTEM, USER],
    "turns": [SYSTEM, USER, ANSWER, AGAIN],
    "echoed": [USER, ECHOED, AGAIN],
    "think-in-history": [USER, {"role": "assistant", "content": "<think>\nplan\n</think>\n\nthe river"}, AGAIN],
    "reasoning-field": [USER, {"role": "assistant", "content": "the river", "reasoning": "plan"}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": " hello "}, {"type": "text", "text": "world"}]}],
}


class Family(NamedTuple):
    template: str
    layout: str  # "byte-level" (the demo's tokenizer) or a SentencePiece layout (harness.tokenizer_files)
    tokens: str  # the chat format's special tokens, added to the vocabulary (the demo has <|im_start|>, <|im_end|>)
    bos: str | None  # tokenizer_config.json's bos_token, which the post-processor also puts before a plain prompt
    eos: str
    config: dict[str, Any] = {}  # the rest of tokenizer_config.json


FAMILIES = {
    "llama3": Family(LLAMA3, "byte-level", "<|start_header_id|> <|end_header_id|> <|eot_id|>", DEMO_BOS, "<|eot_id|>"),
    "qwen": Family(
        QWEN, "byte-level", "<|endoftext|> <think> </think>", None, "<|im_end|>", {"pad_token": "<|endoftext|>"}
    ),
    "gemma": Family(GEMMA, "metaspace", "<bos> <eos> <start_of_turn> <end_of_turn>", "<bos>", "<eos>"),
    "mistral": Family(MISTRAL, "llama2", "[INST] [/INST]", "<s>", "</s>", {"unk_token": "<unk>"}),
    "phi3": Family(
        PHI3,
        "llama2",
        "<|endoftext|> <|system|> <|user|> <|assistant|> <|end|>",
        "<s>",
        "<|endoftext|>",
        {"add_bos_token": False},
    ),
}
# Text parts given to a template that takes content only as a string are joined first (as vLLM does), where
# transformers hands the list over as it is: only a template that loops over the parts renders them alike.
CASES = [(family, case) for family in FAMILIES for case in CONVERSATIONS if case != "parts"] + [("gemma", "parts")]


def write_family(root: Path, demo_dir: Path, family: Family) -> Path:
    root.mkdir()
    if family.layout == "byte-level":
        tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))  # its post-processor adds the demo's BOS
        tokenizer.add_special_tokens([AddedToken(token, special=True) for token in family.tokens.split()])
        if family.bos is None:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer = sentencepiece_tokenizer(family.layout, family.tokens.split())
        special = [(family.bos, tokenizer.token_to_id(family.bos))]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", special_tokens=special)
    tokenizer.save(str(root / "tokenizer.json"))
    config = {"bos_token": family.bos, "eos_token": family.eos, **family.config, "chat_template": family.template}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def demo_dir(model_cache: Path) -> Path:
    return ensure_demo_model(model_cache)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> dict[str, tuple[TextTokenizer, Any]]:
    """Each family's directory, loaded by us and by transformers."""
    both = {}
    for family in FAMILIES:
        directory = write_family(tmp_path_factory.mktemp("families") / family, demo_dir, FAMILIES[family])
        both[family] = (load_text_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory)))
    return both


# How the prompt ends: opening the assistant's turn, after a finished conversation, or with thinking
# turned off through the template kwargs (Qwen3's enable_thinking; the other families ignore it).
ENDINGS = {
    "prompt": ChatOptions(),
    "finished": ChatOptions(add_generation_prompt=False),
    "no-thinking": ChatOptions(template_kwargs={"enable_thinking": False}),
}


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize(("family", "case"), CASES)
def test_renders_and_tokenizes_as_transformers(
    loaded: dict[str, tuple[TextTokenizer, Any]], family: str, case: str, ending: str
) -> None:
    (ours, theirs), messages, options = loaded[family], CONVERSATIONS[case], ENDINGS[ending]
    asked = {"add_generation_prompt": options.add_generation_prompt, **options.template_kwargs}
    text = theirs.apply_chat_template(messages, tokenize=False, **asked)
    assert ours.chat_prompt_text(messages, options).text == text
    ids = ours.render_chat_prompt(messages, options)
    assert ids == theirs.apply_chat_template(messages, return_dict=False, **asked)
    if theirs.bos_token_id is not None:  # one BOS where the template writes it; none added by the tokenizer
        assert ids.count(theirs.bos_token_id) == ("bos_token" in FAMILIES[family].template)
    assert text.endswith("<think>\n\n</think>\n\n") == (family == "qwen" and ending == "no-thinking")


def test_the_special_tokens_a_template_sees(tmp_path: Path, demo_dir: Path) -> None:
    # A null bos_token as in Qwen's config, an AddedToken object as in Llama 2's, image markers named
    # as in Gemma 3's (a key of their own, or in extra_special_tokens), a setting that is not a token.
    template = "{{ bos_token }}|{{ bos_token is defined }}|{{ eos_token }}|{{ boi_token }}|{{ image_token }}|"
    template += "{{ add_bos_token is defined }}|{{ sep_token is defined }}|{{ messages | length }}"
    config = {
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": DEMO_BOS, "lstrip": False, "special": True},
        "boi_token": "<start_of_image>",
        "extra_special_tokens": {"image_token": "<image_soft_token>"},
        "add_bos_token": False,
        "chat_template": template,
    }
    (directory := tmp_path / "tokens").mkdir()
    shutil.copy(demo_dir / "tokenizer.json", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template([USER], tokenize=False)
    assert load_text_tokenizer(directory).apply_chat_template([USER], add_generation_prompt=False) == theirs
    assert theirs == f"|False|{DEMO_BOS}|<start_of_image>|<image_soft_token>|False|False|1"


@pytest.mark.parametrize(
    ("family", "messages", "refusal"),
    [
        ("gemma", [SYSTEM, ANSWER, USER], GEMMA_REFUSAL),
        ("gemma", [USER, AGAIN], GEMMA_REFUSAL),
        ("mistral", [USER, AGAIN], MISTRAL_REFUSAL),
        ("mistral", [SYSTEM, ANSWER], MISTRAL_REFUSAL),
    ],
)
def test_refusals_name_the_templates_message(
    loaded: dict[str, tuple[TextTokenizer, Any]], family: str, messages: list[dict[str, Any]], refusal: str
) -> None:
    ours, theirs = loaded[family]
    with pytest.raises(jinja2.TemplateError, match=re.escape(refusal)):
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match=f"rejected the messages: {re.escape(refusal)}$"):
        ours.render_chat_prompt(messages)


# --- through the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The demo model with the Gemma-style template in its tokenizer_config.json."""
    model = tmp_path_factory.mktemp("model") / "gemma-style"
    shutil.copytree(demo_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA}))
    return model


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, gemma_model: Path) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, {"model.path": str(gemma_model)}) as running:
        yield running


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("messages", [[SYSTEM, ANSWER], [USER, AGAIN]], ids=["system-then-assistant", "two-users"])
def test_a_refused_conversation_is_a_400_in_the_templates_words(
    daemon: RunningDaemon, path: str, messages: list[dict[str, Any]]
) -> None:
    body = {"messages": messages, **({"max_tokens": 2} if path.startswith("/v1") else {})}
    response = httpx.post(f"{daemon.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert GEMMA_REFUSAL in response.json()["error"]["message"]


def test_the_daemon_tokenizes_a_conversation_as_transformers(daemon: RunningDaemon, gemma_model: Path) -> None:
    messages = CONVERSATIONS["turns"]
    response = httpx.post(f"{daemon.url}/tokenize", json={"messages": messages}, timeout=60)
    assert response.status_code == 200, response.text
    theirs = AutoTokenizer.from_pretrained(str(gemma_model))
    assert response.json()["tokens"] == theirs.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
