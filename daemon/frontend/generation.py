"""One generation request through the tokenizer pool: its prompts run together, answered as one response.

A completions request may carry several prompts; each becomes its own engine request
(its own id, scheduled like any other) and its own choice. They succeed or fail
together: the first error aborts the others and is the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec

from daemon.frontend import metrics
from daemon.frontend.asgi import Headers, Send, end_events, error_body, send_error, send_event, send_json, start_events
from daemon.frontend.gateway import Gateway
from daemon.frontend.response_models import Responder
from daemon.ipc.messages import ErrorInfo, GenerateOutput, GenerateRequest, OutputLogprob


class _Failed(Exception):
    def __init__(self, error: ErrorInfo):
        super().__init__(error.message)
        self.error = error


class Generation:
    def __init__(self, gateway: Gateway, requests: list[GenerateRequest], responder: Responder, headers: Headers):
        self.gateway = gateway
        self.requests = requests
        self.responder = responder
        self.headers = headers
        self.started = time.monotonic()
        self.first: float | None = None  # when the first output came

    async def respond(self, send: Send) -> None:
        """Wait for every prompt's whole text, then answer once."""
        failure: ErrorInfo | None = None
        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels (aborts) the others
                tasks = [group.create_task(self._collect(request)) for request in self.requests]
        except* _Failed as failed:
            failure = failed.exceptions[0].error
        if failure is not None:
            return await send_error(send, failure, self.headers)
        results = [task.result() for task in tasks]
        self._observe([last for _text, last, _logprobs in results])
        await send_json(send, 200, self.responder.full(results), self.headers)

    async def stream(self, send: Send, include_usage: bool, continuous_usage: bool = False) -> None:
        """Server-sent events: each prompt's text deltas as they come, tagged with its choice index.

        The stream opens once every prompt has its first output, so a request refused before
        anything was generated (a prompt too long, say) still gets a plain error response.
        """
        streams = [self.gateway.generate(request) for request in self.requests]
        try:
            firsts = await asyncio.gather(*(anext(stream) for stream in streams))
            self.first = time.monotonic()
            refused = next((first.error for first in firsts if first.error is not None), None)
            if refused is not None:
                return await send_error(send, refused, self.headers)
            await start_events(send, self.headers)
            if (opening := self.responder.first_chunk()) is not None:
                await send_event(send, opening)
            lasts: list[GenerateOutput] = list(firsts)
            async with contextlib.aclosing(_merged(firsts, streams)) as merged:
                async for index, output in merged:
                    lasts[index] = output
                    if output.error is not None:
                        return await send_event(send, error_body(output.error), final=True)
                    if output.text or output.finish_reason or output.logprobs:
                        usage = self.responder.usage(lasts) if continuous_usage else None
                        if (chunk := self.responder.chunk(index, output, usage)) is not None:
                            await send_event(send, chunk)
            if include_usage:
                await send_event(send, self.responder.usage_chunk(lasts))
            await end_events(send)
            self._observe(lasts)
        finally:
            for stream in streams:  # an unfinished stream aborts its request when closed
                await stream.aclose()

    async def _collect(self, request: GenerateRequest) -> tuple[str, GenerateOutput, list[OutputLogprob]]:
        text, last, logprobs, opening = [], None, [], None
        async for output in self.gateway.generate(request):
            self.first = self.first or time.monotonic()
            opening = opening or output
            text.append(output.text)
            logprobs += output.logprobs
            last = output
        assert last is not None and opening is not None
        if last.error is not None:
            raise _Failed(last.error)
        # the prompt's text and logprobs (echo, prompt_logprobs) and the tool-call format come with the first output
        last = msgspec.structs.replace(
            last,
            prompt_text=opening.prompt_text,
            prompt_logprobs=opening.prompt_logprobs,
            tool_parser=opening.tool_parser,
        )
        return "".join(text), last, logprobs

    def _observe(self, lasts: list[GenerateOutput]) -> None:
        endpoint = "/v1/chat/completions" if self.responder.chat else "/v1/completions"
        if self.first is not None:
            metrics.TIME_TO_FIRST_TOKEN.observe(self.first - self.started)
        metrics.LATENCY.labels(endpoint).observe(time.monotonic() - self.started)
        for last in lasts:
            metrics.PROMPT_TOKENS.observe(last.prompt_tokens)
            metrics.COMPLETION_TOKENS.observe(last.completion_tokens)
            metrics.TOKENS.labels("prompt").inc(last.prompt_tokens)
            metrics.TOKENS.labels("completion").inc(last.completion_tokens)


async def _merged(
    firsts: list[GenerateOutput], streams: list[AsyncIterator[GenerateOutput]]
) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """(index, output) of every stream as the outputs come, each stream's first output first."""
    queue: asyncio.Queue[tuple[int, GenerateOutput]] = asyncio.Queue()

    async def pump(index: int) -> None:
        if firsts[index].finish_reason is None:
            async for output in streams[index]:
                await queue.put((index, output))

    for index, first in enumerate(firsts):
        queue.put_nowait((index, first))
    pumps = [asyncio.create_task(pump(index)) for index in range(len(streams))]
    try:
        unfinished = len(streams)
        while unfinished:
            index, output = await queue.get()
            unfinished -= output.finish_reason is not None
            yield index, output
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
