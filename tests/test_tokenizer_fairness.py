"""No head-of-line blocking in the tokenizer tier: a huge prompt is refused from its length alone,
before it is tokenized; a long prompt that may fit is tokenized off the worker's loop, so small
requests behind it are answered meanwhile.

Real daemon with one tokenizer worker, httpx over HTTP/1.1 and HTTP/2, the openai client; the
bound's soundness and the off-loop encoding's identity are property tests on the demo tokenizer.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from harness.daemons import RunningDaemon, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from daemon.engine.demo_model import ensure_demo_model
from daemon.tokenizer.bounds import bytes_per_token
from daemon.tokenizer.loading import TextTokenizer, load_text_tokenizer

TRANSPORTS = pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
MIB = 2**20
WORDS = ["hello", " world", " café", "\n", " naïve", " 🙂", "  ", " the", "1234", " token"]
SMALL_REQUESTS = 10
SMALL_LATENCY_S = 1.0  # the bound for each small request while the big one is tokenized
REFUSAL_S = 2.0  # tokenizing 6 MiB takes 7 s or more here: a refusal this fast tokenized nothing


def text_of(size: int, salt: int = 0) -> str:
    """Varied text of about `size` bytes (exact lengths differ by `salt`, so log lines tell them apart)."""
    chunk = "".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(len(WORDS) * 3))
    return chunk * (size // len(chunk.encode())) + "x" * salt


@pytest.fixture(scope="module")
def demo(model_cache) -> TextTokenizer:
    return load_text_tokenizer(ensure_demo_model(model_cache))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, {"tokenizer.workers": 1}) as running:
        yield running


def post(daemon: RunningDaemon, path: str, body: dict, *, http2: bool, timeout: float = 60) -> httpx.Response:
    content = json.dumps(body, ensure_ascii=False).encode()  # as sent: a 6 MiB prompt is a 6 MiB body
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=timeout) as http:
        response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    return response


# --- the cheap bound ----------------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_a_huge_prompt_is_refused_before_it_is_tokenized(daemon, demo, http2, kind):
    huge = text_of(6 * MIB)
    if kind == "prompt":
        path, body = "/v1/completions", {"model": "demo", "prompt": huge, "max_tokens": 1}
    else:
        path, body = "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": huge}]}
    started = time.monotonic()
    response = post(daemon, path, body, http2=http2)
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == kind  # the prompt is too long, whatever max_tokens says
    assert "maximum context length is 2048 tokens" in error["message"]
    assert f"({demo.max_prompt_bytes(2047)} bytes)" in error["message"]
    assert elapsed < REFUSAL_S, f"the refusal took {elapsed:.1f} s: the prompt was tokenized"


def test_the_openai_client_sees_the_refusal_name_messages(daemon):
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    huge = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text_of(2 * MIB)}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="demo", messages=huge, max_tokens=1)
    assert refused.value.body["param"] == "messages"


def test_a_prompt_just_within_the_bound_is_tokenized_and_judged_by_its_tokens(daemon, demo):
    """Below the byte bound the count of tokens decides: this one has too many, by its ids."""
    limit = demo.max_prompt_bytes(2047)
    prompt = "a" * limit  # the demo merges runs of 'a' only so far: many more tokens than 2048
    response = post(daemon, "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 1}, http2=False)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert f"your prompt has {len(demo.encode(prompt, add_special_tokens=True))} tokens" in error["message"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=400) | st.lists(st.sampled_from(WORDS), max_size=80).map("".join))
def test_the_bound_never_refuses_a_prompt_that_fits(demo, text):
    """Every token covers at most bytes_per_token bytes: a prompt's bytes never exceed its tokens times that."""
    size = len(text.encode("utf-8", "surrogatepass"))
    try:
        tokens = len(demo.encode(text, add_special_tokens=False))
    except Exception:  # lone surrogates: the tokenizer refuses them whatever their length
        return
    assert size <= demo.max_prompt_bytes(tokens)


def test_the_bound_holds_for_the_longest_tokens(demo, model_cache):
    """The worst case: a text made only of the vocabulary's longest tokens, and of special tokens."""
    vocab = Tokenizer.from_file(str(ensure_demo_model(model_cache) / "tokenizer.json")).get_vocab()
    longest = sorted(vocab, key=len, reverse=True)[:20]
    text = demo.decode([vocab[token] for token in longest * 50], skip_special_tokens=False)
    tokens = len(demo.encode(text, add_special_tokens=False))
    assert len(text.encode()) <= demo.max_prompt_bytes(tokens)


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
NFC_THEN_PREPEND = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Prepend", "prepend": "_"}]}


