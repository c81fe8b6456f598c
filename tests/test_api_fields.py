"""Every row of the README's request-field table, checked against the running server.

The rows come from the request models themselves (daemon.frontend.request_models): a
refused field is refused with a 400 naming it and accepted with each neutral value; a
logged field reaches the request's log line; a honoured field does what it says, each
checked by its own function below, and a test fails if a honoured field has none.

Two daemons: the built-in demo model, and a "probe" model made from it whose every
output is one known special token, which it also takes as its end-of-sequence token,
with a chat template that shows its extra inputs: that makes the effect of
ignore_eos, skip_special_tokens, stop_token_ids and the template options observable.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from harness.daemons import RunningDaemon, serving
from safetensors.torch import load_file, save_file

from daemon.engine.demo_model import ensure_demo_model
from daemon.frontend.request_models import ChatRequest, CompletionRequest, FieldInfo, fields_of
from daemon.ipc.messages import ChatOptions
from daemon.tokenizer.loading import load_text_tokenizer

ENDPOINTS = {"completions": ("/v1/completions", CompletionRequest), "chat": ("/v1/chat/completions", ChatRequest)}
PROBE_TOKEN = "<|begin_of_text|>"  # id 0: what a model whose final hidden state is zero always picks
PROBE_TEMPLATE_TAIL = (
    "{%- if greeting is defined %}{{ greeting }}{% endif %}"
    "{%- for document in documents or [] %}{{ document['text'] }}{% endfor %}"
)
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory, model_cache) -> Path:
    """The demo model, changed to always say token 0, which is also its only end-of-sequence token."""
    directory = tmp_path_factory.mktemp("probe") / "probe"
    shutil.copytree(ensure_demo_model(model_cache), directory)
    weights = load_file(directory / "model.safetensors")
    weights["model.norm.weight"].zero_()  # zero hidden state: every logit is 0, greedy picks id 0
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    for name, value in (("config.json", 0), ("generation_config.json", [0])):
        config = json.loads((directory / name).read_text())
        config["eos_token_id"] = value
        (directory / name).write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] += PROBE_TEMPLATE_TAIL
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def probe(tmp_path_factory, model_cache, probe_dir) -> RunningDaemon:
    # one request at a time, by priority: so the priority field's effect is visible
    settings = {
        "model.path": str(probe_dir),
        "scheduler.policy": "priority",
        "scheduler.max_running_requests": 1,
        "logging.level": "debug",  # the scheduler's request.queued lines
    }
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, settings) as running:
        yield running


@pytest.fixture(scope="module")
def demo_tokenizer(model_cache):
    return load_text_tokenizer(ensure_demo_model(model_cache))


@pytest.fixture(scope="module")
def probe_tokenizer(probe_dir):
    return load_text_tokenizer(probe_dir)


def post(daemon: RunningDaemon, path: str, body: dict, *, http2: bool = False) -> httpx.Response:
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=60) as http:
        return http.post(path, json=body)


def ok(daemon: RunningDaemon, path: str, body: dict, **kwargs) -> dict:
    response = post(daemon, path, body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def complete(daemon: RunningDaemon, **body: Any) -> dict:
    return ok(daemon, "/v1/completions", {"prompt": "Once upon a time", **body})


def generate(daemon: RunningDaemon, endpoint: str, **body: Any) -> dict:
    return ok(daemon, ENDPOINTS[endpoint][0], {**_required(endpoint), **body})


def chat(daemon: RunningDaemon, **body: Any) -> dict:
    return ok(daemon, "/v1/chat/completions", {"messages": CHAT, **body})


def text_of(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def refusal(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def rows(status: str) -> list[tuple[str, FieldInfo]]:
    return [
        (endpoint, info)
        for endpoint, (_p, model) in ENDPOINTS.items()
        for info in fields_of(model)
        if info.policy.status == status
    ]


def row_id(row: tuple[str, FieldInfo]) -> str:
    return f"{row[0]}.{row[1].name}"


# --- refused ---------------------------------------------------------------------------------------

CANDIDATES = [2, 0.5, True, False, "x", {"1": 1.0}, ["x"], [1], [{"type": "function", "function": {"name": "f"}}]]


def _refused_example(endpoint: str, info: FieldInfo) -> Any:
    """A value of the field's type that asks for what is not implemented (no neutral value)."""
    model = ENDPOINTS[endpoint][1]
    for value in CANDIDATES:
        if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in info.policy.neutral):
            continue
        try:
            msgspec.convert({info.name: value, **_required(endpoint)}, model)
        except msgspec.ValidationError:
            continue
        return value
    return None


def _probing(endpoint: str) -> dict[str, Any]:
    """A request to the probe model: greedy, as its logits are all equal (id 0 is the first maximum)."""
    return {**_required(endpoint), "temperature": 0}


def _required(endpoint: str) -> dict[str, Any]:
    """The fields an endpoint's request cannot do without."""
    return {"prompt": "hi"} if endpoint == "completions" else {"messages": CHAT}


