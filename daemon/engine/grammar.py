"""Constrained decoding: a grammar decides which tokens may come next (xgrammar does the work).

A constraint (a JSON schema, any JSON object, a regex, a choice among strings, an EBNF
grammar) is compiled once against the vocabulary into a CompiledGrammar; compiled grammars
are cached by their spec, so the many requests of one application that share a schema
compile it once. Each constrained sequence then owns a matcher, which walks the grammar
token by token: before a step samples, it fills the sequence's row of a token bitmask (one
bit per vocabulary entry, about 1 us a row), the sampler sets every token the bitmask
forbids to -inf (in its kernel, kernels/sample.c, on the CPU; TokenMasks.apply elsewhere),
and after the step the matcher accepts the token sampled. When the
grammar is complete, only the sequence's stop tokens are allowed (or, without any, the
matcher ends there), and the runner reports the sequence as completed.

Compiling takes milliseconds to seconds (a large schema, a large vocabulary, the first
import), so it is done ahead, on a thread (LazyCompiler.prepare): the worker compiles each
constraint as soon as it is announced, and the scheduler admits the request only once the
worker says it is ready, so no step ever waits for a compilation.

xgrammar is imported on first use: it pulls in transformers, about 2 s, which no process
serving only unconstrained requests should pay.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    import xgrammar

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
# Longest run of whitespace a JSON answer may hold between tokens: a model that would fill its
# answer with blank lines (a weak or random one can) must move on; pretty-printed JSON never
# needs more.
MAX_JSON_WHITESPACE = 16
COMPILER_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars kept, by their spec
# the character classes xgrammar writes for a JSON string's characters (with a length bound, without)
_STRING_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\uD800-\uDFFF]"
_LOCATION = re.compile(r"^\[[\d:]+\] \S+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The constraint cannot be compiled: its text says why, for the client."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec`: the JSON schema as JSON text, the regex, the EBNF
    grammar, or the choices as a JSON array of strings; empty for json_object."""

    kind: ConstraintKind
    spec: str = ""
    compact: bool = False  # JSON: no whitespace but the single spaces of ", " and ": "
    # a reasoning model's style (model.reasoning_parser): the constraint starts after its thinking
    thinking: Literal["qwen3", "deepseek_r1"] | None = None


