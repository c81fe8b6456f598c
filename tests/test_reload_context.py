"""Every tier agrees on the context the model worker serves (issue 11), when a reload changes
model.context_length.

The worker, which loads the model, derives the context it serves and announces it; the tokenizer's
early checks (its token count and its byte bound), /tokenize and /v1/models follow that
announcement, and the scheduler refuses by it. So the limit a client meets is the new one as soon
as `daemon reload` answers, up or down, whichever way the worker is replaced (drain or blue-green).
Checked over HTTP/1.1 and HTTP/2 (h2c), on one daemon that reloads only when asked.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest
from harness.daemons import short_dir
from harness.procs import free_port
from harness.reloadable import RELOAD_TIMEOUT_S, Reloadable, running, server_toml_settings
from harness.wait import until

from daemon.engine.demo_model import ensure_demo_model
from daemon.tokenizer.loading import PromptText, TextTokenizer, load_text_tokenizer

pytestmark = pytest.mark.timeout(300)

LOW, HIGH = 256, 1024
PROMPT_WORDS = 400  # each word below is one token of the demo tokenizer: prompts of 401 tokens with BOS
MAX_TOKENS = 4
# How each prompt below is refused at the LOW context: by the byte bound, or once tokenized.
REFUSED_BY = {"bytes": "bytes long, more than", "tokens": f"your prompt has {PROMPT_WORDS + 1} tokens"}


@pytest.fixture(scope="module")
def demo(model_cache) -> TextTokenizer:
    return load_text_tokenizer(ensure_demo_model(model_cache))


@pytest.fixture(scope="module")
def prompts(demo: TextTokenizer) -> dict[str, str]:
    """Two prompts of about 400 tokens: one refused at the LOW context by its byte length alone, before it
    is tokenized; one short enough in bytes to be tokenized, then refused by its token count."""
    chosen = {"bytes": " remembered" * PROMPT_WORDS, "tokens": " stranger" * PROMPT_WORDS}
    low_bound = demo.max_prompt_bytes(LOW - 1)
    assert low_bound is not None, "the demo tokenizer no longer gives a byte bound"
    assert len(chosen["bytes"].encode()) > low_bound >= len(chosen["tokens"].encode()), low_bound
    assert len(chosen["bytes"].encode()) <= demo.max_prompt_bytes(HIGH - 1)
    for text in chosen.values():
        assert LOW < len(demo.tokenize(PromptText(text, True))) < HIGH
    return chosen


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> Iterator[Reloadable]:
    """The demo model (2048 tokens of context unless model.context_length says less); reloads when asked."""
    runtime_dir = short_dir()
    settings = server_toml_settings(free_port(), runtime_dir, model_cache, runtime={"watch_config": False})
    with running(tmp_path_factory.mktemp("context") / "etc", settings, runtime_dir) as handle:
        yield handle


def reload_context(handle: Reloadable, context_length: int, mode: str) -> None:
    """`daemon reload` to model.context_length = `context_length`, the worker replaced in `mode`."""
    handle.write({"model.context_length": context_length, "runtime.model_reload": mode})
    status, report, output = handle.reload_command()
    assert status == 0 and report is not None, output
    assert report["result"] == "applied" and report["restarted"] == ["worker"], report
    assert f"the model worker was replaced in {mode} mode" in report["notes"], report


def assert_serves(handle: Reloadable, prompts: dict[str, str], context: int, *, accepted: bool) -> None:
    """Over both protocols: /v1/models and /tokenize say `context`, and both prompts are served (accepted)
    or refused with a 400 that names `context`."""
    for http2 in (False, True):
        with handle.client(http2) as client:
            models = client.get("/v1/models").raise_for_status()
            assert models.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert models.json()["data"][0]["max_model_len"] == context, models.json()
            tokenized = client.post("/tokenize", json={"prompt": "hello"}).raise_for_status().json()
            assert tokenized["max_model_len"] == context, tokenized
            for kind, prompt in prompts.items():
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
                response = client.post("/v1/completions", json=body)
                where = f"{kind} prompt over {response.http_version}, context {context}: {response.text[:400]}"
                if accepted:
                    assert response.status_code == 200, where
                    usage = response.json()["usage"]
                    assert usage["prompt_tokens"] == PROMPT_WORDS + 1, where
                    assert usage["completion_tokens"] == MAX_TOKENS, where
                else:
                    assert response.status_code == 400, where
                    error = response.json()["error"]
                    assert f"maximum context length is {context} tokens" in error["message"], where
                    assert REFUSED_BY[kind] in error["message"], where  # which check refused it
                    assert error["param"] == "prompt", where


@pytest.mark.parametrize("mode", ["drain", "blue_green"])
def test_context_length_reload_reaches_every_tier(daemon, prompts, mode):
    """Lowered to LOW, raised to HIGH, lowered again: each limit holds from the moment the reload answers,
    in every tier, with the error naming it (never the previous one)."""
    handle = daemon
    handle.reset()
    try:
        reload_context(handle, LOW, mode)
        assert_serves(handle, prompts, LOW, accepted=False)
        reload_context(handle, HIGH, mode)  # raised: what the old limit refused now runs
        assert_serves(handle, prompts, HIGH, accepted=True)
        reload_context(handle, LOW, mode)  # lowered: refused again, by the new limit
        assert_serves(handle, prompts, LOW, accepted=False)
    finally:
        handle.reset()


def test_unset_context_length_serves_the_model_maximum(daemon, prompts):
    """Back to unset by a reload: every tier serves the model's own maximum again (2048 for the demo)."""
    handle = daemon
    handle.reset()
    try:
        reload_context(handle, LOW, "drain")
        handle.write({"model.context_length": None})
        status, report, output = handle.reload_command()
        assert status == 0 and report["result"] == "applied", output
        assert_serves(handle, prompts, 2048, accepted=True)
    finally:
        handle.reset()