@pytest.mark.parametrize("row", rows("refused"), ids=row_id)
def test_refused_field_is_refused_naming_it_and_its_neutral_values_pass(demo, row):
    endpoint, info = row
    path, _model = ENDPOINTS[endpoint]
    base = {**_required(endpoint), "max_tokens": 1}
    if info.policy.requires:  # without what it needs: OpenAI's 400, naming this field
        value = next(v for v in [*info.policy.neutral, "auto"] if v is not None)
        error = refusal(post(demo, path, {**base, info.name: value}))
        assert error["param"] == info.name and f"only allowed when `{info.policy.requires}`" in error["message"]
        return
    value = _refused_example(endpoint, info)
    assert value is not None, f"no non-neutral example for {info.name}"
    error = refusal(post(demo, path, {**base, info.name: value}))
    assert error["param"] == info.name and "not supported by this server yet" in error["message"], error
    for neutral in info.policy.neutral:
        ok(demo, path, {**base, info.name: neutral})


def test_the_openai_client_sees_a_refusal_as_bad_request(demo):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=CHAT, reasoning_effort="high")
    assert raised.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=CHAT, top_logprobs=2)
    assert raised.value.body["param"] == "top_logprobs"


# --- logged ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", rows("logged"), ids=row_id)
def test_logged_field_is_on_the_request_log_line(demo, row):
    endpoint, info = row
    path, _model = ENDPOINTS[endpoint]
    value = {"ticket": f"t-{endpoint}"} if info.name == "metadata" else f"{info.name}-{endpoint}-42"
    ok(demo, path, {**_required(endpoint), "max_tokens": 1, info.name: value})
    demo.wait_for_event("request.client_fields", **{info.name: value})


# --- honoured: one check each ----------------------------------------------------------------------


