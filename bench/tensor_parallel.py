"""What tensor parallelism costs on this machine: decode latency at model.tp_size 2 against 1.

One daemon at a time on the demo model, tp_size 1 then 2 (then 2, then 1: ABBA rounds, a fresh
daemon each time). Each measures:

- one stream alone: the time between its tokens after the first (ms per token, median over
  `--samples` requests of `--max-tokens` tokens each, ignore_eos);
- `--batch` streams at once: the tokens all of them generate per second.

On a machine without GPUs the two ranks share the same CPU cores, so tp_size 2 cannot be faster:
what this measures is the price of the split (the all-reduces after attention and the MLP, the
gather of the logits, the broadcast of each step's plan), not a speed-up. On GPUs each rank has a
device of its own and the figure means what it says.

    python bench/tensor_parallel.py           # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import RunFrame, print_header, ratio_line, versions

PROMPT = "the river house light water garden morning evening story letter window music voice"


def stream_gaps(url: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds from its first token to its last, tokens)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    first = last = None
    tokens = 0
    with httpx.Client(timeout=120) as http, http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                last = time.perf_counter()
                first = first or last
                tokens += 1
    if first is None or last is None or tokens < 2:
        raise RuntimeError(f"the stream gave {tokens} chunks")
    return last - first, tokens


def measure(frame: RunFrame, tp_size: int, args: argparse.Namespace) -> tuple[float, float]:
    """(ms per token of one stream alone, tok/s of `--batch` streams at once) of a daemon at `tp_size`."""
    daemon = frame.start_demo_daemon({"model.tp_size": tp_size}, name=f"daemon-tp{tp_size}")
    try:
        stream_gaps(daemon.url, 8)  # warm-up
        alone = []
        for _ in range(args.samples):
            seconds, tokens = stream_gaps(daemon.url, args.max_tokens)
            alone.append(1e3 * seconds / (tokens - 1))
        started = time.perf_counter()
        with ThreadPoolExecutor(args.batch) as pool:
            done = list(pool.map(lambda _: stream_gaps(daemon.url, args.max_tokens), range(args.batch)))
        rate = sum(tokens for _, tokens in done) / (time.perf_counter() - started)
    finally:
        print(frame.stop(daemon))
    return statistics.median(alone), rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of tp_size 1 and 2 (ABBA order)")
    p.add_argument("--samples", type=int, default=5, help="single streams per figure")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens each stream generates")
    p.add_argument("--batch", type=int, default=8, help="streams at once for the throughput figure")
    args = p.parse_args(argv)
    frame = RunFrame("dm-tp-", total_time_limit=1800)
    print_header("tensor parallelism", frame.work, frame.runtime_dir, versions())
    latency: dict[int, list[float]] = {1: [], 2: []}
    rate: dict[int, list[float]] = {1: [], 2: []}
    with frame.guarded():
        for round_ in range(args.rounds):
            for tp_size in (1, 2) if round_ % 2 == 0 else (2, 1):
                ms, tok_s = measure(frame, tp_size, args)
                latency[tp_size].append(ms)
                rate[tp_size].append(tok_s)
                print(f"round {round_ + 1}, tp_size {tp_size}: {ms:.1f} ms/token alone, {tok_s:,.0f} tok/s", flush=True)
        print(f"\n| tp_size | decode, one stream (ms/token, median) | {args.batch} streams (tok/s, median) |")
        print("|---|---|---|")
        for tp_size in (1, 2):
            ms, tok_s = statistics.median(latency[tp_size]), statistics.median(rate[tp_size])
            print(f"| {tp_size} | {ms:.1f} | {tok_s:,.0f} |")
        print(ratio_line("one stream's decode time, tp_size 2 against 1", latency[1], latency[2]))
        print(ratio_line(f"{args.batch} streams' tok/s, tp_size 2 against 1", rate[1], rate[2]))
    return frame.finish(keep=False)


if __name__ == "__main__":
    sys.exit(main())
