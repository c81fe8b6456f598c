"""A model's generation_config.json gives the defaults of the sampling fields a request leaves unset.

Read in the tokenizer tier (daemon.tokenizer.generation_defaults), checked first on files,
then through a real daemon serving a copy of the demo model with its own defaults. Every
check there is deterministic: a request with a seed always gives the same tokens, so
"unset" is compared with the same request setting the default's value explicitly, and with
the neutral value, which must give something else (or the comparison would prove nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.daemons import RunningDaemon, serving

from daemon.engine.demo_model import ensure_demo_model
from daemon.ipc.messages import Sampling
from daemon.tokenizer.generation_defaults import SamplingDefaults, read_sampling_defaults
from daemon.tokenizer.loading import TokenizerError

# The served model's defaults: top_k 1 makes any temperature greedy; do_sample false is not read,
# as vLLM does not.
TEMPERATURE, TOP_P, MIN_P, REPETITION_PENALTY, MAX_NEW_TOKENS = 0.3, 0.5, 0.3, 1.5, 5
MODEL_DEFAULTS = {
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "top_k": 1,
    "min_p": MIN_P,
    "repetition_penalty": REPETITION_PENALTY,
    "max_new_tokens": MAX_NEW_TOKENS,
    "do_sample": False,
}
SEEDS = range(4)


def write_generation_config(directory: Path, **fields: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps(fields))
    return directory


# --- reading the file --------------------------------------------------------------------------------


def test_the_files_sampling_fields_become_defaults(tmp_path: Path) -> None:
    defaults = read_sampling_defaults(write_generation_config(tmp_path, **MODEL_DEFAULTS, eos_token_id=[1, 3]))
    assert defaults.values == {
        "temperature": 0.3,
        "top_p": 0.5,
        "top_k": 1,
        "min_p": 0.3,
        "repetition_penalty": 1.5,
        "max_tokens": 5,
    }


def test_no_file_no_nulls_no_defaults(tmp_path: Path) -> None:
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()
    nulls = write_generation_config(tmp_path / "nulls", temperature=None, top_k=None, repetition_penalty=None)
    assert read_sampling_defaults(nulls) == SamplingDefaults()


def test_top_k_of_minus_one_means_all_tokens(tmp_path: Path) -> None:
    assert read_sampling_defaults(write_generation_config(tmp_path, top_k=-1, temperature=0)).values == {
        "top_k": 0,
        "temperature": 0.0,
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", -0.5),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", 2.5),
        ("top_k", -2),
        ("max_new_tokens", 0),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
    ],
)
def test_a_bad_value_is_refused_naming_the_file_and_key(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(TokenizerError, match=rf"generation_config.json: {key} must be"):
        read_sampling_defaults(write_generation_config(tmp_path, **{key: value}))


def test_only_unset_fields_take_the_defaults() -> None:
    defaults = SamplingDefaults({"temperature": 0.6, "top_k": 20, "max_tokens": 100})
    asked = Sampling(max_tokens=8, temperature=0.9, seed=3)
    assert defaults.apply(asked, ("top_p", "top_k")) == Sampling(max_tokens=8, temperature=0.9, top_k=20, seed=3)
    assert defaults.apply(asked, ()) == asked
    assert (defaults.max_tokens(context_left=4000), defaults.max_tokens(context_left=30)) == (100, 30)
    assert SamplingDefaults().max_tokens(context_left=4000) == 4000


# --- through the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    model = tmp_path_factory.mktemp("model") / "tuned"
    shutil.copytree(ensure_demo_model(model_cache), model)
    config = json.loads((model / "generation_config.json").read_text())  # its end-of-sequence ids stay
    (model / "generation_config.json").write_text(json.dumps({**config, **MODEL_DEFAULTS}))
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, {"model.path": str(model)}) as running:
        yield running


def completion(daemon: RunningDaemon, **body: Any) -> str:
    body = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, **body}
    response = httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def completion_tokens(daemon: RunningDaemon, path: str, body: dict[str, Any]) -> int:
    response = httpx.post(f"{daemon.url}{path}", json={"ignore_eos": True, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]


def test_the_tokenizer_reports_the_defaults_it_read(daemon: RunningDaemon) -> None:
    ready = daemon.wait_for_event("tokenizer.ready")
    assert ready["model_defaults"] == {
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "top_k": 1,
        "min_p": MIN_P,
        "repetition_penalty": REPETITION_PENALTY,
        "max_tokens": 5,
    }


def test_unset_top_k_takes_the_models(daemon: RunningDaemon) -> None:
    greedy = completion(daemon, temperature=0)
    assert {completion(daemon, seed=seed) for seed in SEEDS} == {greedy}  # top_k 1: greedy whatever the temperature
    # the model's temperature with every token allowed does leave the greedy path
    assert {completion(daemon, top_k=0, seed=seed) for seed in SEEDS} - {greedy}


def test_unset_temperature_takes_the_models_even_with_do_sample_false(daemon: RunningDaemon) -> None:
    everything = {"top_k": 0, "top_p": 1}
    unset = [completion(daemon, **everything, seed=seed) for seed in SEEDS]
    assert unset == [completion(daemon, **everything, temperature=TEMPERATURE, seed=seed) for seed in SEEDS]
    assert unset != [completion(daemon, **everything, temperature=1, seed=seed) for seed in SEEDS]
    assert set(unset) - {completion(daemon, temperature=0)}  # sampled: do_sample false did not make it greedy


def test_unset_top_p_takes_the_models(daemon: RunningDaemon) -> None:
    everything = {"top_k": 0, "temperature": 1}
    unset = [completion(daemon, **everything, seed=seed) for seed in SEEDS]
    assert unset == [completion(daemon, **everything, top_p=TOP_P, seed=seed) for seed in SEEDS]
    assert unset != [completion(daemon, **everything, top_p=1, seed=seed) for seed in SEEDS]


def test_unset_repetition_penalty_takes_the_models(daemon: RunningDaemon) -> None:
    unset = completion(daemon, temperature=0)
    assert unset == completion(daemon, temperature=0, repetition_penalty=REPETITION_PENALTY)
    assert unset != completion(daemon, temperature=0, repetition_penalty=1.0)


def test_unset_min_p_takes_the_models(daemon: RunningDaemon) -> None:
    everything = {"top_k": 0, "temperature": 1}
    unset = [completion(daemon, **everything, seed=seed) for seed in SEEDS]
    assert unset == [completion(daemon, **everything, min_p=MIN_P, seed=seed) for seed in SEEDS]
    assert unset != [completion(daemon, **everything, min_p=0, seed=seed) for seed in SEEDS]


def test_unset_chat_max_tokens_takes_the_models_max_new_tokens(daemon: RunningDaemon) -> None:
    chat = {"messages": [{"role": "user", "content": "hello there"}]}
    assert completion_tokens(daemon, "/v1/chat/completions", chat) == MAX_NEW_TOKENS
    assert completion_tokens(daemon, "/v1/chat/completions", {**chat, "max_tokens": 7}) == 7
    # completions default to 16 whatever the model says, as vLLM's do (OpenAI's default)
    assert completion_tokens(daemon, "/v1/completions", {"prompt": "Once upon a time"}) == 16
