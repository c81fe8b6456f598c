"""Prefix caching through the real daemon: greedy outputs are those of a daemon without it, while
a cache too small for every running request evicts cached prefixes and preempts, with prompts
prefilled in small chunks; the cache's figures in /metrics, and the prompt tokens found in the
cache in each response's usage.

The batcher's exact behaviour (which tokens are computed, when a block is shared) is tested
without processes in test_batching.py, the bookkeeping in test_blocks.py and the engine's
logits in test_engine.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from harness.daemons import RunningDaemon, serving
from harness.metrics import metric, scrape, wait_engine_idle
from harness.wait import until

# A cache of 16 blocks of 16 tokens, for requests of up to 150 tokens: a few running requests fill it.
SMALL_CACHE = {
    "model.context_length": 256,
    "scheduler.max_total_tokens": 256,
    "scheduler.chunked_prefill_size": 32,
}
PREFIX = [(37 * i + 11) % 1000 + 4 for i in range(96)]  # six whole blocks
PROMPTS = [PREFIX + [(53 * n + 7 * j) % 1000 + 4 for j in range(5 + 3 * n)] for n in range(8)]
MAX_TOKENS = 40  # long enough that requests running together outgrow the cache (preemption)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("cached"), model_cache, SMALL_CACHE) as running:
        yield running


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, model_cache) -> RunningDaemon:
    settings = SMALL_CACHE | {"scheduler.enable_prefix_caching": False}
    with serving(tmp_path_factory.mktemp("uncached"), model_cache, settings) as running:
        yield running


def complete(daemon: RunningDaemon, prompt: list[int], max_tokens: int = MAX_TOKENS, **fields) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **fields}
    response = httpx.post(daemon.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def text(answer: dict) -> str:
    return answer["choices"][0]["text"]


def cache_figures(daemon: RunningDaemon) -> tuple[float, float, float]:
    return (
        metric(daemon, "daemon_prefix_cache_queried_tokens_total"),
        metric(daemon, "daemon_prefix_cache_hit_tokens_total"),
        metric(daemon, "daemon_prefix_cache_blocks"),
    )


def figures_after(daemon: RunningDaemon, queried: float) -> tuple[float, float, float]:
    """The cache figures of the first stats the scheduler sent with more than `queried` tokens
    looked up and nothing left running or queued (the front-end hears them every 0.5 s)."""

    def settled() -> tuple[float, float, float] | None:
        samples = scrape(daemon)
        idle = samples[("daemon_running_requests", ())] == 0 and samples[("daemon_queued_requests", ())] == 0
        figures = cache_figures(daemon)
        return figures if idle and figures[0] > queried else None

    return until(settled, 10, what="the scheduler's figures after the requests")


@pytest.fixture(scope="module")
def expected(uncached: RunningDaemon) -> list[str]:
    """Each prompt alone, nothing cached."""
    return [text(complete(uncached, prompt)) for prompt in PROMPTS]


def test_concurrent_prompts_sharing_a_prefix_get_the_outputs_computed_without_the_cache(cached, expected):
    """All at once, in a cache that holds two or three of them: prefixes are shared, evicted,
    prefilled in chunks of 32, and running requests preempted, without changing a token."""
    wait_engine_idle(cached, 30)  # the readiness probe's lookup is counted
    queried_before, hits_before, _blocks = cache_figures(cached)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: complete(cached, prompt), PROMPTS))
    assert [text(a) for a in answers] == expected
    queried, hits, blocks = figures_after(cached, queried_before + sum(map(len, PROMPTS)) - 1)
    # Each admission looks its prompt up: more lookups than prompt tokens means some requests were
    # admitted again, that is preempted (a readmission also counts the tokens it had generated).
    assert queried - queried_before > sum(map(len, PROMPTS)), "nothing was preempted"  # (not waited for)
    assert hits - hits_before >= len(PREFIX) and blocks > 0


# Penalties that weigh the prompt's tokens (repetition) and the output's (frequency, presence), on
# prompts of a prefix of their own (as PROMPTS: fresh, it is computed once and found by the others)
PENALTIES = {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3}
PENALISED_PREFIX = [(31 * i + 7) % 1000 + 4 for i in range(96)]
PENALISED_PROMPTS = [PENALISED_PREFIX + prompt[len(PREFIX) :] for prompt in PROMPTS]


def test_penalised_outputs_are_the_same_when_the_prompt_came_from_the_cache_and_after_preemption(cached, uncached):
    """The worker counts what each sequence has seen from its whole prompt, cached part included,
    and recomputation after a preemption counts nothing twice."""
    alone = [text(complete(uncached, prompt, **PENALTIES)) for prompt in PENALISED_PROMPTS]
    plain = [text(complete(uncached, prompt)) for prompt in PENALISED_PROMPTS]
    assert alone != plain, "the penalties changed nothing"
    wait_engine_idle(cached, 30)
    queried_before, hits_before, _blocks = cache_figures(cached)
    with ThreadPoolExecutor(len(PENALISED_PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: complete(cached, prompt, **PENALTIES), PENALISED_PROMPTS))
    assert [text(a) for a in answers] == alone
    prompt_tokens = sum(map(len, PENALISED_PROMPTS))
    queried, hits, _blocks = figures_after(cached, queried_before + prompt_tokens - 1)
    assert hits - hits_before >= len(PENALISED_PREFIX), "no prompt found its prefix in the cache"
    assert queried - queried_before > prompt_tokens, "nothing was preempted"


def test_the_choices_of_one_prompt_prefill_it_once(cached):
    """n = 4: the first choice computes the prompt's full blocks, the other three find them cached."""
    prompt = [(29 * i + 17) % 1000 + 4 for i in range(100)]  # six full blocks no other test asks for
    wait_engine_idle(cached, 30)
    queried, hits, _blocks = cache_figures(cached)
    body = {"prompt": prompt, "max_tokens": 8, "n": 4, "temperature": 1.0, "seed": 1, "ignore_eos": True}
    response = httpx.post(cached.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 4
    after = figures_after(cached, queried + 4 * len(prompt) - 1)
    assert after[1] - hits >= 3 * 96


def test_the_same_prompt_asked_again_is_answered_the_same_from_the_cache(cached, expected):
    queried, hits, _blocks = cache_figures(cached)
    assert text(complete(cached, PROMPTS[3])) == expected[3]
    assert text(complete(cached, PROMPTS[3])) == expected[3]  # the second time at least its prefix is found
    after = figures_after(cached, queried + 2 * len(PROMPTS[3]) - 1)
    assert after[1] - hits >= len(PREFIX)
    assert after[2] > 0


def test_the_uncached_daemon_counts_no_lookups(uncached, expected):
    assert cache_figures(uncached) == (0, 0, 0)


def test_the_second_request_of_a_shared_prefix_reports_its_cached_tokens(cached):
    prefix = [(41 * i + 3) % 1000 + 4 for i in range(64)]  # four blocks never asked before
    first = complete(cached, prefix + [5, 6, 7], max_tokens=2)
    second = complete(cached, prefix + [8, 9], max_tokens=2)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert second["usage"]["prompt_tokens"] == 66  # still every prompt token


def test_chat_and_streamed_usage_report_cached_tokens(cached):
    client = openai.OpenAI(base_url=cached.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [
        {"role": "system", "content": "Answer in one short sentence, and be kind. " * 3},
        {"role": "user", "content": "hello"},
    ]
    first = client.chat.completions.create(model="demo", messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(model="demo", messages=messages, max_tokens=2, temperature=0)
    cached_tokens = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached_tokens < again.usage.prompt_tokens and cached_tokens % 16 == 0
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens == cached_tokens


def test_the_uncached_daemon_reports_no_cached_tokens(uncached):
    answer = complete(uncached, PROMPTS[0], max_tokens=2)
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def step_figures(daemon: RunningDaemon) -> dict[str, tuple[float, float, float]]:
    """(steps, seconds, tokens) of the engine's steps by kind, as /metrics reports them."""
    samples = scrape(daemon)
    return {
        kind: tuple(
            samples[(f"daemon_engine_{name}_total", (("kind", kind),))]
            for name in ("steps", "step_seconds", "step_tokens")
        )
        for kind in ("prefill", "decode")
    }


def test_engine_step_figures_count_the_prompt_tokens_computed_and_the_tokens_decoded(tmp_path, model_cache):
    """A 40-token prompt is prefilled in one step (the chunk size is 2,048) and samples the first
    of 8 tokens; the 7 others take a decode step each. Asked again, its first two blocks (32
    tokens) come from the cache: 8 prompt tokens are computed."""
    prompt = [(29 * i + 3) % 1000 + 4 for i in range(40)]
    with serving(tmp_path, model_cache, {"model.context_length": 256}) as daemon:
        # the readiness probe (/health_generate: one token, one prefill step) ran before we were
        # given the daemon: once it is counted, nothing else runs until our requests
        before = until(lambda: (f := step_figures(daemon))["prefill"][0] >= 1 and f, 10, what="the probe's step")
        assert before["prefill"][0] == 1 and before["decode"] == (0, 0, 0), before

        def grown(decoded: int) -> dict[str, tuple[float, float, float]]:
            """The figures since `before`, once `decoded` tokens were decoded."""
            now = until(lambda: (f := step_figures(daemon))["decode"][2] >= decoded and f, 10, what="the steps")
            return {kind: tuple(a - b for a, b in zip(now[kind], before[kind], strict=True)) for kind in now}

        complete(daemon, prompt, max_tokens=8)
        first = grown(7)
        assert first["prefill"][0] == 1 and first["prefill"][2] == 40, first
        assert first["decode"][0] == 7 and first["decode"][2] == 7, first
        assert first["prefill"][1] > 0 and first["decode"][1] > 0, first
        assert complete(daemon, prompt, max_tokens=8)["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        again = grown(14)
        assert again["prefill"][0] == 2 and again["prefill"][2] == 40 + 8, again
        assert again["decode"][0] == 14 and again["decode"][2] == 14, again
