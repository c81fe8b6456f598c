"""What structured outputs cost: half the requests constrained by one JSON schema against none,
and how long a request waits for its grammar to compile.

One daemon on the demo model, then two measurements:

1. Throughput with 64 requests in flight (h2load, HTTP/1.1): all unconstrained, against half
   constrained by one JSON schema (two h2load processes, 32 connections each). Every request
   may generate `--max-tokens` tokens; unconstrained ones always do (ignore_eos), constrained
   ones end when their JSON is complete (the schema's fixed-length strings make that about 50
   tokens). The figure is generated tokens per second, counted by the engine (its decode
   tokens, plus each request's first token); each of `--rounds` rounds runs both loads, in ABBA
   order; the figure is the median of the rounds' ratios.
2. The latency of a one-token request: unconstrained; constrained by a schema never seen before
   (each time a new one: the tokenizer and the worker compile it, the request waits for it);
   by a schema compiled already (cached); and the very first constrained request of the
   daemon, which also imports xgrammar in the tokenizer and the worker.

    python bench/structured.py            # about 3 minutes on 2 cores
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
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "minLength": 24, "maxLength": 24},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 2},
    },
    "required": ["id", "kind", "score", "tags"],
    "additionalProperties": False,
}
FREE: dict = {}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}}
LOADS = {"unconstrained": [FREE, FREE], "half constrained": [FREE, CONSTRAINED]}
DECODED = "daemon_engine_step_tokens_total:decode"


def body(extra: dict, args: argparse.Namespace) -> dict:
    return {"prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 1.0, **extra}


def throughput(daemon: Server, bodies: list[dict], args: argparse.Namespace, work: Path) -> tuple[float, int, str]:
    """(generated tokens per second, failed requests, the engine's line) of the bodies run
    together, CONCURRENCY in flight."""
    share = CONCURRENCY // len(bodies)

    def run(i: int):
        return h2load_completions(
            f"load-{i}",
            daemon.url,
            bodies[i],
            work,
            requests=args.requests // len(bodies),
            concurrency=share,
            http2=False,
            h2_connections=1,
            time_limit=args.time_limit,
        )

    before, started = settled_engine_figures(daemon.url), time.monotonic()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(run, range(len(bodies))))
    elapsed = time.monotonic() - started
    if any(r is None for r in results):
        raise RuntimeError("h2load is not installed (Debian: nghttp2-client)")
    after = settled_engine_figures(daemon.url)
    ok = sum(r.ok for r in results)
    generated = after.get(DECODED, 0.0) - before.get(DECODED, 0.0) + ok  # a request's first token is its prefill's
    return generated / elapsed, sum(r.failed for r in results), engine_line(before, after, elapsed)


def latency(http: httpx.Client, extra: dict) -> float:
    started = time.monotonic()
    answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, **extra})
    answer.raise_for_status()
    return time.monotonic() - started


def schema_body(name: str) -> dict:
    """CONSTRAINED with a property of its own: a schema the daemon has never compiled."""
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], name: {"type": "boolean"}}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=384, help="requests per throughput run (both loads together)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens each request generates")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the two loads (ABBA order)")
    p.add_argument("--samples", type=int, default=10, help="requests per latency figure")
    p.add_argument("--time-limit", type=float, default=300, help="seconds one h2load run may take")
    args = p.parse_args(argv)
    frame = RunFrame("dm-structured-", total_time_limit=int(args.time_limit * 2 * args.rounds + 600))
    print_header("structured outputs", frame.work, frame.runtime_dir, versions())
    with frame.guarded():
        daemon = frame.start_demo_daemon()
        engine_figures(daemon.url)  # the front-end answers
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            first = latency(http, schema_body("first"))  # xgrammar's import, in the tokenizer and the worker
            free = [latency(http, {}) for _ in range(args.samples)]
            new = [latency(http, schema_body(f"new_{i}")) for i in range(args.samples)]
            cached = [latency(http, schema_body("new_0")) for _ in range(args.samples)]
        print("\n| one-token request | latency (median) |\n|---|---|")
        print(f"| unconstrained | {1e3 * statistics.median(free):.0f} ms |")
        print(
            f"| a schema never seen (the tokenizer and the worker compile it) | {1e3 * statistics.median(new):.0f} ms |"
        )
        print(f"| a schema compiled before (cached) | {1e3 * statistics.median(cached):.0f} ms |")
        print(f"| the daemon's first constrained request (imports xgrammar) | {1e3 * first:.0f} ms |")
        throughput(
            daemon,
            [body(b, args) for b in LOADS["half constrained"]],
            argparse.Namespace(**{**vars(args), "requests": 64}),
            frame.work,
        )
        measured, failures = abba_rounds(
            args.rounds,
            list(LOADS),
            lambda name: throughput(daemon, [body(b, args) for b in LOADS[name]], args, frame.work),
        )
        print(f"\n| load ({CONCURRENCY} in flight, at most {args.max_tokens} tokens each) | generated tok/s (median) |")
        print("|---|---|")
        for name in LOADS:
            print(f"| {name} | {statistics.median(measured[name]):,.0f} |")
        print(ratio_line("half constrained against unconstrained", *measured.values()))
        print(f"failed requests: {failures}")
        print(frame.stop(daemon))
    return frame.finish(keep=False)


if __name__ == "__main__":
    sys.exit(main())
