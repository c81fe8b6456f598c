"""Bad input never hurts anyone else.

A request the engine cannot honour is refused at the door with a 400 naming the field
(numbers beyond their bounds or beyond the 64 bits the IPC carries, JSON nested too
deep, a body framed two ways), and a failure that still reaches the engine ends only the
sequence that caused it: the requests batched beside it get their tokens, in the step
that failed and in the next one, already planned (pipelined).

The engine is tested directly (batcher and worker joined by encoded messages, no
processes), the rest on a real daemon with real clients; the property test throws
random JSON bodies at both generation endpoints.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from harness.daemons import RunningDaemon, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.engine.blocks import BlockManager
from daemon.engine.demo_model import ensure_demo_model
from daemon.engine.demo_spec import DEMO_HF_CONFIG
from daemon.engine.runner import ModelRunner
from daemon.engine.sampler import SamplingParams, sample
from daemon.frontend.request_models import ChatRequest, CompletionRequest, fields_of
from daemon.ipc.messages import Sampling, ScheduleRequest, StepResult, ToScheduler, ToWorker, decoder, encode
from daemon.scheduler.batcher import PIPELINE_DEPTH, Batcher, Limits
from daemon.worker.execute import execute

to_worker, to_scheduler = decoder(ToWorker), decoder(ToScheduler)
NAN = float("nan")  # a temperature no request can carry past validation: its row's sampling raises


# --- the engine alone -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def run_batch(demo_dir: Path, requests: dict[str, Sampling]) -> tuple[dict[str, list[int]], dict[str, object]]:
    """Run `requests` (one prompt each) through a batcher and a runner, steps pipelined as the
    scheduler runs them; their tokens and their errors, by request id."""
    runner = ModelRunner(demo_dir, num_blocks=64, device="cpu", dtype="float32")
    batcher = Batcher(BlockManager(64), Limits(8, 100, 2048), DEMO_HF_CONFIG["max_position_embeddings"], [3])
    for index, (rid, sampling) in enumerate(requests.items()):
        batcher.add(ScheduleRequest(rid, 0, [5 + index, 40, 41, 42 + index], sampling))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    errors: dict[str, object] = {}
    in_flight: deque = deque()
    for _ in range(500):  # bounded: a batch of 8-token requests drains in a few dozen steps
        while len(in_flight) < PIPELINE_DEPTH and (plan := batcher.plan()) is not None:
            in_flight.append(to_worker.decode(encode(plan)))
        if not in_flight:
            return tokens, errors
        result = to_scheduler.decode(encode(execute(runner, in_flight.popleft())))
        assert isinstance(result, StepResult) and result.error is None
        for updates in batcher.complete(result).values():
            for update in updates:
                tokens[update.request_id] += update.token_ids
                if update.error:
                    errors[update.request_id] = update.error
    raise AssertionError("the batch did not drain")


def test_a_sequence_whose_sampling_fails_ends_alone_and_the_batch_goes_on(demo_dir):
    innocent = {
        f"ok{i}": Sampling(max_tokens=8, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True) for i in range(6)
    }
    alone, _ = run_batch(demo_dir, innocent)
    bad = {"bad-prefill": Sampling(max_tokens=8, temperature=NAN, ignore_eos=True)}
    tokens, errors = run_batch(demo_dir, {**innocent, **bad})
    assert set(errors) == {"bad-prefill"}
    assert errors["bad-prefill"].status == 500 and "the engine failed on this request" in errors["bad-prefill"].message
    assert tokens["bad-prefill"] == []
    # every innocent request got all its tokens, the same it gets without the bad one beside it
    assert {rid: tokens[rid] for rid in innocent} == alone
    assert all(len(t) == 8 for t in alone.values())


def test_the_rows_beside_a_failing_row_are_sampled_as_usual():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = NAN
    params = [SamplingParams(0.0), SamplingParams(temperature=NAN), SamplingParams(0.0), SamplingParams(0.7, seed=3)]
    generators = [None, torch.Generator(), None, torch.Generator().manual_seed(3)]
    drawn = sample(logits, params, generators)
    assert drawn[0] == int(logits[0].argmax())
    assert isinstance(drawn[1], Exception) and isinstance(drawn[2], ValueError)
    assert isinstance(drawn[3], int) and 0 <= drawn[3] < 50


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1e-5),
        SamplingParams(top_p=1e-45),
        SamplingParams(top_p=1e-45, temperature=2.0, top_k=3),
    ],
    ids=["temperature-1e-40", "temperature-1e-5", "top_p-1e-45", "top_p-1e-45-top_k"],
)
def test_extreme_values_within_the_bounds_sample_the_likeliest_token(params):
    """Found by the fault battery: these made the sampler raise (inf/NaN probabilities, or none left)."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(2)) * 30
    drawn = sample(logits, [params] * 3, [torch.Generator().manual_seed(i) for i in range(3)])
    assert drawn == logits.argmax(dim=-1).tolist()