class GrammarCompiler:
    """Compiles constraints for one vocabulary, caching them by spec; thread-safe, as xgrammar's is."""

    def __init__(self, vocabulary: list[str], tokenizer_json: str, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        # xgrammar reads from the tokenizer's description how its vocabulary spells bytes (byte-level
        # BPE, byte fallback, raw); it has no public way to do so without a transformers tokenizer.
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        padded = vocabulary + [""] * (vocab_size - len(vocabulary))  # the logits may be wider than the vocabulary
        self.info = xgr.TokenizerInfo(
            padded,
            vocab_type=metadata["vocab_type"],
            vocab_size=vocab_size,
            stop_token_ids=stop_token_ids,
            add_prefix_space=metadata["add_prefix_space"],
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_limit_bytes=COMPILER_CACHE_BYTES)

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        import xgrammar as xgr

        try:
            grammar = constraint_grammar(constraint)
            if constraint.thinking is not None:
                return self._compiler.compile_grammar(
                    xgr.Grammar.from_structural_tag(after_thinking(constraint, grammar))
                )
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors, with the file and line they came from
            raise GrammarError(_LOCATION.sub("", str(exc).strip())) from None


def constraint_grammar(constraint: Constraint) -> str:
    """The constraint as EBNF (raises RuntimeError as xgrammar's compiling does)."""
    import xgrammar as xgr

    match constraint.kind:
        case "json_schema":
            return json_grammar(constraint.spec, strict=True, compact=constraint.compact)
        case "json_object":  # any object (xgrammar's built-in JSON grammar allows any value)
            return json_grammar('{"type": "object"}', strict=False, compact=constraint.compact)
        case "regex":
            return str(xgr.Grammar.from_regex(constraint.spec))
        case "choice":
            return choice_grammar(json.loads(constraint.spec))
        case "grammar":
            return constraint.spec
        case "structural_tag":  # xgrammar's own format, as JSON text
            return _json_strings(str(xgr.Grammar.from_structural_tag(constraint.spec)))
    raise GrammarError(f"unknown constraint kind {constraint.kind!r}")


def after_thinking(constraint: Constraint, grammar: str) -> str:
    """An xgrammar structural tag: the model's thinking, free text up to its end marker, then
    `grammar`. qwen3: the answer may open <think> itself, or not think at all; deepseek_r1:
    the prompt opened it, so the answer thinks first."""
    think = {"type": "tag", "content": {"type": "any_text"}, "end": "</think>"}
    body = {"type": "grammar", "grammar": grammar}
    spacing = {"type": "regex", "pattern": "[ \\n]*"}  # "</think>\n\n" is how they go on
    if constraint.thinking == "deepseek_r1":
        shape: dict[str, Any] = {"type": "sequence", "elements": [{**think, "begin": ""}, spacing, body]}
    else:
        thought = {"type": "sequence", "elements": [{**think, "begin": "<think>"}, spacing, body]}
        shape = {"type": "or", "elements": [thought, body]}
    return json.dumps({"type": "structural_tag", "format": shape})


@functools.lru_cache(maxsize=256)
def json_grammar(schema: str, *, strict: bool, compact: bool = False) -> str:
    """EBNF for JSON valid against `schema`. `strict`: no properties or items beyond those it
    names (as OpenAI's strict: true). Raises RuntimeError as compiling does."""
    import xgrammar as xgr

    spacing: dict[str, Any] = {"any_whitespace": False} if compact else {"max_whitespace_cnt": MAX_JSON_WHITESPACE}
    grammar = str(xgr.Grammar.from_json_schema(schema, strict_mode=strict, **spacing))
    return _json_strings(grammar)


def _json_strings(grammar: str) -> str:
    """`grammar` with its JSON strings' characters as JSON has them. xgrammar lets a string's
    characters be control characters (where it bounds its length), which JSON forbids unescaped,
    and UTF-16 surrogates, which UTF-8 cannot hold: a model that picks byte tokens at random
    writes both, and json.loads and pydantic refuse such an answer."""
    for chars in _STRING_CHARS:
        grammar = grammar.replace(chars, _JSON_STRING_CHAR)
    return grammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of `choices` (each a literal: JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def compiler_for_tokenizer(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
    """A compiler for a `tokenizers.Tokenizer` whose model has `vocab_size` logits."""
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    vocabulary = [by_id.get(i, "") for i in range(max(by_id, default=-1) + 1)]
    return GrammarCompiler(vocabulary, tokenizer.to_str(), max(vocab_size, len(vocabulary)), stop_token_ids)


def compiler_for_dir(tokenizer_dir: Path, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return compiler_for_tokenizer(tokenizer, vocab_size, stop_token_ids)


def eos_token_ids(model_dir: Path) -> list[int]:
    """The end-of-sequence ids the model's configs name (xgrammar's default stop tokens)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return sorted(ids)


class LazyCompiler:
    """A GrammarCompiler made on a thread of its own, with constraints compiled there ahead of
    use (`prepare`): the import of xgrammar, the vocabulary's preprocessing and a new grammar's
    compilation are done while the request is still on its way, not in the step that needs them."""

    def __init__(self, make: Callable[[], GrammarCompiler]):
        self._make = make
        self._built: Future[GrammarCompiler] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-compiler")
        self._lock = threading.Lock()

    def warm(self) -> Future[GrammarCompiler]:
        with self._lock:
            if self._built is None:
                self._built = self._thread.submit(self._make)
            return self._built

    def prepare(self, constraint: Constraint, then: Callable[[], None] = lambda: None) -> None:
        """Compile `constraint` on the thread (into the compiler's cache), then call `then` there,
        whether it compiled or not: its errors wait for the step that starts its matcher."""
        built = self.warm()

        def compile_ahead() -> None:
            with contextlib.suppress(Exception):
                built.result().compile(constraint)
            then()

        self._thread.submit(compile_ahead)

    def get(self) -> GrammarCompiler:
        try:
            return self.warm().result()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the request says it
            raise GrammarError(f"constrained decoding is unavailable: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class TokenMasks:
    """A step's grammar bitmasks (xgrammar's layout: one bit a token, set where allowed), by batch
    row; only the `rows` listed are filled."""

    bitmask: torch.Tensor  # [batch, vocab / 32 rounded up] int32
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set to -inf in `logits` [batch, vocab] what the masks do not allow (the sampler's own
        kernel does this itself, faster: kernels.sample_rows)."""
        import xgrammar as xgr

        if self.rows:
            bitmask = self.bitmask.to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=self.rows)


class Matchers:
    """The matchers of the constrained sequences of a runner, by sequence id."""

    def __init__(self, compiler: LazyCompiler):
        self._compiler = compiler
        self._matchers: dict[int, Any] = {}
        self._bitmask: torch.Tensor | None = None

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def start(self, seq_id: int, constraint: Constraint, stop_token_ids: tuple[int, ...]) -> None:
        """A matcher for a sequence at its start (a sequence readmitted after a preemption keeps its own)."""
        if seq_id in self._matchers:
            return
        import xgrammar as xgr

        compiled = self._compiler.get().compile(constraint)
        # The request's stop tokens (end-of-sequence among them) end the grammar; with none (ignore_eos),
        # the grammar ends the sequence itself when it is complete.
        self._matchers[seq_id] = xgr.GrammarMatcher(
            compiled,
            override_stop_tokens=list(stop_token_ids) or None,
            terminate_without_stop_token=not stop_token_ids,
        )

    def bitmasks(self, batch: int, vocab: int, rows: list[int], seq_ids: list[int]) -> TokenMasks:
        """The token bitmasks of a step of `batch` rows: row rows[i] that of seq_ids[i]'s grammar."""
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < batch or self._bitmask.shape[1] != (vocab + 31) // 32:
            self._bitmask = xgr.allocate_token_bitmask(max(batch, 8), vocab)
        live = []
        for row, seq_id in zip(rows, seq_ids, strict=True):
            matcher = self._matchers[seq_id]
            if not matcher.is_terminated():  # ended: the scheduler drops this row's token
                matcher.fill_next_token_bitmask(self._bitmask, row)
                live.append(row)
        return TokenMasks(self._bitmask[:batch], live)

    def accept(self, seq_id: int, token: int) -> bool:
        """Advance the sequence's matcher by `token`; True when the grammar is then complete.
        A token the grammar does not allow (a bug: the mask forbade it) raises GrammarError."""
        matcher = self._matchers[seq_id]
        if matcher.is_terminated():
            return True
        if not matcher.accept_token(token):
            raise GrammarError(f"the grammar does not allow token {token} here")
        return matcher.is_terminated()

    def release(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)

    def clear(self) -> None:
        self._matchers.clear()
