"""What data parallelism buys on this machine: model.dp_size 2 against 1.

Daemons on the demo model, dp_size 1 and dp_size 2, one at a time (each measurement starts its
own and stops it after), in ABBA rounds: the size measured second goes first the next round.
Each round, for each:

1. Throughput with `--concurrency` requests in flight (h2load, HTTP/1.1, so nearly free of
   client cost): `--requests` completions of `--max-tokens` tokens each (ignore_eos); the
   figure is generated tokens per second, and the ratio the median of the rounds' ratios.
2. Prefix locality: `--prompts` long prompts (about `--prompt-tokens` tokens each, none sharing
   a prefix with another), each sent `--repeats` times, `--concurrency` at once: the share of
   the repeats' prompt tokens found in the prefix cache (usage.cached_tokens). One replica
   finds them all; with two, only placement by cached prefix finds them (by load alone,
   about half would land on the replica that has not seen the prompt).

And how each dp_size 2 daemon placed its requests (daemon_replica_requests_placed_total).
On a machine without GPUs the replicas share the CPU cores (model.cpu_threads, split between
them): what two replicas buy there is steps that overlap, not more arithmetic; on GPUs each
replica has devices of its own.

    python bench/data_parallel.py                 # about 4 minutes on 2 cores
    python bench/data_parallel.py --rounds 1 --requests 16 --prompts 2 --repeats 2   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import RunFrame, Server, h2load_completions, print_header, ratio_line, versions
from prometheus_client.parser import text_string_to_metric_families

WORDS = ["river", "house", "light", "water", "garden", "morning", "evening", "story", "letter", "window", "music"]
SIZES = (1, 2)


def throughput(daemon: Server, args: argparse.Namespace, frame: RunFrame) -> tuple[float, int]:
    """(generated tokens per second, failed requests) of the closed loop."""
    body = {"prompt": " ".join(WORDS), "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}
    started = time.monotonic()
    result = h2load_completions(
        daemon.name,
        daemon.url,
        body,
        frame.work,
        requests=args.requests,
        concurrency=min(args.concurrency, args.requests),  # h2load wants a request per connection at least
        http2=False,
        h2_connections=1,
        time_limit=args.time_limit,
    )
    if result is None:
        raise RuntimeError("h2load is not installed (Debian: nghttp2-client)")
    return result.ok * args.max_tokens / (time.monotonic() - started), result.failed


def prefix_locality(daemon: Server, args: argparse.Namespace, round_: int) -> float:
    """The share of the repeats' prompt tokens served from the prefix cache."""

    def prompt(number: int) -> str:  # a prefix of its own from the first word: nothing shared between prompts
        words = [f"r{round_}p{number}"] + [WORDS[(number * 7 + i * 3) % len(WORDS)] for i in range(args.prompt_tokens)]
        return " ".join(words)

    def send(text: str) -> tuple[int, int]:
        body = {"prompt": text, "max_tokens": 2, "temperature": 0}
        with httpx.Client(timeout=120) as http:
            usage = http.post(daemon.url + "/v1/completions", json=body).raise_for_status().json()["usage"]
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]

    prompts = [prompt(n) for n in range(args.prompts)]
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(send, prompts))  # each computed once somewhere
        repeats = list(pool.map(send, [p for _ in range(args.repeats) for p in prompts]))
    return sum(cached for _, cached in repeats) / sum(tokens for tokens, _ in repeats)


def placed(daemon: Server) -> dict[str, float]:
    text = httpx.get(daemon.url + "/metrics", timeout=10).raise_for_status().text
    return {
        sample.labels["replica"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "daemon_replica_requests_placed_total"
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds of the two daemons (ABBA order)")
    p.add_argument("--requests", type=int, default=256, help="completions per throughput run")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each completion generates")
    p.add_argument("--prompts", type=int, default=16, help="distinct long prompts of the locality figure")
    p.add_argument("--prompt-tokens", type=int, default=300, help="words in each of them (about as many tokens)")
    p.add_argument("--repeats", type=int, default=3, help="times each long prompt is sent again")
    p.add_argument("--time-limit", type=float, default=300, help="seconds one h2load run may take")
    args = p.parse_args(argv)
    frame = RunFrame("dm-dp-", total_time_limit=int(args.time_limit * 2 * args.rounds + 600))
    print_header("data parallelism", frame.work, frame.runtime_dir, versions())
    rate: dict[int, list[float]] = {size: [] for size in SIZES}
    locality: dict[int, list[float]] = {size: [] for size in SIZES}
    failures = 0
    with frame.guarded():
        for round_ in range(args.rounds):
            for size in SIZES if round_ % 2 == 0 else SIZES[::-1]:
                daemon = frame.start_demo_daemon({"model.dp_size": size}, name=f"daemon-dp{size}-{round_ + 1}")
                tok_s, failed = throughput(daemon, args, frame)
                share = prefix_locality(daemon, args, round_)
                if size == 2:
                    print(f"dp_size 2, requests placed by replica: {placed(daemon)}")
                print(frame.stop(daemon))
                rate[size].append(tok_s)
                locality[size].append(share)
                failures += failed
                print(
                    f"round {round_ + 1}, dp_size {size}: {tok_s:,.0f} generated tok/s ({failed} failed), "
                    f"{100 * share:.0f}% of repeated prompt tokens cached",
                    flush=True,
                )
        print(f"\n| dp_size | tok/s, {args.concurrency} in flight (median) | repeated prompt tokens cached (median) |")
        print("|---|---|---|")
        for size in SIZES:
            print(f"| {size} | {statistics.median(rate[size]):,.0f} | {100 * statistics.median(locality[size]):.0f}% |")
        print(ratio_line("tok/s, dp_size 2 against 1", rate[1], rate[2]))
        print(f"failed requests: {failures}")
    return frame.finish(keep=False)


if __name__ == "__main__":
    sys.exit(main())