# --- a real daemon -----------------------------------------------------------------------------------

BEYOND_64_BITS = 2**64  # one past what MessagePack carries
TRANSPORTS = pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


def post(
    daemon: RunningDaemon, path: str, body: dict | bytes, *, http2: bool = False, timeout: float = 60
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=timeout) as http:
        return http.post(path, content=content, headers={"content-type": "application/json"})


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_extreme_but_valid_sampling_values_batched_with_innocent_requests_all_complete(daemon):
    """The fault battery's case: temperature 1e-40 and top_p 1e-45 under an 8-client load once
    failed every request batched with them (and the next pipelined step). Now nobody fails."""
    clients, per_client = 8, 4
    extreme = [{"temperature": 1e-40}, {"top_p": 1e-45}, {"temperature": 1e-40, "top_p": 1e-45, "top_k": 5}]
    deadline = time.monotonic() + 240

    def one_client(index: int) -> list[tuple[str, int, str]]:
        outcomes = []
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            for n in range(per_client):
                if time.monotonic() > deadline:  # bounded in time as well as in count
                    break
                bad = (index + n) % 3 == 0
                body = {"prompt": f"client {index} request {n}", "max_tokens": 8, "ignore_eos": True, "seed": n}
                body |= extreme[(index + n) % len(extreme)] if bad else {"temperature": 0.8}
                response = http.post("/v1/completions", json=body)
                outcomes.append(("bad" if bad else "innocent", response.status_code, response.text))
        return outcomes

    with ThreadPoolExecutor(clients) as pool:
        outcomes = [o for result in pool.map(one_client, range(clients)) for o in result]
    assert len(outcomes) == clients * per_client
    failures = [o for o in outcomes if o[1] != 200]
    assert not failures, failures[:3]
    assert all(json.loads(text)["usage"]["completion_tokens"] == 8 for _kind, _status, text in outcomes)
    assert not [e for e in daemon.log_events() if e.get("event") in ("worker.step_failed", "worker.sequence_failed")]


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    [
        ("max_tokens", BEYOND_64_BITS, {}),
        ("seed", BEYOND_64_BITS, {}),
        ("top_k", BEYOND_64_BITS, {}),
        ("priority", BEYOND_64_BITS, {}),
        ("truncate_prompt_tokens", BEYOND_64_BITS, {}),
        ("stop_token_ids", [1, BEYOND_64_BITS], {}),
        ("max_tokens", 2**63, {}),  # fits uint64, not the int64 the engine counts in
        ("temperature", 1e300, {}),
        ("n", BEYOND_64_BITS, {}),
    ],
)
def test_numbers_beyond_their_bounds_are_a_400_naming_the_field(daemon, field, value, extra):
    for path, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        error = openai_error(post(daemon, path, {**body, "max_tokens": 2, field: value, **extra}), 400)
        assert error["param"] == field, error


@pytest.mark.parametrize(
    "prompt",
    [[1, BEYOND_64_BITS], [[5, 6], [BEYOND_64_BITS]], [-1, 5], [2**63]],
    ids=["ids", "lists", "negative", "int64+1"],
)
def test_prompt_token_ids_beyond_64_bits_are_a_400_naming_the_prompt(daemon, prompt):
    error = openai_error(post(daemon, "/v1/completions", {"prompt": prompt, "max_tokens": 2}), 400)
    assert error["param"] == "prompt", error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "note": BEYOND_64_BITS}]}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"n": -BEYOND_64_BITS}},
        ),
        ("/tokenize", {"messages": [{"role": "user", "content": "x", "note": BEYOND_64_BITS}]}),
        ("/detokenize", {"tokens": [BEYOND_64_BITS]}),
    ],
    ids=["chat-message", "template-kwargs", "tokenize", "detokenize"],
)
def test_integers_beyond_64_bits_in_free_form_fields_are_a_400(daemon, path, body):
    """Free-form objects (a message's keys, the template's variables) are passed on as they are:
    an integer there that MessagePack cannot carry is the request's fault, not the server's."""
    openai_error(post(daemon, path, {**body, "max_tokens": 2} if path.startswith("/v1") else body), 400)


DEEP = 10_000


@TRANSPORTS
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("where", ["inside-a-field", "the-whole-body"])
def test_json_nested_ten_thousand_levels_deep_is_a_400(daemon, path, where, http2):
    nested = b"[" * DEEP + b"]" * DEEP
    body = b'{"prompt": ' + nested + b', "max_tokens": 2}' if where == "inside-a-field" else nested
    error = openai_error(post(daemon, path, body, http2=http2), 400)
    if where == "inside-a-field":  # a whole body that is an array is refused as not an object, first
        assert "nests too deeply" in error["message"]
    assert post(daemon, "/tokenize", {"prompt": "still serving"}, http2=http2).status_code == 200


