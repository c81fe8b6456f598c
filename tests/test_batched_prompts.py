"""Several prompts in one completions request, and request ids that clients reuse.

Every comparison is against the same prompt sent alone, greedy, on the same daemon:
a batched prompt must get exactly the tokens it would get by itself.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from harness.daemons import RunningDaemon, serving

PROMPTS = ["Once upon a time", "The river", "In a hole in the ground"]
TOKEN_PROMPTS = [[5, 17, 300, 41], [9, 9, 200], [77, 1, 2, 3, 4, 5]]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    settings = {"server.max_prompts_per_request": 8}
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alone(client) -> dict[str, tuple[str, int, int]]:
    """Each prompt's greedy text, prompt tokens and completion tokens, sent by itself."""
    results = {}
    for prompt in [*PROMPTS, *TOKEN_PROMPTS]:
        done = client.completions.create(model="demo", prompt=prompt, extra_body={"ignore_eos": True}, **_sampling())
        results[json.dumps(prompt)] = (done.choices[0].text, done.usage.prompt_tokens, done.usage.completion_tokens)
    return results


def _sampling() -> dict:
    return {"max_tokens": GREEDY["max_tokens"], "temperature": 0}


@pytest.mark.parametrize("prompts", [PROMPTS, TOKEN_PROMPTS], ids=["strings", "token-id-lists"])
def test_a_batch_answers_each_prompt_as_if_alone(client, alone, prompts):
    done = client.completions.create(model="demo", prompt=prompts, extra_body={"ignore_eos": True}, **_sampling())
    assert [c.index for c in done.choices] == list(range(len(prompts)))
    assert [c.text for c in done.choices] == [alone[json.dumps(p)][0] for p in prompts]
    assert all(c.finish_reason == "length" for c in done.choices)
    assert done.usage.prompt_tokens == sum(alone[json.dumps(p)][1] for p in prompts)
    assert done.usage.completion_tokens == sum(alone[json.dumps(p)][2] for p in prompts)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


@pytest.mark.parametrize("prompts", [PROMPTS, TOKEN_PROMPTS], ids=["strings", "token-id-lists"])
def test_a_streamed_batch_tags_every_chunk_with_its_prompt(client, alone, prompts):
    stream = client.completions.create(
        model="demo",
        prompt=prompts,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **_sampling(),
    )
    texts, finishes, usage = [""] * len(prompts), [None] * len(prompts), None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert finishes[choice.index] is None, "a chunk came after its prompt's last one"
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason
    assert texts == [alone[json.dumps(p)][0] for p in prompts]
    assert finishes == ["length"] * len(prompts)
    assert usage is not None and usage.completion_tokens == sum(alone[json.dumps(p)][2] for p in prompts)


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_batched_prompts_over_httpx(daemon, alone, http2):
    body = {"prompt": PROMPTS, **GREEDY}
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=60) as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    choices = response.json()["choices"]
    assert {c["index"]: c["text"] for c in choices} == {i: alone[json.dumps(p)][0] for i, p in enumerate(PROMPTS)}


def test_async_client_sends_batches_concurrently(daemon, alone):
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0) as client:
            calls = [
                client.completions.create(model="demo", prompt=p, extra_body={"ignore_eos": True}, **_sampling())
                for p in (PROMPTS, TOKEN_PROMPTS, PROMPTS[::-1])
            ]
            return await asyncio.gather(*calls)

    for prompts, done in zip((PROMPTS, TOKEN_PROMPTS, PROMPTS[::-1]), asyncio.run(run()), strict=True):
        assert [c.text for c in done.choices] == [alone[json.dumps(p)][0] for p in prompts]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "non-empty"),
        (["a", [1, 2]], "list of strings or of token-id lists"),
        ([[1, 2], []], "list of strings or of token-id lists"),
        ([True, 1], "list of strings or of token-id lists"),
        (["p"] * 9, "at most 8 prompts"),
    ],
    ids=["empty", "mixed", "empty-ids", "booleans", "too-many"],
)
def test_malformed_batches_are_refused_naming_prompt(daemon, prompt, message):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and message in error["message"] and error["type"] == "invalid_request_error"


def test_one_prompt_too_long_refuses_the_whole_batch(daemon):
    too_long = [5] * 5000  # the demo model's context is shorter
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        response = http.post("/v1/completions", json={"prompt": [[1, 2, 3], too_long], "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    assert "maximum context length" in response.json()["error"]["message"]


# --- request identity --------------------------------------------------------------------------


async def _same_id_concurrently(url: str, http2: bool, prompts: list[str], stream: bool) -> list[tuple[str, str]]:
    """Send `prompts` at once, all with one X-Request-Id; each answer's text and echoed id."""
    async with httpx.AsyncClient(base_url=url, http2=http2, http1=not http2, timeout=60) as http:

        async def one(prompt: str) -> tuple[str, str]:
            body = {"prompt": prompt, **GREEDY, "max_tokens": 24, "stream": stream}
            headers = {"X-Request-Id": "retried-by-a-proxy"}
            if not stream:
                response = await http.post("/v1/completions", json=body, headers=headers)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"], response.headers["x-request-id"]
            text = ""
            async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
                return text, response.headers["x-request-id"]

        return await asyncio.gather(*(one(p) for p in prompts))


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_concurrent_requests_with_one_id_each_get_their_own_tokens(daemon, client, count, http2, stream):
    prompts = PROMPTS[:count]
    expected = []
    for prompt in prompts:
        done = client.completions.create(
            model="demo", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        expected.append(done.choices[0].text)
    answers = asyncio.run(_same_id_concurrently(daemon.url, http2, prompts, stream))
    assert [text for text, _echo in answers] == expected
    assert {echo for _text, echo in answers} == {"retried-by-a-proxy"}