def then_byte_level(first: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": [first, BYTE_LEVEL]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, 17),
        ({"normalizer": {"type": "NFC"}}, 17 * 16),
        ({"normalizer": NFC_THEN_PREPEND}, 17 * 16),
        ({"normalizer": {"type": "Lowercase"}}, None),  # the Kelvin sign, 3 bytes, becomes 'k'
        ({"normalizer": {"type": "Replace", "pattern": {"String": "x"}, "content": ""}}, None),
        ({"pre_tokenizer": then_byte_level({"type": "Split", "behavior": "Isolated"})}, 17),
        ({"pre_tokenizer": then_byte_level({"type": "Split", "behavior": "Removed"})}, None),
        ({"pre_tokenizer": then_byte_level({"type": "WhitespaceSplit"})}, None),
        ({"pre_tokenizer": {"type": "Metaspace"}}, None),
        ({"added_tokens": [{"content": "<mask>", "lstrip": True}]}, None),
        ({"added_tokens": [{"content": "<|a much longer special token|>", "lstrip": False}]}, 31),
        ({"truncation": {"max_length": 16}}, None),
        ({"model": {"type": "WordPiece", "vocab": {}}}, None),
    ],
)
def test_bytes_per_token_is_given_only_where_it_is_sound(demo, model_cache, change, expected):
    description = json.loads(Path(ensure_demo_model(model_cache) / "tokenizer.json").read_text())
    description.update(change)
    assert bytes_per_token(description) == expected


def test_no_bound_without_every_byte_in_the_vocabulary(model_cache):
    description = json.loads(Path(ensure_demo_model(model_cache) / "tokenizer.json").read_text())
    del description["model"]["vocab"]["Ā"]  # byte 0x00: dropped from any text, so no token covers it
    assert bytes_per_token(description) is None


# --- off the loop -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), special=st.booleans())
def test_the_off_loop_encoding_gives_the_ids_of_a_one_shot_encode(demo, text, special):
    """encode_batch (which lets go of the GIL) and encode agree on every text, on a thread too."""
    raw = demo._tokenizer
    try:
        expected = raw.encode(text, add_special_tokens=special).ids
    except Exception:  # lone surrogates: both refuse them
        return
    found = []

    def encode_on_a_thread() -> None:
        found.append(raw.encode_batch([text], add_special_tokens=special)[0].ids)

    worker = threading.Thread(target=encode_on_a_thread)
    worker.start()
    worker.join(timeout=10)
    assert found == [expected]


@TRANSPORTS
def test_small_requests_are_answered_while_a_big_prompt_is_tokenized(daemon, http2):
    """A 3 MiB prompt kept by truncate_prompt_tokens: it fits, so it is tokenized (seconds); ten small
    completions sent meanwhile through the same tokenizer worker each answer within a second."""
    big = text_of(3 * MIB, salt=1 + http2)
    body = {"model": "demo", "prompt": big, "max_tokens": 1, "truncate_prompt_tokens": 16}
    outcome: dict[str, object] = {}

    def send_big() -> None:
        started = time.monotonic()
        outcome["response"] = post(daemon, "/v1/completions", body, http2=http2, timeout=120)
        outcome["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send_big)
    sender.start()
    try:
        daemon.wait_for_event("tokenizer.off_loop", timeout=60, chars=len(big))
        latencies, during = [], 0
        with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
            for n in range(SMALL_REQUESTS):
                small = {"model": "demo", "prompt": f"small request {n}", "max_tokens": 2}
                started = time.monotonic()
                response = http.post("/v1/completions", json=small)
                latencies.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
                during += sender.is_alive()
    finally:
        sender.join(timeout=120)
    assert not sender.is_alive(), "the big request did not finish"
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 16
    # The point of the test: the big one was still in flight while the small ones were served.
    overlap = f"only {during} small requests overlapped the big one ({outcome['seconds']:.1f} s)"
    assert during >= SMALL_REQUESTS // 2, overlap
    assert max(latencies) < SMALL_LATENCY_S, f"small request latencies {sorted(latencies)} beside a big prompt"


def test_tokenize_answers_a_long_prompt_off_the_loop(daemon, demo):
    prompt = text_of(MIB // 2, salt=5)
    response = post(daemon, "/tokenize", {"prompt": prompt}, http2=True)
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == demo.encode(prompt, add_special_tokens=True)