def raw_exchange(daemon: RunningDaemon, request: bytes, timeout: float = 30) -> tuple[bytes, bool]:
    """Send `request` on a fresh connection: what the server answers, and whether it closed the
    connection (False: still open `timeout` seconds after the last byte)."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


def test_content_length_with_chunked_encoding_is_framed_by_chunks_and_the_connection_closed(daemon):
    """A body framed two ways is the shape of request smuggling. Granian (hyper) never lets the
    app see it: it drops Content-Length, reads the body by its chunks, answers, and closes the
    connection (RFC 9112, 6.3), so whatever follows on the connection (a request hidden behind a
    Content-Length a proxy believed) is never served. The app cannot answer 400: the header is
    gone by the time it runs."""
    body = json.dumps({"prompt": "x", "max_tokens": 2, "ignore_eos": True}).encode()
    chunked = f"{len(body):x}".encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    smuggled = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + smuggled
    )
    answer, closed = raw_exchange(daemon, request)
    assert closed, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the request behind it was never served
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower(), head
    assert json.loads(text)["usage"]["completion_tokens"] == 2  # the whole chunked body was read, not 5 bytes


# --- random bodies -----------------------------------------------------------------------------------

BOUNDED = settings(
    max_examples=75,  # per endpoint: 150 in all
    deadline=None,  # each request has its own timeout below, which is the hang we look for
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
REQUEST_TIMEOUT_S = 60.0

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(-1e-30, 1e-30)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# Lengths stay small or invalid: a large valid one would only make a slow test of the CPU engine.
lengths = st.integers(-2, 4) | st.integers(2**63 - 1, 2**70) | st.text(max_size=4) | st.floats(-1, 4)
prompts = st.text(max_size=40) | st.lists(st.integers(-5, 2**65), min_size=1, max_size=6) | json_values
messages = (
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "robot"]),
                "content": st.text(max_size=30) | json_values,
            }
        ),
        max_size=3,
    )
    | json_values
)
field_values = {
    "max_completion_tokens": lengths,
    "stream": st.booleans(),
    "temperature": st.floats(-1, 3) | st.sampled_from([0.0, 1e-40, 1e-5, 2.0]) | json_values,
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([1e-45, 1e-300, 1.0]) | json_values,
    "top_k": st.integers(-3, 2**65) | json_values,
    "seed": st.integers(-3, 2**65) | json_values,
    "stop_token_ids": st.lists(st.integers(-3, 2**65), max_size=3) | json_values,
}


def bodies(model: type[CompletionRequest] | type[ChatRequest]) -> st.SearchStrategy:
    """Near-valid bodies (the required field, a small max_tokens, random values of real field names
    and a few unknown ones), and now and then any JSON at all."""
    names = [info.name for info in fields_of(model) if info.name not in ("max_tokens", "prompt", "messages")]
    names += ["max_tokns", "temprature", "x"]
    fields = st.sampled_from(names).flatmap(lambda name: st.tuples(st.just(name), field_values.get(name, json_values)))
    required = {"prompt": prompts} if model is CompletionRequest else {"messages": messages}
    near_valid = st.builds(
        lambda base, extra: {**base, **dict(extra)},
        st.fixed_dictionaries({**required, "max_tokens": lengths}),
        st.lists(fields, max_size=4),
    )
    return st.one_of(near_valid, near_valid, near_valid, json_values)


def assert_well_answered(daemon: RunningDaemon, path: str, body: object, http2: bool) -> None:
    """200 (a stream read to its end without a server error in it) or a 4xx with an OpenAI error
    object; never a 5xx, a hang or a dropped connection (httpx raises for those)."""
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=REQUEST_TIMEOUT_S) as http:
        response = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    if response.status_code == 200:
        assert "server_error" not in response.text, response.text
        if isinstance(body, dict) and body.get("stream") is True:
            assert response.text.endswith("data: [DONE]\n\n"), response.text
        return
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


@BOUNDED
@given(body=bodies(CompletionRequest), http2=st.booleans())
def test_random_completion_bodies_get_a_200_or_a_4xx(daemon, body, http2):
    assert_well_answered(daemon, "/v1/completions", body, http2)


@BOUNDED
@given(body=bodies(ChatRequest), http2=st.booleans())
def test_random_chat_bodies_get_a_200_or_a_4xx(daemon, body, http2):
    assert_well_answered(daemon, "/v1/chat/completions", body, http2)
