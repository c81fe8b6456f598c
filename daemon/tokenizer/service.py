"""A tokenizer worker process: prompts to token ids on the way in, token ids to text on the way out.

Each worker binds its own endpoint; front-end workers spread requests over the
pool and the scheduler sends every request's tokens back to the worker that
tokenized it, one message per engine step. Text goes back to the front-end
worker named in the request, one batch per front-end per step.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field

import msgspec
import structlog
import zmq

from daemon.engine import grammar
from daemon.engine.grammar import GrammarError, LazyCompiler, compiler_for_dir
from daemon.engine.locate import locate_model
from daemon.engine.model_dir import ModelDirError
from daemon.ipc.heartbeat import Pulse
from daemon.ipc.messages import (
    AbortRequest,
    Broadcast,
    ConfigApplied,
    ConfigUpdate,
    Constraint,
    Detokenize,
    Detokenized,
    ErrorInfo,
    GenerateOutput,
    GenerateRequest,
    OutputBatch,
    OutputLogprob,
    PrepareConstraint,
    Sampling,
    ScheduleRequest,
    SchedulerHello,
    SequenceUpdate,
    StepTokens,
    TierEvent,
    TierReady,
    Tokenize,
    Tokenized,
    TokenizerHello,
    TokenLogprobs,
    ToTokenizer,
)
from daemon.ipc.sockets import READY_GRACE_MS, PeerGone, Receiver, open_socket, send
from daemon.tier import Tier
from daemon.tokenizer.detokenize import IncrementalDetokenizer, StopStrings
from daemon.tokenizer.generation_defaults import read_sampling_defaults
from daemon.tokenizer.loading import PromptText, TokenizerError, load_text_tokenizer
from daemon.tokenizer.offloop import OffLoop
from daemon.tokenizer.served import ServedContext

log = structlog.get_logger("daemon.tokenizer")
POLL_MS = 200
HELLO_INTERVAL_MS = 100
# A draining worker exits once it holds no request and has heard nothing this long: requests the
# front-ends sent before they learned of the drain have arrived by then.
DRAIN_QUIET_S = 0.5
# Prompts longer than this (in characters) are tokenized off the loop: about 20 ms of encoding
# here, what a request behind it may wait; shorter ones are done at once, without the round trip.
OFF_LOOP_CHARS = 32 * 1024
# No worker has served yet, so no context is known (a tokenizer restarted while the worker is replaced).
MODEL_LOADING = ErrorInfo(503, "the model is still loading", type="server_overloaded")


@dataclass
class Active:
    """A request this worker tokenized and whose tokens it is turning back into text."""

    request: GenerateRequest
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    hidden_ids: frozenset[int]  # stop tokens: they end the text, they are not part of it
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the prefix cache (the scheduler says so with the first token)
    held_text: list[str] = field(default_factory=list)  # a non-streamed request's text so far
    held_logprobs: list[OutputLogprob] = field(default_factory=list)  # of tokens not yet in an output
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str | None = None  # echo: goes with the first output
    held_prompt_logprobs: list[OutputLogprob] = field(default_factory=list)  # go with the first output
    scoring_only: bool = False  # max_tokens 0: the one token generated is dropped
    tool_parser: str | None = None  # the format of its tool calls (tool_choice auto): goes with the first output


class TokenizerService:
    def __init__(self, tier: Tier):
        self.tier = tier
        settings, endpoints = tier.settings, tier.endpoints
        cache = settings.runtime.cache_dir
        model_dir = locate_model(settings.tokenizer.path, cache, build=False)
        self.text = load_text_tokenizer(model_dir)
        self.sampling_defaults = read_sampling_defaults(model_dir)
        self.zmq = zmq.Context()
        self.inbox = Receiver(open_socket(self.zmq, zmq.PULL, bind=endpoints.tokenizer(tier.index)), ToTokenizer)
        self.events = Receiver(open_socket(self.zmq, zmq.SUB, connect=endpoints.events), Broadcast)
        # What the serving worker announced, never derived here: a reload replaces the worker alone.
        self.served = ServedContext(endpoints.directory, self.text.vocab_size)
        self.scheduler = open_socket(self.zmq, zmq.PUSH, connect=endpoints.scheduler)
        self.control = open_socket(self.zmq, zmq.DEALER, connect=endpoints.control)
        self.pulse = Pulse(self.control, self.tier.role, self.tier.index)
        self.frontends: dict[str, zmq.Socket] = {}
        self.active: dict[str, Active] = {}
        self._pending: dict[str, list[GenerateOutput]] = {}  # outputs of this round, by front-end
        self.off_loop = OffLoop()  # long prompts: tokenized there while the loop serves the rest
        # constraints are compiled here to check them (a 400 names what is wrong): made on first use
        self.grammars = LazyCompiler(
            functools.partial(compiler_for_dir, model_dir, self.text.vocab_size, sorted(self.text.eos_token_ids))
        )
        self.poller = zmq.Poller()
        self.poller.register(self.inbox.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self.poller.register(self.off_loop.fd, zmq.POLLIN)

    def run(self) -> None:
        early = self._meet_scheduler()
        # Listening to events by now: a worker that came up since the first look is in the status file.
        self.served.refresh()
        send(self.control, TierReady(self.tier.role, self.tier.index, os.getpid()), READY_GRACE_MS)
        defaults = self.sampling_defaults
        log.info(
            "tokenizer.ready", vocab=self.text.vocab_size, context=self.served.length, model_defaults=defaults.values
        )
        self._handle(early)
        draining_since: float | None = None
        last_message = time.monotonic()
        while True:
            self.pulse.beat()
            ready = dict(self.poller.poll(POLL_MS))
            if self.events.socket in ready:
                for event in self.events.recv_ready():
                    match event:
                        case TierEvent(tier="scheduler", state="down"):
                            self._fail_all("the scheduler stopped")
                        case TierEvent(tier="worker", state="up"):
                            self.served.follow(event)
                        case TierEvent(tier="tokenizer", index=self.tier.index, state="draining"):
                            draining_since = time.monotonic()
                            log.info("tokenizer.draining", requests=len(self.active))
                        case ConfigUpdate(generation=generation):
                            self.tier.adopt(generation)
                            send(self.control, ConfigApplied(self.tier.role, self.tier.index, os.getpid(), generation))
                            log.info("tokenizer.config_applied")
            if self.off_loop.fd in ready:
                for then, result, error in self.off_loop.finished():
                    then(result, error)
                self._flush()
            if self.inbox.socket in ready:
                last_message = time.monotonic()
                self._handle(self.inbox.recv_ready())
            idle = not self.active and not self.off_loop
            if draining_since is not None and idle and time.monotonic() - last_message > DRAIN_QUIET_S:
                log.info("tokenizer.drained")  # a new pool took over, and this one holds nothing more
                return

    def _meet_scheduler(self) -> list[msgspec.Struct]:
        """Say hello until the scheduler answers; returns what else arrived meanwhile.

        Until then the scheduler's path to this worker may still be connecting,
        and tokens it sent would be lost: the worker is not ready before."""
        early = []
        while True:
            with contextlib.suppress(PeerGone):  # no scheduler yet: it is starting too
                send(self.scheduler, TokenizerHello(self.tier.index))
            message = self.inbox.recv(timeout_ms=HELLO_INTERVAL_MS)
            while message is not None:
                if isinstance(message, SchedulerHello):
                    return early + self.inbox.recv_ready()
                early.append(message)
                message = self.inbox.recv(timeout_ms=0)

    def _handle(self, messages: list[msgspec.Struct]) -> None:
        for message in messages:
            match message:
                case GenerateRequest():
                    self._admit(message)
                case AbortRequest(request_id=request_id):
                    if self.active.pop(request_id, None) is not None:
                        self._to_scheduler(message)
                    self.off_loop.cancel(request_id)  # still tokenizing: it never reaches the scheduler
                case StepTokens(updates=updates):
                    self._detokenize(updates)
                case Tokenize() | Detokenize():
                    self._answer(message)
        self._flush()

    # --- requests in --------------------------------------------------------------------------

    def _admit(self, request: GenerateRequest) -> None:
        self._frontend(request.reply_to)  # connect now: by the first output the path is there
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            if request.parse_tool_calls and self._tool_parser() is None:
                message = (
                    "`tool_choice` auto needs the format in which the model writes tool calls, and its chat template "
                    "shows none: set model.tool_parser (hermes, llama3_json or mistral), or ask for tool_choice "
                    "required or a named function"
                )
                return self._reject(request, ErrorInfo(400, message, param="tool_choice"))
            if request.constraint is not None:
                return self._check_constraint(request, request.constraint)
            self._tokenize(request)

    def _tool_parser(self) -> str | None:
        """The format tool calls are parsed in (model.tool_parser; auto: the chat template's)."""
        setting = self.tier.settings.model.tool_parser
        if setting == "auto":
            template = self.text.chat_template
            return template.tool_call_format if template is not None else None
        return None if setting == "none" else setting

    def _check_constraint(self, request: GenerateRequest, constraint: Constraint) -> None:
        """Compile the request's constraint off the loop (a large schema takes a while, the first one
        seconds more to import xgrammar), then go on with it, or answer 400 naming its field."""
        self._to_scheduler(PrepareConstraint(constraint))  # the worker compiles it too, meanwhile
        compiled = grammar.Constraint(constraint.kind, constraint.spec, constraint.compact, constraint.thinking)

        def then(_grammar: object, error: BaseException | None) -> None:
            with structlog.contextvars.bound_contextvars(request_id=request.request_id):
                if isinstance(error, GrammarError):
                    log.info("tokenizer.rejected", reason="constraint", error=str(error))
                    message = f"`{constraint.param}` cannot be used: {error}"
                    return self._reject(request, ErrorInfo(400, message, param=constraint.param))
                if error is not None:
                    raise error
                self._tokenize(request)

        self.off_loop.submit(request.request_id, lambda: self.grammars.get().compile(compiled), then)

    def _tokenize(self, request: GenerateRequest) -> None:
        """Check the prompt, tokenize it (off the loop when it is long), then schedule it."""
        prompt_param = "messages" if request.messages is not None else "prompt"
        # The limit when the request came: it is checked against this one all along.
        if (context := self.served.known()) is None:
            return self._reject(request, MODEL_LOADING)
        try:
            if request.prompt_token_ids is not None:  # given as ids: nothing to tokenize
                given = self._checked_ids(request.prompt_token_ids)
            else:
                prompt = self._prompt_text(request)
        except TokenizerError as exc:
            log.info("tokenizer.rejected", reason=str(exc))
            return self._reject(request, ErrorInfo(400, str(exc), param=prompt_param))
        if request.prompt_token_ids is not None:
            return self._schedule(request, given, context)
        if request.truncate_prompt_tokens is None and (error := self._beyond_context(prompt, prompt_param, context)):
            return self._reject(request, error)
        if len(prompt.text) <= OFF_LOOP_CHARS:
            return self._schedule(request, self.text.tokenize(prompt), context)

        def then(ids: list[int] | None, error: BaseException | None) -> None:
            with structlog.contextvars.bound_contextvars(request_id=request.request_id):
                if error is not None:
                    raise error  # the tokenizer library failed on this text: as if it had on the loop
                self._schedule(request, ids, context)

        log.info("tokenizer.off_loop", chars=len(prompt.text))  # seconds of work: worth a line
        self.off_loop.submit(request.request_id, lambda: self.text.tokenize(prompt), then)

    def _beyond_context(self, prompt: PromptText, param: str, context: int) -> ErrorInfo | None:
        """The 400 for a prompt so long it cannot fit, whatever its tokens: known from its length
        alone, before the cost of tokenizing it (which may be seconds)."""
        limit = self.text.max_prompt_bytes(context - 1)
        if limit is None or len(prompt.text) * 4 <= limit:  # a character is at most 4 bytes
            return None
        size = len(prompt.text.encode("utf-8", "surrogatepass"))
        if size <= limit:
            return None
        message = (
            f"This model's maximum context length is {context} tokens. However, your prompt is {size} "
            f"bytes long, more than {context - 1} tokens of this tokenizer can hold ({limit} bytes), "
            "which leaves no room for the completion. Please shorten the prompt (or set truncate_prompt_tokens)."
        )
        log.info("tokenizer.rejected", reason="prompt beyond the context", prompt_bytes=size)
        return ErrorInfo(400, message, param=param)

    def _schedule(self, request: GenerateRequest, prompt_ids: list[int], context: int) -> None:
        prompt_param = "messages" if request.messages is not None else "prompt"
        if request.truncate_prompt_tokens is not None:  # the end of a prompt is what the model continues
            keep = request.truncate_prompt_tokens
            if keep == -1:  # as much as fits beside the completion
                keep = max(context - (request.sampling.max_tokens or 1), 1)
            prompt_ids = prompt_ids[-keep:]
        if not prompt_ids:
            return self._reject(request, ErrorInfo(400, "the prompt is empty", param=prompt_param))
        if (vocab := self.served.vocab) is not None and (highest := max(prompt_ids)) >= vocab:
            # a tokenizer with more ids than the model (tokenizer.path of another model): this
            # prompt alone is refused, rather than failing the whole step it would join
            message = (
                f"the prompt has token id {highest}, outside the model's vocabulary of {vocab} ids "
                f"(the tokenizer has {self.text.vocab_size}: it does not fit the model)"
            )
            log.info("tokenizer.rejected", reason="token id beyond the model's vocabulary", token_id=highest)
            return self._reject(request, ErrorInfo(400, message, param=prompt_param))
        if len(prompt_ids) >= context:  # the prompt alone leaves no room for a single token
            message = (
                f"This model's maximum context length is {context} tokens. However, your prompt has "
                f"{len(prompt_ids)} tokens, which leaves no room for the completion. Please shorten the "
                "prompt (or set truncate_prompt_tokens)."
            )
            return self._reject(request, ErrorInfo(400, message, param=prompt_param))
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.sampling_defaults.max_tokens(context - len(prompt_ids))
        # echo with max_tokens 0 (scoring a prompt): the engine samples one token, which is dropped
        scoring_only = max_tokens == 0
        max_tokens = max(max_tokens, 1)
        requested = len(prompt_ids) + max_tokens
        if requested > context:
            message = (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{requested} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens."
            )
            return self._reject(request, ErrorInfo(400, message, param="max_tokens"))
        if (problem := self._sampling_problem(request.sampling, max_tokens)) is not None:
            return self._reject(request, problem)
        stop_ids = set(request.sampling.stop_token_ids)
        if not request.sampling.ignore_eos:
            stop_ids |= self.text.eos_token_ids
        sampling = msgspec.structs.replace(
            self.sampling_defaults.apply(request.sampling, request.unset_sampling),
            max_tokens=max_tokens,
            stop_token_ids=tuple(sorted(stop_ids)),
            bad_words=self._bad_word_ids(request.bad_words),
        )
        scheduled = ScheduleRequest(
            request.request_id,
            self.tier.index,
            prompt_ids,
            sampling,
            request.priority,
            request.arrival,
            request.constraint,
        )
        log.debug("request.tokenized", prompt_tokens=len(prompt_ids), max_tokens=max_tokens)
        if not self._to_scheduler(scheduled):
            return self._reject(request, ErrorInfo(503, "the scheduler is not reachable", type="server_error"))
        self.active[request.request_id] = Active(
            request,
            self.text.incremental_detokenizer(prompt_ids, skip_special_tokens=request.skip_special_tokens),
            StopStrings(list(request.stop), include_stop=request.include_stop_str_in_output),
            # stop tokens end the text without being part of it, unless the client asked for them
            frozenset() if request.include_stop_str_in_output else frozenset(stop_ids),
            len(prompt_ids),
            prompt_ids=prompt_ids,
            prompt_text=self._echoed(request, prompt_ids) if request.echo else None,
            scoring_only=scoring_only,
            tool_parser=self._tool_parser() if request.parse_tool_calls else None,
        )

    def _bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each word's token ids as vLLM bans them: the word as given and with one leading space (a
        word inside a text usually follows one), without the tokenizer's specials, each once."""
        found: dict[tuple[int, ...], None] = {}
        for word in words:
            for variant in (word.lstrip(), " " + word.lstrip()):
                if ids := tuple(self.text.encode(variant, add_special_tokens=False)):
                    found[ids] = None
        return tuple(found)

    def _echoed(self, request: GenerateRequest, prompt_ids: list[int]) -> str:
        """The prompt as echo shows it: as sent, or its token ids (or what truncation kept) decoded."""
        if request.prompt is not None and request.truncate_prompt_tokens is None:
            return request.prompt
        return self.text.decode(prompt_ids, skip_special_tokens=False)

    def _sampling_problem(self, sampling: Sampling, max_tokens: int) -> ErrorInfo | None:
        """What in the sampling options the model cannot take: token ids beyond its vocabulary,
        min_tokens beyond max_tokens."""
        vocab = self.text.vocab_size
        for param, ids in (
            ("logit_bias", [token for token, _bias in sampling.logit_bias]),
            ("allowed_token_ids", sampling.allowed_token_ids),
        ):
            if any(token >= vocab for token in ids):
                return ErrorInfo(400, f"{param}: token ids must be in 0..{vocab - 1}", param=param)
        if sampling.min_tokens > max_tokens:
            message = f"min_tokens ({sampling.min_tokens}) must be at most max_tokens ({max_tokens})"
            return ErrorInfo(400, message, param="min_tokens")
        return None

    def _prompt_text(self, request: GenerateRequest | Tokenize) -> PromptText:
        """What to tokenize: the prompt, or the conversation rendered (cheap, unlike tokenizing)."""
        if request.messages is not None:
            return self.text.chat_prompt_text(request.messages, request.chat)
        return PromptText(request.prompt or "", request.add_special_tokens)

    def _checked_ids(self, ids: list[int]) -> list[int]:
        if any(not 0 <= i < self.text.vocab_size for i in ids):
            raise TokenizerError(f"prompt token ids must be in 0..{self.text.vocab_size - 1}")
        return list(ids)

    def _reject(self, request: GenerateRequest, error: ErrorInfo) -> None:
        self._queue(request, GenerateOutput(request.request_id, finish_reason="error", error=error))

    def _answer(self, request: Tokenize | Detokenize) -> None:
        """/tokenize and /detokenize: answered at once, nothing is scheduled."""
        reply: Tokenized | Detokenized
        if isinstance(request, Tokenize):
            return self._tokenize_only(request)
        if any(not 0 <= i < self.text.vocab_size for i in request.tokens):
            error = ErrorInfo(400, f"token ids must be in 0..{self.text.vocab_size - 1}", param="tokens")
            reply = Detokenized(request.request_id, error=error)
        else:  # special tokens stay: the text shows exactly what the ids are, as vLLM's does
            reply = Detokenized(request.request_id, self.text.decode(request.tokens, skip_special_tokens=False))
        self._reply(request.reply_to, reply)

    def _reply(self, reply_to: str, reply: Tokenized | Detokenized) -> None:
        socket = self._frontend(reply_to)
        try:
            send(socket, reply)
        except PeerGone:  # that front-end worker is gone, and the client with it
            socket.close()
            del self.frontends[reply_to]

    def _tokenize_only(self, request: Tokenize) -> None:
        """/tokenize: any length is answered (it schedules nothing), long prompts off the loop."""
        try:
            prompt = self._prompt_text(request)
        except TokenizerError as exc:
            param = "messages" if request.messages is not None else "prompt"
            error = ErrorInfo(400, str(exc), param=param)
            return self._reply(request.reply_to, Tokenized(request.request_id, error=error))

        def then(tokens: list[int] | None, error: BaseException | None) -> None:
            if error is not None:
                raise error
            strings = self.text.token_strings(tokens) if request.return_token_strs else None
            served = self.served.known() or 0  # 0: no worker has served yet
            self._reply(request.reply_to, Tokenized(request.request_id, tokens, strings, served))

        if len(prompt.text) <= OFF_LOOP_CHARS:
            return then(self.text.tokenize(prompt), None)
        self.off_loop.submit(request.request_id, lambda: self.text.tokenize(prompt), then)

    # --- tokens back --------------------------------------------------------------------------

    def _detokenize(self, updates: list[SequenceUpdate]) -> None:
        for update in updates:
            active = self.active.get(update.request_id)
            if active is None:
                continue  # aborted, or stopped by a stop string while the step ran
            output = self._advance(active, update)
            if output is not None:
                self._queue(active.request, output)
            if output is not None and output.finish_reason is not None:
                del self.active[update.request_id]
                log.debug(
                    "request.finished",
                    request_id=update.request_id,
                    reason=output.finish_reason,
                    completion_tokens=output.completion_tokens,
                )

    def _advance(self, active: Active, update: SequenceUpdate) -> GenerateOutput | None:
        request_id = update.request_id
        if update.error is not None:
            return GenerateOutput(
                request_id,
                finish_reason="error",
                error=update.error,
                prompt_tokens=active.prompt_tokens,
                completion_tokens=active.completion_tokens,
            )
        ids = update.token_ids
        if update.prompt_logprobs:  # the first token has none: it is shown with its text alone
            first = active.prompt_ids[0]
            opening = OutputLogprob(first, self.text.token_texts([first])[0], None, None, [])
            active.held_prompt_logprobs = [opening, *self._logprobs(update.prompt_logprobs, active.prompt_ids[1:])]
        if active.scoring_only:
            ids, update = [], msgspec.structs.replace(update, finish_reason="length", logprobs=[])
        if update.logprobs:
            active.held_logprobs += self._logprobs(update.logprobs, ids)
        active.completion_tokens += len(ids)
        active.cached_tokens = update.cached_tokens or active.cached_tokens
        ended_by_token = update.finish_reason == "stop" and bool(ids) and ids[-1] in active.hidden_ids
        text = active.detokenizer.push(ids[:-1] if ended_by_token else ids)
        if update.finish_reason is not None:
            text += active.detokenizer.finish()
        shown, stopped = active.stops.feed(text)
        finish = update.finish_reason
        if stopped:
            finish = "stop"
            if update.finish_reason is None:  # the engine is still generating it: stop it
                self._to_scheduler(AbortRequest(request_id))
        elif finish is not None:
            shown += active.stops.flush()
        if finish is None:
            if not active.request.stream:  # one message at the end, not one per step
                active.held_text.append(shown)
                return None
            if not shown:
                return None
        elif active.held_text:
            shown = "".join(active.held_text) + shown
        counts = active.prompt_tokens, active.completion_tokens
        logprobs, active.held_logprobs = active.held_logprobs, []
        prompt_text, active.prompt_text = active.prompt_text, None
        prompt_logprobs, active.held_prompt_logprobs = active.held_prompt_logprobs, []
        tool_parser, active.tool_parser = active.tool_parser, None
        return GenerateOutput(
            request_id,
            shown,
            finish,
            *counts,
            cached_tokens=active.cached_tokens,
            logprobs=logprobs,
            prompt_text=prompt_text,
            prompt_logprobs=prompt_logprobs,
            tool_parser=tool_parser,
        )

    def _logprobs(self, found: list[TokenLogprobs], ids: list[int]) -> list[OutputLogprob]:
        """The engine's log-probabilities of `ids` (and of the likeliest tokens), with tokens as text."""
        text = self.text.token_text
        return [
            OutputLogprob(
                token,
                text(token),
                f.logprob,
                f.rank,
                [(t, text(t), lp) for t, lp in zip(f.top_ids, f.top_logprobs, strict=True)],
            )
            for token, f in zip(ids, found, strict=True)
        ]

    def _fail_all(self, reason: str) -> None:
        error = ErrorInfo(503, f"{reason}; the request was lost, retry it", type="server_error")
        for request_id, active in self.active.items():
            self._queue(active.request, GenerateOutput(request_id, finish_reason="error", error=error))
        self.active.clear()
        self._flush()
        log.warning("tokenizer.requests_failed", reason=reason)

    # --- sending ------------------------------------------------------------------------------

    def _queue(self, request: GenerateRequest, output: GenerateOutput) -> None:
        self._pending.setdefault(request.reply_to, []).append(output)

    def _flush(self) -> None:
        """Send the queued outputs: one batch per front-end worker."""
        pending, self._pending = self._pending, {}
        for reply_to, outputs in pending.items():
            socket = self._frontend(reply_to)
            try:
                send(socket, OutputBatch(outputs))
            except PeerGone:  # that front-end worker is gone, and its clients with it
                socket.close()
                del self.frontends[reply_to]
                for output in outputs:
                    if self.active.pop(output.request_id, None) is not None:
                        self._to_scheduler(AbortRequest(output.request_id))

    def _frontend(self, reply_to: str) -> zmq.Socket:
        socket = self.frontends.get(reply_to)
        if socket is None:
            socket = self.frontends[reply_to] = open_socket(self.zmq, zmq.PUSH, connect=reply_to)
        return socket

    def _to_scheduler(self, message: msgspec.Struct) -> bool:
        try:
            send(self.scheduler, message)
        except PeerGone:
            return False
        return True


def main(tier: Tier) -> None:
    try:
        service = TokenizerService(tier)
    except (TokenizerError, ModelDirError) as exc:
        log.error("tokenizer.load_failed", error=str(exc))
        raise SystemExit(2) from None
    service.run()
