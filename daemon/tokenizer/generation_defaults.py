"""The sampling defaults a model ships in its generation_config.json, for what requests leave unset.

As vLLM does by default (--generation-config auto): temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens as the default max_tokens, each where the file sets
it; a field the request sets wins. Like vLLM, do_sample is not read: a file with do_sample
false and a temperature samples at that temperature (transformers would be greedy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from daemon.ipc.messages import Sampling
from daemon.tokenizer.loading import GENERATION_CONFIG_FILE, TokenizerError, read_json_object


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DefaultRule:
    """How one generation_config.json key becomes the default of one Sampling field."""

    sampling_field: str
    valid: Callable[[Any], bool]
    expected: str  # what a valid value is, for the error
    convert: Callable[[Any], Any] = lambda value: value


RULES: dict[str, DefaultRule] = {
    "temperature": DefaultRule("temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0", float),
    "top_p": DefaultRule("top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", float),
    # 0 and -1 both mean all tokens, as in requests; Sampling spells it 0
    "top_k": DefaultRule("top_k", lambda v: _is_integer(v) and v >= -1, "an integer >= -1", lambda v: max(v, 0)),
    "min_p": DefaultRule("min_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", float),
    "repetition_penalty": DefaultRule("repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0", float),
    "max_new_tokens": DefaultRule("max_tokens", lambda v: _is_integer(v) and v >= 1, "an integer >= 1"),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's defaults, by Sampling field; empty when it has none."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, sampling: Sampling, unset: Iterable[str]) -> Sampling:
        """`sampling` with the model's default in each of the `unset` fields that has one."""
        changes = {name: self.values[name] for name in unset if name in self.values}
        return msgspec.structs.replace(sampling, **changes) if changes else sampling

    def max_tokens(self, context_left: int) -> int:
        """The default max_tokens: the model's, within what the context leaves after the prompt."""
        return min(self.values.get("max_tokens", context_left), context_left)


def read_sampling_defaults(model_dir: Path) -> SamplingDefaults:
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    config = read_json_object(path)
    values = {}
    for key, rule in RULES.items():
        value = config.get(key)
        if value is None:  # absent, or null: no default, as in vLLM
            continue
        if not rule.valid(value):
            raise TokenizerError(f"{path}: {key} must be {rule.expected}, not {value!r}")
        values[rule.sampling_field] = rule.convert(value)
    return SamplingDefaults(values)
