"""What the sampling options cost: mixed sampling against all-greedy, and n choices against one.

One daemon on the demo model, then two measurements:

1. Throughput with 64 requests in flight (h2load, HTTP/1.1, C so nearly free of client cost):
   all greedy, against a mix of a third greedy, a third temperature + top_p, and a third with
   repetition/frequency/presence penalties, min_p and logprobs 5 (three h2load processes, one
   body each, 21-22 connections each). Every request generates `--max-tokens` tokens
   (ignore_eos), so tokens per second is requests per second times that. Each of `--rounds`
   rounds runs both loads, in ABBA order; the figure is the median of the rounds' ratios.
2. The prefill an n = 4 request costs against n = 1, for one `--prompt-tokens`-token prompt
   (fresh token ids each time, so nothing is cached before): the prompt tokens the engine
   computed and its prefill step seconds, from the engine counters of /metrics.

    python bench/sampling.py              # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import RunFrame, Server, abba_rounds, h2load_completions, print_header, ratio_line, versions
from vllm_peer import engine_figures, engine_line, settled_engine_figures

CONCURRENCY = 64
PROMPT = "the river house light water garden morning evening story letter window music voice"
GREEDY = {"temperature": 0}
TOP_P = {"temperature": 0.8, "top_p": 0.9}
PENALISED = {
    "temperature": 1.0,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.3,
    "min_p": 0.05,
    "logprobs": 5,
}
LOADS = {"all greedy": [GREEDY, GREEDY, GREEDY], "mixed": [GREEDY, TOP_P, PENALISED]}


def body(sampling: dict, args: argparse.Namespace) -> dict:
    return {"prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, **sampling}


def throughput(daemon: Server, bodies: list[dict], args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """(generated tokens per second, failed requests) of the bodies run together, CONCURRENCY in flight."""
    shares = [CONCURRENCY // len(bodies) + (i < CONCURRENCY % len(bodies)) for i in range(len(bodies))]
    requests = [args.requests * share // CONCURRENCY for share in shares]

    def run(i: int):
        return h2load_completions(
            f"load-{i}",
            daemon.url,
            bodies[i],
            work,
            requests=requests[i],
            concurrency=shares[i],
            http2=False,
            h2_connections=1,
            time_limit=args.time_limit,
        )

    started = time.monotonic()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(run, range(len(bodies))))
    elapsed = time.monotonic() - started
    if any(r is None for r in results):
        raise RuntimeError("h2load is not installed (Debian: nghttp2-client)")
    ok = sum(r.ok for r in results)
    return ok * args.max_tokens / elapsed, sum(r.failed for r in results)


PREFILL_TOKENS = "daemon_engine_step_tokens_total:prefill"
PREFILL_SECONDS = "daemon_engine_step_seconds_total:prefill"


def prefill_cost(daemon: Server, choices: int, prompt: list[int]) -> tuple[float, float]:
    """(prompt tokens computed, prefill step seconds) of one request with `choices` choices, from
    the engine counters once the scheduler's stats (every 0.5 s) have counted its steps."""
    before = settled_engine_figures(daemon.url)
    answer = httpx.post(
        daemon.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 4, "n": choices, "temperature": 1.0, "ignore_eos": True},
        timeout=120,
    )
    answer.raise_for_status()
    deadline = time.monotonic() + 10
    while (after := settled_engine_figures(daemon.url)).get(PREFILL_TOKENS, 0.0) <= before.get(PREFILL_TOKENS, 0.0):
        if time.monotonic() > deadline:
            raise RuntimeError("the engine counters never counted the request's prefill")
        time.sleep(0.1)
    return after[PREFILL_TOKENS] - before.get(PREFILL_TOKENS, 0.0), after.get(PREFILL_SECONDS, 0.0) - before.get(
        PREFILL_SECONDS, 0.0
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=448, help="requests per throughput run (all loads together)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    p.add_argument("--rounds", type=int, default=6, help="rounds of the two loads (ABBA order)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the n = 4 measurement")
    p.add_argument("--time-limit", type=float, default=300, help="seconds one h2load run may take")
    args = p.parse_args(argv)
    frame = RunFrame("dm-sampling-", total_time_limit=int(args.time_limit * 2 * args.rounds + 600))
    print_header("sampling", frame.work, frame.runtime_dir, versions())
    with frame.guarded():
        daemon = frame.start_demo_daemon()
        engine_figures(daemon.url)  # the front-end answers
        throughput(daemon, LOADS["all greedy"], argparse.Namespace(**{**vars(args), "requests": 64}), frame.work)

        def run(name: str) -> tuple[float, int, str]:
            before, started = settled_engine_figures(daemon.url), time.monotonic()
            rate, failed = throughput(daemon, [body(b, args) for b in LOADS[name]], args, frame.work)
            return rate, failed, engine_line(before, settled_engine_figures(daemon.url), time.monotonic() - started)

        measured, failures = abba_rounds(args.rounds, list(LOADS), run)
        greedy, mixed = (statistics.median(measured[name]) for name in LOADS)
        print(f"\n| load ({CONCURRENCY} in flight, {args.max_tokens} tokens each) | generated tok/s (median) |")
        print("|---|---|")
        print(
            f"| all greedy | {greedy:,.0f} |\n| mixed (1/3 greedy, 1/3 top_p, 1/3 penalties + min_p + logprobs 5) "
            f"| {mixed:,.0f} |"
        )
        print(ratio_line("mixed against all greedy", measured["all greedy"], measured["mixed"]))
        print(f"failed requests: {failures}")
        costs = {}
        for choices in (1, 4):
            prompt = [(97 * i + 13 * choices) % 1000 + 4 for i in range(args.prompt_tokens)]
            costs[choices] = prefill_cost(daemon, choices, prompt)
        (tokens_1, seconds_1), (tokens_4, seconds_4) = costs[1], costs[4]
        print(f"\n| {args.prompt_tokens}-token prompt | prompt tokens computed | prefill step seconds |")
        print("|---|---|---|")
        print(f"| n = 1 | {tokens_1:.0f} | {seconds_1 * 1e3:.1f} ms |")
        print(
            f"| n = 4 | {tokens_4:.0f} ({tokens_4 / tokens_1:.2f}x) | {seconds_4 * 1e3:.1f} ms "
            f"({seconds_4 / seconds_1:.2f}x) |"
        )
        print(frame.stop(daemon))
    return frame.finish(keep=False)


if __name__ == "__main__":
    sys.exit(main())