def _model(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    ok(demo, path, {**_required(endpoint), "max_tokens": 1, "model": "demo"})
    response = post(demo, path, {**_required(endpoint), "model": "gpt-4"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def _max_tokens(demo, probe, tokenizers, endpoint):
    body = {**_required(endpoint), "max_tokens": 3, "ignore_eos": True}
    assert ok(demo, ENDPOINTS[endpoint][0], body)["usage"]["completion_tokens"] == 3


def _max_completion_tokens(demo, probe, tokenizers, endpoint):
    assert chat(demo, max_tokens=5, max_completion_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2


def _temperature(demo, probe, tokenizers, endpoint):
    greedy = text_of(generate(demo, endpoint, max_tokens=12, temperature=0, ignore_eos=True))
    assert text_of(generate(demo, endpoint, max_tokens=12, temperature=1, top_k=1, ignore_eos=True)) == greedy
    hot = {text_of(generate(demo, endpoint, max_tokens=12, temperature=2, seed=s, ignore_eos=True)) for s in range(4)}
    assert hot - {greedy}, "temperature 2 never left the greedy path"


def _top_p(demo, probe, tokenizers, endpoint):
    greedy = text_of(generate(demo, endpoint, max_tokens=12, temperature=0, ignore_eos=True))
    assert (
        text_of(generate(demo, endpoint, max_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)) == greedy
    )


def _top_k(demo, probe, tokenizers, endpoint):
    greedy = text_of(generate(demo, endpoint, max_tokens=12, temperature=0, ignore_eos=True))
    assert text_of(generate(demo, endpoint, max_tokens=12, temperature=1.5, top_k=1, seed=5, ignore_eos=True)) == greedy
    for off in (0, -1):  # all tokens: as unset
        same = {
            text_of(generate(demo, endpoint, max_tokens=12, temperature=1.5, top_k=k, seed=5, ignore_eos=True))
            for k in (off, None)
        }
        assert len(same) == 1


def _seed(demo, probe, tokenizers, endpoint):
    runs = [
        text_of(generate(demo, endpoint, max_tokens=12, temperature=1.5, seed=s, ignore_eos=True)) for s in (7, 7, 8, 9)
    ]
    assert runs[0] == runs[1] and len(set(runs[1:])) > 1
    # the same seeded request inside a busy batch: eight others (unseeded, sampled) decode beside it
    with ThreadPoolExecutor(9) as pool:
        others = [
            pool.submit(generate, demo, endpoint, max_tokens=48, temperature=1.0, top_p=0.9, ignore_eos=True)
            for _ in range(8)
        ]
        busy = pool.submit(generate, demo, endpoint, max_tokens=12, temperature=1.5, seed=7, ignore_eos=True)
        assert text_of(busy.result()) == runs[0]
        assert all(len(other.result()["choices"]) == 1 for other in others)


def _stop(demo, probe, tokenizers, endpoint):
    free = text_of(complete(demo, max_tokens=24, temperature=0, ignore_eos=True))
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut = complete(demo, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    assert text_of(cut) == free[: free.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def _include_stop_str_in_output(demo, probe, tokenizers, endpoint):
    free = text_of(generate(demo, endpoint, max_tokens=24, temperature=0, ignore_eos=True))
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    kept = generate(
        demo, endpoint, max_tokens=24, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=True
    )
    assert text_of(kept) == free[: free.index(stop) + len(stop)]
    # a stop token's text too (the probe's end-of-sequence token)
    body = {**_probing(endpoint), "max_tokens": 4, "include_stop_str_in_output": True, "skip_special_tokens": False}
    assert text_of(ok(probe, ENDPOINTS[endpoint][0], body)) == PROBE_TOKEN


def _stop_token_ids(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    body = {**_probing(endpoint), "max_tokens": 4, "ignore_eos": True}
    assert ok(probe, path, body)["usage"]["completion_tokens"] == 4
    stopped = ok(probe, path, {**body, "stop_token_ids": [0]})
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"


def _ignore_eos(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    ended = ok(probe, path, {**_probing(endpoint), "max_tokens": 4})
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"
    going = ok(probe, path, {**_probing(endpoint), "max_tokens": 4, "ignore_eos": True})
    assert going["usage"]["completion_tokens"] == 4 and going["choices"][0]["finish_reason"] == "length"


def _skip_special_tokens(demo, probe, tokenizers, endpoint):
    path, body = ENDPOINTS[endpoint][0], {**_probing(endpoint), "max_tokens": 3, "ignore_eos": True}
    assert text_of(ok(probe, path, body)) == ""
    assert text_of(ok(probe, path, {**body, "skip_special_tokens": False})) == PROBE_TOKEN * 3


def _truncate_prompt_tokens(demo, probe, tokenizers, endpoint):
    long = {"prompt": "Once upon a time in a land far away"} if endpoint == "completions" else {}
    answer = generate(demo, endpoint, **long, max_tokens=1, truncate_prompt_tokens=3)
    assert answer["usage"]["prompt_tokens"] == 3
    if endpoint == "completions":  # -1: as much of a too-long prompt as fits beside max_tokens
        answer = complete(demo, prompt=[7] * 3000, max_tokens=8, truncate_prompt_tokens=-1)
        assert answer["usage"]["prompt_tokens"] == 2048 - 8


def _stream(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    if endpoint == "completions":
        whole = client.completions.create(model="demo", prompt="The river", max_tokens=8, temperature=0)
        parts = client.completions.create(model="demo", prompt="The river", max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    else:
        whole = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=0)
        parts = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        assert text == whole.choices[0].message.content


def _stream_options(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    body = {**_required(endpoint), "max_tokens": 3, "stream": True}

    def events(extra: dict) -> list:
        with (
            httpx.Client(base_url=demo.url, timeout=60) as http,
            http.stream("POST", path, json={**body, **extra}) as response,
        ):
            return [
                json.loads(line[6:])
                for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]

    def usage_events(extra: dict) -> list:
        return [e for e in events(extra) if e.get("usage")]

    assert usage_events({}) == [] and usage_events({"stream_options": {"include_usage": False}}) == []
    assert len(usage_events({"stream_options": {"include_usage": True}})) == 1
    # vLLM's continuous_usage_stats: every chunk with text carries the usage so far, then the last one
    every = events({"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "ignore_eos": True})
    texts = [
        e
        for e in every
        if e["choices"] and (e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content"))
    ]
    assert texts and all(e.get("usage") for e in texts)
    counts = [e["usage"]["completion_tokens"] for e in every if e.get("usage")]
    assert counts == sorted(counts) and counts[-1] == 3 and every[-1]["choices"] == []
    error = refusal(post(demo, path, {**body, "stream_options": {"continuous_usage_stats": True}}))
    assert error["param"] == "stream_options" and "include_usage" in error["message"]
    error = refusal(post(demo, path, {**_required(endpoint), "stream_options": {"include_usage": True}}))
    assert error["param"] == "stream_options"


def _priority(demo, probe, tokenizers, endpoint):
    """One request runs at a time on the probe: of two waiting behind it, the lower priority goes first."""
    path = ENDPOINTS[endpoint][0]

    async def run() -> list[str]:
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=probe.url, timeout=60) as http:

            async def one(name: str, priority: int) -> None:
                body = {**_probing(endpoint), "max_tokens": 2, "ignore_eos": True, "priority": priority}
                response = await http.post(path, json=body)
                assert response.status_code == 200, response.text
                finished.append(name)

            queued = _queued(probe)
            blocker = {**_probing(endpoint), "max_tokens": 1500, "ignore_eos": True, "stream": True}
            blocker["skip_special_tokens"] = False  # its tokens make text: events come as it runs
            async with http.stream("POST", path, json=blocker) as running:
                lines = running.aiter_lines()  # kept: an abandoned line iterator closes the stream
                await anext(lines)  # it generates: the one running slot is taken
                waiting = [asyncio.create_task(one("later", 5))]
                await _until_queued(probe, queued + 2)
                waiting.append(asyncio.create_task(one("sooner", -5)))
                await _until_queued(probe, queued + 3)
            # leaving the stream aborts the blocker: the two waiting ones run, by priority
            await asyncio.gather(*waiting)
        return finished

    assert asyncio.run(run()) == ["sooner", "later"]
    # the demo daemon schedules first come, first served: a priority there would change nothing
    error = refusal(post(demo, path, {**_required(endpoint), "priority": 1}))
    assert error["param"] == "priority" and "scheduler.policy" in error["message"]
    ok(demo, path, {**_required(endpoint), "max_tokens": 1, "priority": 0})


def _queued(daemon: RunningDaemon) -> int:
    """Requests the scheduler has queued so far (its debug log line)."""
    return sum(1 for e in daemon.log_events() if e.get("event") == "request.queued")


async def _until_queued(daemon: RunningDaemon, count: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while _queued(daemon) < count:
            await asyncio.sleep(0.02)  # polling the daemon's log for an observable event, bounded


def _prompt(demo, probe, tokenizers, endpoint):
    assert complete(demo, prompt="x", max_tokens=1)["usage"]["prompt_tokens"] == len(
        tokenizers["demo"].encode("x", add_special_tokens=True)
    )
    assert complete(demo, prompt=[5, 6, 7], max_tokens=1)["usage"]["prompt_tokens"] == 3


def _completions_add_special_tokens(demo, probe, tokenizers, endpoint):
    with_bos = complete(demo, prompt="x", max_tokens=1)["usage"]["prompt_tokens"]
    assert complete(demo, prompt="x", max_tokens=1, add_special_tokens=False)["usage"]["prompt_tokens"] == with_bos - 1


def _rendered(tokenizers, name: str, messages=CHAT, **options) -> int:
    return len(tokenizers[name].render_chat_prompt(messages, ChatOptions(**options)))


def _messages(demo, probe, tokenizers, endpoint):
    assert chat(demo, max_tokens=1)["usage"]["prompt_tokens"] == _rendered(tokenizers, "demo")
    error = refusal(post(demo, "/v1/chat/completions", {"messages": [{"role": "user"}]}))
    assert error["param"] == "messages"


def _add_generation_prompt(demo, probe, tokenizers, endpoint):
    off = chat(demo, max_tokens=1, add_generation_prompt=False)["usage"]["prompt_tokens"]
    assert off == _rendered(tokenizers, "demo", add_generation_prompt=False) < _rendered(tokenizers, "demo")


def _continue_final_message(demo, probe, tokenizers, endpoint):
    messages = [*CHAT, {"role": "assistant", "content": "Once upon"}]
    answer = chat(demo, messages=messages, max_tokens=1, continue_final_message=True)
    expected = _rendered(tokenizers, "demo", messages, add_generation_prompt=False, continue_final_message=True)
    closed = _rendered(tokenizers, "demo", messages, add_generation_prompt=False)
    assert answer["usage"]["prompt_tokens"] == expected < closed  # the turn's end is cut
    error = refusal(
        post(
            demo,
            "/v1/chat/completions",
            {"messages": messages, "continue_final_message": True, "add_generation_prompt": True},
        )
    )
    assert error["param"] == "messages"


def _chat_add_special_tokens(demo, probe, tokenizers, endpoint):
    answer = chat(demo, max_tokens=1, add_special_tokens=True)
    assert answer["usage"]["prompt_tokens"] == _rendered(tokenizers, "demo", add_special_tokens=True)


def _chat_template_kwargs(demo, probe, tokenizers, endpoint):
    plain = chat(probe, max_tokens=1)["usage"]["prompt_tokens"]
    greeted = chat(probe, max_tokens=1, chat_template_kwargs={"greeting": "good morning to you"})
    expected = _rendered(tokenizers, "probe", template_kwargs={"greeting": "good morning to you"})
    assert greeted["usage"]["prompt_tokens"] == expected > plain


def _documents(demo, probe, tokenizers, endpoint):
    documents = [{"text": "the first document"}, {"text": "the second"}]
    answer = chat(probe, max_tokens=1, documents=documents)
    expected = _rendered(tokenizers, "probe", template_kwargs={"documents": documents})
    assert answer["usage"]["prompt_tokens"] == expected > chat(probe, max_tokens=1)["usage"]["prompt_tokens"]


# --- honoured sampling options: on the probe, whose logits are all 0 before they change them ----------

OPENAI_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "logprobs",
}


def openai_generate(daemon: RunningDaemon, endpoint: str, **fields: Any) -> tuple[str, Any]:
    """The text of one answer and the answer, asked through the official openai client (the
    fields it does not know go in extra_body, as a vLLM client sends them)."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    known = {k: v for k, v in fields.items() if k in OPENAI_FIELDS}
    extra = {k: v for k, v in fields.items() if k not in OPENAI_FIELDS}
    if endpoint == "completions":
        answer = client.completions.create(model=model, prompt=extra.pop("prompt", "hi"), extra_body=extra, **known)
        return answer.choices[0].text, answer
    answer = client.chat.completions.create(model=model, messages=CHAT, extra_body=extra, **known)
    return answer.choices[0].message.content or "", answer


def _probe_ids(tokenizers, endpoint: str, count: int) -> list[int]:
    """`count` ordinary token ids the probe's prompt for `endpoint` does not hold."""
    if endpoint == "completions":
        prompt = tokenizers["probe"].encode("hi", add_special_tokens=True)
    else:
        prompt = tokenizers["probe"].render_chat_prompt(CHAT, ChatOptions())
    return [i for i in range(4, 200) if i not in prompt][:count]


def _probe_text(tokenizers, endpoint: str, ids: list[int], **fields: Any) -> tuple[str, dict[str, Any]]:
    """The text of `ids`, and the request that makes the probe say it: greedy, past its
    end-of-sequence token, with every token shown."""
    body = {"max_tokens": len(ids), "temperature": 0, "ignore_eos": True, "skip_special_tokens": False, **fields}
    return tokenizers["probe"].decode(ids, skip_special_tokens=False), body


def _presence_penalty(demo, probe, tokenizers, endpoint):
    (a,) = _probe_ids(tokenizers, endpoint, 1)
    # token a starts 1.5 above the rest; each token generated loses the penalty once, however often
    for penalty, ids in ((2.0, [a, 0, 1, 2]), (1.0, [a, a, a, a]), (0.0, [a, a, a, a])):
        expected, body = _probe_text(tokenizers, endpoint, ids, logit_bias={str(a): 1.5}, presence_penalty=penalty)
        assert openai_generate(probe, endpoint, **body)[0] == expected, penalty


def _frequency_penalty(demo, probe, tokenizers, endpoint):
    (a,) = _probe_ids(tokenizers, endpoint, 1)
    # token a: 1.5, then 0.5, then -0.5 (once per time generated): the zeros of 0, 1, ... win from there
    for penalty, ids in ((1.0, [a, a, 0, 1]), (0.0, [a, a, a, a])):
        expected, body = _probe_text(tokenizers, endpoint, ids, logit_bias={str(a): 1.5}, frequency_penalty=penalty)
        assert openai_generate(probe, endpoint, **body)[0] == expected, penalty


def _repetition_penalty(demo, probe, tokenizers, endpoint):
    a, b = _probe_ids(tokenizers, endpoint, 2)
    bias = {str(a): 1.0, str(b): 0.8}
    # halved once seen: a 1.0 -> 0.5 loses to b 0.8, which halved (0.4) loses to a again
    for penalty, ids in ((2.0, [a, b, a, a]), (1.0, [a, a, a, a])):
        expected, body = _probe_text(tokenizers, endpoint, ids, logit_bias=bias, repetition_penalty=penalty)
        assert openai_generate(probe, endpoint, **body)[0] == expected, penalty
    if endpoint == "completions":  # the prompt's tokens count as seen: a in the prompt starts at 0.5
        expected, body = _probe_text(tokenizers, endpoint, [b, a, a, a], logit_bias=bias, repetition_penalty=2.0)
        assert openai_generate(probe, endpoint, **body, prompt=[a])[0] == expected
    for wrong in (0, -1):
        error = refusal(post(probe, ENDPOINTS[endpoint][0], {**_required(endpoint), "repetition_penalty": wrong}))
        assert error["param"] == "repetition_penalty"


def _logit_bias(demo, probe, tokenizers, endpoint):
    expected, body = _probe_text(tokenizers, endpoint, [7, 7, 7], logit_bias={"7": 5.0})
    assert openai_generate(probe, endpoint, **body)[0] == expected
    # -100 bans the greedy token, the probe's end-of-sequence: it runs to max_tokens
    text, answer = openai_generate(probe, endpoint, max_tokens=3, temperature=0, logit_bias={"0": -100})
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    path = ENDPOINTS[endpoint][0]
    for wrong in ({"x": 1.0}, {"-1": 1.0}, {"0": 101.0}, {"99999": 1.0}):
        assert refusal(post(probe, path, {**_required(endpoint), "logit_bias": wrong}))["param"] == "logit_bias"


def _min_p(demo, probe, tokenizers, endpoint):
    greedy = text_of(generate(demo, endpoint, max_tokens=12, temperature=0, ignore_eos=True))
    for seed in (1, 2):  # only the likeliest token is as likely as itself
        sampled = generate(demo, endpoint, max_tokens=12, temperature=1.0, min_p=1.0, seed=seed, ignore_eos=True)
        assert text_of(sampled) == greedy
    free = {text_of(generate(demo, endpoint, max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)) for s in (1, 2)}
    assert free - {greedy}, "temperature 1 alone never left the greedy path: min_p 1 proved nothing"
    zero = generate(demo, endpoint, max_tokens=12, temperature=1.0, min_p=0.0, seed=1, ignore_eos=True)
    assert text_of(zero) == text_of(generate(demo, endpoint, max_tokens=12, temperature=1.0, seed=1, ignore_eos=True))


def _min_tokens(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    # the probe says its end-of-sequence token first, unless min_tokens holds it back (and a stop token id)
    for extra in ({}, {"stop_token_ids": [1]}):
        held = ok(probe, path, {**_probing(endpoint), "max_tokens": 8, "min_tokens": 3, **extra})
        assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop", extra
    error = refusal(post(probe, path, {**_probing(endpoint), "max_tokens": 2, "min_tokens": 3}))
    assert error["param"] == "min_tokens"


def _allowed_token_ids(demo, probe, tokenizers, endpoint):
    expected, body = _probe_text(tokenizers, endpoint, [9, 9, 9], allowed_token_ids=[12, 9])
    assert openai_generate(probe, endpoint, **body)[0] == expected
    path = ENDPOINTS[endpoint][0]
    for wrong in ([], [99999]):
        error = refusal(post(probe, path, {**_required(endpoint), "allowed_token_ids": wrong}))
        assert error["param"] == "allowed_token_ids"


def _n(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    sampled = {"max_tokens": 8, "temperature": 1.5, "seed": 5, "extra_body": {"ignore_eos": True}}

    def ask(n: int, seed: int, prompt: Any = "Once upon a time", **fields: Any) -> Any:
        if endpoint == "completions":
            return client.completions.create(model="demo", prompt=prompt, n=n, **{**sampled, "seed": seed}, **fields)
        return client.chat.completions.create(model="demo", messages=CHAT, n=n, **{**sampled, "seed": seed}, **fields)

    def texts(answer: Any) -> list[str]:
        ordered = sorted(answer.choices, key=lambda c: c.index)
        return [c.text if endpoint == "completions" else c.message.content for c in ordered]

    three = ask(3, seed=5)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [ask(1, seed=5 + j) for j in range(3)]  # choice j draws from seed + j
    assert texts(three) == [texts(single)[0] for single in singles] and len(set(texts(three))) > 1
    # the prompt counts once, every choice's tokens count
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    if endpoint == "completions":  # choices prompt by prompt, n each
        two_by_two = ask(2, seed=5, prompt=["Once upon a time", "The river"])
        by_prompt = [texts(ask(2, seed=5, prompt=p)) for p in ("Once upon a time", "The river")]
        assert texts(two_by_two) == by_prompt[0] + by_prompt[1]
        parts = ask(3, seed=5, stream=True)
        streamed = ["", "", ""]
        for chunk in parts:
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
    else:
        parts = ask(3, seed=5, stream=True)
        streamed = ["", "", ""]
        for chunk in parts:
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts(three)
    path = ENDPOINTS[endpoint][0]
    for wrong in (0, 17):  # past server.max_choices_per_prompt (16)
        assert refusal(post(demo, path, {**_required(endpoint), "n": wrong}))["param"] == "n"


def _completions_logprobs(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(**ask, temperature=0, logprobs=3)
    found = greedy.choices[0].logprobs
    assert len(found.tokens) == len(found.token_logprobs) == greedy.usage.completion_tokens == 6
    assert "".join(found.tokens) == greedy.choices[0].text
    for token, logprob, top in zip(found.tokens, found.token_logprobs, found.top_logprobs, strict=True):
        assert len(top) in (3, 4) and top[token] == logprob  # the 3 likeliest and the token itself
        assert logprob == pytest.approx(max(top.values()), abs=1e-6) and logprob < 0  # greedy: the likeliest
    assert found.text_offset == [sum(map(len, found.tokens[:i])) for i in range(6)]
    only = client.completions.create(**ask, temperature=0, logprobs=0).choices[0].logprobs
    assert [list(top) for top in only.top_logprobs] == [[token] for token in only.tokens]
    assert client.completions.create(**ask, temperature=0).choices[0].logprobs is None
    streamed = client.completions.create(**ask, temperature=0, logprobs=3, stream=True)
    tokens, offsets = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert (tokens, offsets) == (found.tokens, found.text_offset)
    # the model's own log-probabilities, whatever the options that chose the token: the probe's
    # logits are all 0 (each token 1/vocab), here with one token forced by a bias
    expected, body = _probe_text(tokenizers, endpoint, [7, 7], logit_bias={"7": 50.0}, logprobs=1)
    text, answer = openai_generate(probe, endpoint, **body)
    uniform = -math.log(tokenizers["probe"].vocab_size)
    assert text == expected and answer.choices[0].logprobs.token_logprobs == pytest.approx([uniform] * 2, abs=1e-5)
    error = refusal(post(demo, "/v1/completions", {"prompt": "x", "logprobs": 21}))
    assert error["param"] == "logprobs" and "server.max_logprobs" in error["message"]


def _chat_logprobs(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "demo", "messages": CHAT, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    answer = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 5
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy: the likeliest
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert client.chat.completions.create(**ask, logprobs=False).choices[0].logprobs is None
    streamed = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [entry.token for entry in content]


def _chat_top_logprobs(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "demo", "messages": CHAT, "max_tokens": 3, "logprobs": True}
    for k in (0, 1, 5):
        content = client.chat.completions.create(**ask, top_logprobs=k).choices[0].logprobs.content
        assert [len(entry.top_logprobs) for entry in content] == [k] * len(content)
    for k in (21, -1):
        error = refusal(post(demo, "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": k}))
        assert error["param"] == "top_logprobs"


def _echo(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "demo", "temperature": 0, "extra_body": {"ignore_eos": True}}
    prompt = "Once upon a time"
    free = client.completions.create(**ask, prompt=prompt, max_tokens=4).choices[0].text
    assert client.completions.create(**ask, prompt=prompt, max_tokens=4, echo=True).choices[0].text == prompt + free
    ids = tokenizers["demo"].encode(prompt, add_special_tokens=True)
    by_ids = client.completions.create(**ask, prompt=ids, max_tokens=4, echo=True).choices[0].text
    assert by_ids == tokenizers["demo"].decode(ids, skip_special_tokens=False) + free
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**ask, prompt=prompt, max_tokens=4, echo=True, stream=True)
        if c.choices
    )
    assert streamed == prompt + free
    # scoring a prompt (lm-eval's loglikelihood): echo, logprobs, nothing generated
    scored = client.completions.create(**ask, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert choice.logprobs.tokens == tokenizers["demo"].token_texts(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:]) and len(choice.logprobs.top_logprobs[1]) in (1, 2)
    assert choice.logprobs.text_offset == [sum(map(len, choice.logprobs.tokens[:i])) for i in range(len(ids))]
    # with generated tokens after the prompt's
    both = client.completions.create(**ask, prompt=prompt, max_tokens=3, echo=True, logprobs=1).choices[0].logprobs
    assert both.tokens[: len(ids)] == choice.logprobs.tokens and len(both.tokens) == len(ids) + 3
    assert both.token_logprobs[0] is None
    assert both.token_logprobs[1 : len(ids)] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-5)
    error = refusal(post(demo, "/v1/completions", {"prompt": prompt, "max_tokens": 0}))
    assert error["param"] == "max_tokens"


def _chat_echo(demo, probe, tokenizers, endpoint):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    opened = [*CHAT, {"role": "assistant", "content": "Once upon"}]
    ask = {
        "model": "demo",
        "max_tokens": 4,
        "temperature": 0,
        "extra_body": {"continue_final_message": True, "add_generation_prompt": False},
    }
    free = client.chat.completions.create(messages=opened, **ask).choices[0].message.content
    echoed = {**ask, "extra_body": {**ask["extra_body"], "echo": True}}
    assert client.chat.completions.create(messages=opened, **echoed).choices[0].message.content == "Once upon" + free
    streamed = client.chat.completions.create(messages=opened, **echoed, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Once upon" + free
    # the last message is the user's: nothing to begin with
    plain = {"model": "demo", "max_tokens": 4, "temperature": 0}
    alone = client.chat.completions.create(messages=CHAT, **plain).choices[0].message.content
    assert (
        client.chat.completions.create(messages=CHAT, **plain, extra_body={"echo": True}).choices[0].message.content
        == alone
    )


def _prompt_logprobs(demo, probe, tokenizers, endpoint):
    path = ENDPOINTS[endpoint][0]
    answer = generate(demo, endpoint, max_tokens=1, prompt_logprobs=2)
    found = answer["choices"][0]["prompt_logprobs"] if endpoint == "completions" else answer["prompt_logprobs"]
    assert len(found) == answer["usage"]["prompt_tokens"] and found[0] is None
    for entry in found[1:]:
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert 2 <= len(entry) <= 3 and [e["rank"] for e in ranked][:2] == [1, 2]  # the token and the two likeliest
        assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values())
        assert ranked[0]["logprob"] >= ranked[1]["logprob"]
    plain = generate(demo, endpoint, max_tokens=1)
    assert "prompt_logprobs" not in plain and "prompt_logprobs" not in plain["choices"][0]
    # streamed: in one chunk, the choice's (completions) or the answer's (chat), as in the whole answer
    body = {**_required(endpoint), "max_tokens": 3, "prompt_logprobs": 2, "stream": True}
    with httpx.Client(base_url=demo.url, timeout=60) as http, http.stream("POST", path, json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    carried = [
        e["choices"][0]["prompt_logprobs"] if endpoint == "completions" else e["prompt_logprobs"]
        for e in events
        if "prompt_logprobs" in e or (e["choices"] and "prompt_logprobs" in e["choices"][0])
    ]
    assert carried == [found]
    error = refusal(post(demo, path, {**_required(endpoint), "prompt_logprobs": 21}))
    assert error["param"] == "prompt_logprobs"


def _bad_words(demo, probe, tokenizers, endpoint):
    probe_tokens = tokenizers["probe"]
    # b: a token whose text twice is two tokens b (no merge), so "bb" is a two-token bad word
    a, b = next(
        (a, b)
        for a, b in zip(_probe_ids(tokenizers, endpoint, 40), _probe_ids(tokenizers, endpoint, 40)[1:], strict=False)
        if probe_tokens.encode(probe_tokens.decode([b]) * 2, add_special_tokens=False) == [b, b]
        and probe_tokens.encode(probe_tokens.decode([b]), add_special_tokens=False) == [b]
    )
    bias = {str(a): 4.0, str(b): 5.0}  # b is the likeliest, then a
    word = probe_tokens.decode([b])
    for words, ids in (([], [b, b, b, b]), ([word], [a, a, a, a]), ([word * 2], [b, a, b, a])):
        expected, body = _probe_text(tokenizers, endpoint, ids, logit_bias=bias, bad_words=words)
        assert openai_generate(probe, endpoint, **body)[0] == expected, words


# Constraints: the demo model is random, so an answer that matches is the grammar's doing
# (tests/test_structured_outputs.py goes further: more seeds, schemas, streams, errors).
CODE = r"[A-Z]{2}-\d{3}"
ITEM = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}
EXPR = 'root ::= "<" [a-c] [0-9] ">"'


def _constrained(field: str, value: Any, matches: Callable[[str], Any]) -> Callable[..., None]:
    def check(demo, probe, tokenizers, endpoint):
        for seed in range(3):
            text, answer = openai_generate(demo, endpoint, **{field: value}, temperature=1.0, seed=seed, max_tokens=120)
            assert answer.choices[0].finish_reason == "stop" and matches(text), (field, seed, text)
        free = [openai_generate(demo, endpoint, temperature=1.0, seed=seed, max_tokens=8)[0] for seed in range(3)]
        assert not all(matches(text) for text in free)  # without it, the model writes something else

    return check


def _is_item(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if not isinstance(value, dict) or set(value) != {"id", "ok"}:
        return False
    return 1 <= value["id"] <= 9 and isinstance(value["ok"], bool)


_response_format = _constrained(
    "response_format", {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}, _is_item
)
_structured_outputs = _constrained("structured_outputs", {"choice": ["left", "right"]}, {"left", "right"}.__contains__)
_guided_json = _constrained("guided_json", ITEM, _is_item)
_guided_regex = _constrained("guided_regex", CODE, lambda text: re.fullmatch(CODE, text))
_guided_choice = _constrained("guided_choice", ["up", "down"], {"up", "down"}.__contains__)
_guided_grammar = _constrained("guided_grammar", EXPR, lambda text: re.fullmatch(r"<[a-c]\d>", text))
_regex = _constrained("regex", CODE, lambda text: re.fullmatch(CODE, text))
_json_schema = _constrained("json_schema", json.dumps(ITEM), _is_item)
_ebnf = _constrained("ebnf", EXPR, lambda text: re.fullmatch(r"<[a-c]\d>", text))


TOOL_ARGS = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
TOOL_SET = [{"type": "function", "function": {"name": name, "parameters": TOOL_ARGS}} for name in ("ping", "pong")]


def _calls(demo, **fields: Any) -> list[list[tuple[str, dict]]]:
    """The tool calls of the demo's chat answers, per seed (tests/test_tools.py goes further)."""
    answers = [
        openai_generate(demo, "chat", temperature=1.0, seed=seed, max_tokens=400, **fields)[1] for seed in range(3)
    ]
    return [
        [(c.function.name, json.loads(c.function.arguments)) for c in answer.choices[0].message.tool_calls or []]
        for answer in answers
    ]


def _tools(demo, probe, tokenizers, endpoint):
    # a forced call is to one of the tools given, with arguments they define
    for tools in (TOOL_SET, TOOL_SET[1:]):
        for calls in _calls(demo, tools=tools, tool_choice="required"):
            assert calls and all(name in {t["function"]["name"] for t in tools} for name, _args in calls), calls
            assert all(0 <= args["n"] <= 9 for _name, args in calls)


def _tool_choice(demo, probe, tokenizers, endpoint):
    named = {"type": "function", "function": {"name": "pong"}}
    assert all([name for name, _args in calls] == ["pong"] for calls in _calls(demo, tools=TOOL_SET, tool_choice=named))
    assert _calls(demo, tools=TOOL_SET, tool_choice="none") == [[], [], []]


def _parallel_tool_calls(demo, probe, tokenizers, endpoint):
    one = _calls(demo, tools=TOOL_SET, tool_choice="required", parallel_tool_calls=False)
    assert all(len(calls) == 1 for calls in one), one


HONOURED: dict[str, Callable[..., None]] = {
    "model": _model,
    "max_tokens": _max_tokens,
    "chat.max_completion_tokens": _max_completion_tokens,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _seed,
    "n": _n,
    "completions.logprobs": _completions_logprobs,
    "chat.logprobs": _chat_logprobs,
    "chat.top_logprobs": _chat_top_logprobs,
    "completions.echo": _echo,
    "chat.echo": _chat_echo,
    "prompt_logprobs": _prompt_logprobs,
    "presence_penalty": _presence_penalty,
    "frequency_penalty": _frequency_penalty,
    "repetition_penalty": _repetition_penalty,
    "logit_bias": _logit_bias,
    "min_p": _min_p,
    "min_tokens": _min_tokens,
    "allowed_token_ids": _allowed_token_ids,
    "bad_words": _bad_words,
    "stop": _stop,
    "include_stop_str_in_output": _include_stop_str_in_output,
    "stop_token_ids": _stop_token_ids,
    "ignore_eos": _ignore_eos,
    "skip_special_tokens": _skip_special_tokens,
    "truncate_prompt_tokens": _truncate_prompt_tokens,
    "stream": _stream,
    "stream_options": _stream_options,
    "priority": _priority,
    "completions.prompt": _prompt,
    "completions.add_special_tokens": _completions_add_special_tokens,
    "chat.messages": _messages,
    "chat.add_generation_prompt": _add_generation_prompt,
    "chat.continue_final_message": _continue_final_message,
    "chat.add_special_tokens": _chat_add_special_tokens,
    "chat.chat_template_kwargs": _chat_template_kwargs,
    "chat.documents": _documents,
    "response_format": _response_format,
    "structured_outputs": _structured_outputs,
    "guided_json": _guided_json,
    "guided_regex": _guided_regex,
    "guided_choice": _guided_choice,
    "guided_grammar": _guided_grammar,
    "regex": _regex,
    "json_schema": _json_schema,
    "ebnf": _ebnf,
    "chat.tools": _tools,
    "chat.tool_choice": _tool_choice,
    "chat.parallel_tool_calls": _parallel_tool_calls,
}


def _check_for(endpoint: str, name: str) -> Callable[..., None] | None:
    return HONOURED.get(f"{endpoint}.{name}") or HONOURED.get(name)


def test_every_honoured_field_has_a_check():
    missing = [row_id(row) for row in rows("honoured") if _check_for(row[0], row[1].name) is None]
    assert not missing, f"honoured fields without a behaviour check: {missing}"


@pytest.mark.parametrize("row", rows("honoured"), ids=row_id)
def test_honoured_field_does_what_it_says(demo, probe, demo_tokenizer, probe_tokenizer, row):
    endpoint, info = row
    check = _check_for(endpoint, info.name)
    assert check is not None
    check(demo, probe, {"demo": demo_tokenizer, "probe": probe_tokenizer}, endpoint)
