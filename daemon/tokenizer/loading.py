"""A model's text tokenizer, read from the local files of its Hugging Face directory.

Only fast tokenizers (tokenizer.json) are supported, through the `tokenizers`
library: no transformers, no network. The rest of what serving needs comes from
the JSON files beside it: the special tokens and chat template from
tokenizer_config.json (or chat_template.jinja), the ids that end generation from
generation_config.json and config.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from daemon.ipc.messages import ChatOptions
from daemon.tokenizer.bounds import bytes_per_token
from daemon.tokenizer.chat import ChatTemplate, TokenizerError
from daemon.tokenizer.detokenize import IncrementalDetokenizer

__all__ = ["PromptText", "TextTokenizer", "TokenizerError", "load_text_tokenizer", "read_json_object"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Newer transformers saves the template beside tokenizer_config.json; it then wins over the config's.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
SENTENCEPIECE_SPACE = "\u2581"  # how a SentencePiece piece marks the space before a word
# The special tokens transformers names for every tokenizer, by their tokenizer_config.json keys. A config
# may name more (Gemma 3's boi_token and image_token): by any other key ending in _token, or in an
# extra_special_tokens object. A chat template sees each one the config sets.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class PromptText:
    """A prompt's text just before tokenizing, and how its ids begin.

    Rendering is cheap and tokenizing is not: the service looks at the text (its
    length) before it decides where and whether to tokenize it."""

    text: str
    add_special_tokens: bool
    chat: bool = False  # a rendered conversation: its template writes the BOS, if any


class TextTokenizer:
    """Text to token ids and back, plus the chat template, for one model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        eos_token_ids: Iterable[int],
        adds_bos: bool | None = None,
        chat_template: ChatTemplate | None,
        no_template_reason: str = "",
        bytes_per_token: int | None = None,
    ):
        self._tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token_texts, by id (at most the vocabulary)
        self.bos_token = special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_ids = frozenset(eos_token_ids)
        self._post_processor_adds_bos = self._starts_with_bos(tokenizer.encode("", add_special_tokens=True).ids)
        # Whether a plain prompt starts with BOS: tokenizer_config.json's add_bos_token when set
        # (it overrides the post-processor, as in transformers), else what the post-processor does.
        self.adds_bos = (
            self._post_processor_adds_bos if adds_bos is None else (adds_bos and self.bos_token_id is not None)
        )
        self.chat_template = chat_template
        self._no_template_reason = no_template_reason
        # The most bytes of prompt one token covers (daemon.tokenizer.bounds); None: not known.
        self.bytes_per_token = bytes_per_token

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; with special tokens, as a plain prompt: BOS first exactly when `adds_bos`."""
        return self.tokenize(PromptText(text, add_special_tokens))

    def tokenize(self, prompt: PromptText) -> list[int]:
        """Token ids of a plain prompt or a rendered conversation. Safe to call from another thread,
        and the interpreter runs other threads meanwhile: encode_batch lets go of the GIL while
        the Rust side works (encode holds it throughout), with the same ids as encode."""
        ids = self._tokenizer.encode_batch([prompt.text], add_special_tokens=prompt.add_special_tokens)[0].ids
        if prompt.chat:  # exactly one BOS: the template's own, else the one a plain prompt gets
            return [self.bos_token_id, *ids] if self.adds_bos and not self._starts_with_bos(ids) else ids
        if not prompt.add_special_tokens or self.adds_bos == self._post_processor_adds_bos:
            return ids
        if self.adds_bos:
            return [self.bos_token_id, *ids]
        return ids[1:] if self._starts_with_bos(ids) else ids

    def max_prompt_bytes(self, tokens: int) -> int | None:
        """The longest prompt, in UTF-8 bytes, that may have at most `tokens` tokens: any longer one
        certainly has more. None when this tokenizer gives no such bound."""
        return None if self.bytes_per_token is None else tokens * self.bytes_per_token

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(self, prompt_ids: Sequence[int], skip_special_tokens: bool) -> IncrementalDetokenizer:
        """A detokenizer for one request's generated ids, the prompt's last ids as their context."""
        return IncrementalDetokenizer(self._tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id's string in the vocabulary, as stored (byte-level BPE shows a space as 'Ġ'):
        what transformers' convert_ids_to_tokens gives, and vLLM's /tokenize returns."""
        return [self._tokenizer.id_to_token(i) or "" for i in ids]

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """Each id decoded alone, special tokens included: what vLLM shows as a logprob's token.
        A SentencePiece piece that begins a word keeps its leading space, which decoding it
        alone drops."""
        return [self.token_text(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """token_texts of one id."""
        text = self._token_texts.get(token_id)
        if text is None:  # each id decoded once: logprobs show the same ids step after step
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self._tokenizer.id_to_token(token_id) or ""
            if piece.startswith(SENTENCEPIECE_SPACE) and not text.startswith(" "):
                text = " " + text
            self._token_texts[token_id] = text
        return text

    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise TokenizerError(self._no_template_reason)
        return self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs
        )

    def render_chat_prompt(self, messages: Any, options: ChatOptions | None = None) -> list[int]:
        """Token ids of the conversation, ready for the assistant's reply, with exactly one BOS if any."""
        return self.tokenize(self.chat_prompt_text(messages, options))

    def chat_prompt_text(self, messages: Any, options: ChatOptions | None = None) -> PromptText:
        """The conversation rendered by the chat template, ready for the assistant's reply.

        Most templates write the BOS themselves: the text is then tokenized without
        special tokens, or the prompt would start with two. A template that writes none
        gets the BOS a plain prompt would. With `continue_final_message`, the prompt ends
        where the last message's content ends, so the model continues it (what the
        template appends after a finished turn, such as an end-of-turn token, is cut).
        """
        options = options or ChatOptions()
        if options.continue_final_message and options.add_generation_prompt:
            raise TokenizerError(
                "continue_final_message and add_generation_prompt cannot both be true: "
                "set add_generation_prompt to false to continue the final message"
            )
        template_kwargs = options.template_kwargs
        if options.tools is not None:  # as transformers passes them: a `tools` variable
            template_kwargs = {**template_kwargs, "tools": options.tools}
        text = self.apply_chat_template(
            messages, add_generation_prompt=options.add_generation_prompt, template_kwargs=template_kwargs
        )
        if options.continue_final_message:
            text = _cut_after_final_message(text, messages)
        return PromptText(text, options.add_special_tokens, chat=True)

    def _starts_with_bos(self, ids: list[int]) -> bool:
        return self.bos_token_id is not None and ids[:1] == [self.bos_token_id]


def _cut_after_final_message(text: str, messages: Any) -> str:
    """`text` up to the end of the last message's content, as transformers' continue_final_message does."""
    content = messages[-1].get("content") if messages and isinstance(messages[-1], Mapping) else None
    if isinstance(content, list):
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    if not isinstance(content, str) or not content.strip():
        raise TokenizerError("continue_final_message needs a final message with text content to continue")
    end = text.rfind(content.strip())
    if end < 0:
        raise TokenizerError("continue_final_message: the chat template does not show the final message's content")
    return text[: end + len(content.strip())]


def load_text_tokenizer(model_dir: Path) -> TextTokenizer:
    model_dir = Path(model_dir)
    tokenizer, description = _read_tokenizer(model_dir / TOKENIZER_FILE)
    config = read_json_object(model_dir / TOKENIZER_CONFIG_FILE)
    special_tokens = _special_tokens(config)
    add_bos = config.get("add_bos_token")
    template_source, origin, no_template_reason = _read_chat_template(model_dir, config)
    return TextTokenizer(
        tokenizer,
        special_tokens=special_tokens,
        eos_token_ids=_eos_token_ids(model_dir, tokenizer, special_tokens.get("eos_token")),
        adds_bos=add_bos if isinstance(add_bos, bool) else None,
        chat_template=ChatTemplate(template_source, origin, special_tokens) if template_source is not None else None,
        no_template_reason=no_template_reason,
        bytes_per_token=bytes_per_token(description),
    )


def _read_tokenizer(path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer, and its description as parsed JSON (what it is made of)."""
    if not path.is_file():
        raise TokenizerError(f"{path} does not exist: the model directory needs a fast tokenizer ({TOKENIZER_FILE})")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for every kind of bad file
        raise TokenizerError(f"{path} is not a valid tokenizer file: {exc}") from None
    # As the library saw it (defaults filled in), not as written: the file may be in an older format.
    return tokenizer, json.loads(tokenizer.to_str())


def read_json_object(path: Path) -> dict[str, Any]:
    """The object in the JSON file at `path`; {} when there is no such file, as all of these are optional."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens tokenizer_config.json sets, by name, as transformers gives them to a chat
    template: one the config leaves out or sets to null is not given (undefined there, not None)."""
    tokens = {key: _token_content(config.get(key), key) for key in NAMED_SPECIAL_TOKENS}
    more = {key: value for key, value in config.items() if key.endswith("_token") and key not in tokens}
    if isinstance(config.get("extra_special_tokens"), dict):
        more.update(config["extra_special_tokens"])
    for key, value in more.items():  # only tokens: a string or {"content": ...}; other settings are no business here
        if isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str)):
            tokens[key] = _token_content(value, key)
    return {key: token for key, token in tokens.items() if token is not None}


def _token_content(value: Any, key: str) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f'{TOKENIZER_CONFIG_FILE}: {key} must be a string or {{"content": ...}}, not {value!r}')


def _read_chat_template(model_dir: Path, config: dict[str, Any]) -> tuple[str | None, str, str]:
    """(template source or None, the file it came from, why there is none)."""
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8"), CHAT_TEMPLATE_FILE, ""
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read {template_file}: {exc}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the unnamed use is "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            names = ", ".join(sorted(str(name) for name in named)) or "none"
            reason = f"{model_dir / TOKENIZER_CONFIG_FILE} names chat templates ({names}) but none is 'default'"
            return None, TOKENIZER_CONFIG_FILE, reason
        template = named["default"]
    if template is None:
        reason = (
            f"the model has no chat template: neither {model_dir / TOKENIZER_CONFIG_FILE} nor "
            f"{template_file} defines one, so it cannot serve chat requests"
        )
        return None, TOKENIZER_CONFIG_FILE, reason
    if not isinstance(template, str):
        raise TokenizerError(f"{model_dir / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a named list")
    return template, TOKENIZER_CONFIG_FILE, ""


def _eos_token_ids(model_dir: Path, tokenizer: Tokenizer, eos_token: str | None) -> set[int]:
    """Every id that ends generation: the configs may list several (end of turn, end of text)."""
    ids: set[int] = set()
    for name in (GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE):
        value = read_json_object(model_dir / name).get("eos_token_id")
        values = value if isinstance(value, list) else [] if value is None else [value]
        for item in values:
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                raise TokenizerError(f"{model_dir / name}: eos_token_id must be an id or a list of ids, not {value!r}")
            ids.add(item)
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is not None:
            ids.add(eos_id)
    return ids