def test_tokenizer_restarted_while_no_worker_serves_learns_the_context_when_one_does(daemon, prompts):
    """The worker and the tokenizer die together: the new tokenizer may start before any worker serves,
    and so know no context; it learns the new worker's when that one comes up (never a default)."""
    handle = daemon
    handle.reset()
    try:
        reload_context(handle, LOW, "drain")
        pids = handle.daemon.tier_pids()
        mark = handle.log.mark()
        os.kill(pids["worker-0"], signal.SIGKILL)
        os.kill(pids["tokenizer-0"], signal.SIGKILL)
        handle.log.wait("tier.ready", since=mark, timeout=RELOAD_TIMEOUT_S, tier="tokenizer")
        handle.log.wait("scheduler.worker_up", since=mark, timeout=RELOAD_TIMEOUT_S)
        until(
            lambda: (
                handle.log.since(mark, "tokenizer.context", context=LOW)
                or handle.log.since(mark, "tokenizer.ready", context=LOW)
            ),
            RELOAD_TIMEOUT_S,
            what="the new tokenizer knows the new worker's context",
        )
        assert_serves(handle, prompts, LOW, accepted=False)
    finally:
        handle.reset()


def test_request_held_through_a_lowering_is_refused_by_the_new_limit(daemon, prompts):
    """Drain mode: a request that comes while the worker is replaced was checked by the tokenizer against
    the old limit, and waits for the new worker; the scheduler, which holds the new worker's limit,
    refuses it, in the same words as the tokenizer, naming the new limit."""
    handle = daemon
    handle.reset()
    try:
        reload_context(handle, HIGH, "drain")
        handle.write({"model.context_length": LOW, "runtime.model_reload": "drain"})
        mark = handle.log.mark()
        reloaded: list[tuple[int, dict | None, str]] = []
        reloading = threading.Thread(target=lambda: reloaded.append(handle.reload_command()), daemon=True)
        reloading.start()
        handle.log.wait("scheduler.hold", since=mark, timeout=RELOAD_TIMEOUT_S)
        body = {"prompt": prompts["tokens"], "max_tokens": MAX_TOKENS, "ignore_eos": True}
        answers: dict[bool, httpx.Response | Exception] = {}

        def ask(http2: bool) -> None:
            try:
                with handle.client(http2) as client:
                    answers[http2] = client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                answers[http2] = exc

        clients = [threading.Thread(target=ask, args=(http2,), daemon=True) for http2 in (False, True)]
        for client in clients:
            client.start()
        for thread in [*clients, reloading]:
            thread.join(RELOAD_TIMEOUT_S + 30)
        assert reloaded and set(answers) == {False, True}, f"no answer in time: {reloaded} {answers}"
        ((status, report, output),) = reloaded
        assert status == 0 and report["result"] == "applied", output
        held = handle.log.since(mark, "scheduler.hold_ended")
        assert held and held[0]["waited"] >= 2, f"the requests did not wait for the new worker: {held}"
        for http2, response in answers.items():
            assert isinstance(response, httpx.Response) and response.status_code == 400, (http2, response)
            message = response.json()["error"]["message"]
            assert message.startswith(f"This model's maximum context length is {LOW} tokens."), message
            assert REFUSED_BY["tokens"] in message, message
        assert_serves(handle, prompts, LOW, accepted=False)
    finally:
        handle.reset()
