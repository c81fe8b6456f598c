"""The daemon against `transformers serve --continuous-batching`, on the demo model, in one run.

    .venv/bin/pip install -e '.[bench]'      # the peer (transformers[serving]) and the load clients
    apt-get install -y nghttp2-client        # h2load: /health load and the cross-check (optional)
    .venv/bin/python bench/serve.py          # --help for the knobs; defaults are the figures below
    .venv/bin/python bench/serve.py --peer vllm   # vLLM's CPU build instead: bench/vllm_peer.py --bench

With --peer vllm it is bench/vllm_peer.py's bench (W1 with h2load in this script's load shape, W2 and W3
with `vllm bench serve`, one server at a time, one table of ratios); what follows is the transformers run.

What it does, in order (every phase is bounded in time, the whole run by
--total-time-limit; every process it starts is stopped at the end, on errors and
SIGTERM too):

1. Builds the demo model directory once (daemon.engine.demo_model.ensure_demo_model)
   and starts, each on a free port: `daemon -c configs/server.toml`, `transformers
   serve --continuous-batching` on that same directory with HF_HUB_OFFLINE=1, and a
   bare Granian hello-world app with the daemon's Granian settings (bench/hello_app.py).
2. Warms both servers up (bursts at full concurrency), then takes the idle RSS
   (and PSS) of the daemon's processes from /proc, and their idle CPU.
3. Closed-loop completion load, the same against each: 64 clients, 500 requests
   per run, max_tokens 16, short varied prompts, greedy, 3 runs each (the table
   shows the median run). The peer over HTTP/1.1 (aiohttp), then the peer is
   stopped; the daemon over HTTP/1.1 (aiohttp) and over HTTP/2 (httpx, h2c prior
   knowledge, 4 connections multiplexing the 64 streams). The daemon gets
   ignore_eos (the peer refuses the field), and tokens are counted from usage.
   A cross-check drives the same shapes with h2load (one fixed prompt), whose
   client cost is near zero.
4. GET /health at 128 connections for 10 s, h2load (else wrk, else a Python
   multi-process client), against the daemon and the hello app, HTTP/1.1 and h2c.
5. Prints the commands and settings, the machine, the daemon's log findings, and
   a markdown table for the README.

The load client runs on the same cores as the servers (2 on the build machines):
a heavy client (httpx over HTTP/1.1 costs ~10x aiohttp's CPU here) moves the
figures a lot, and so does any CPU contention; only side-by-side ratios mean much.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

# bench/ is on sys.path as the script's directory: what the benchmarks share.
from common import (
    BIN,
    CONFIG,
    START_TIMEOUT_S,
    H2loadResult,
    RunFrame,
    Server,
    clean_env,
    cmdline_of,
    completion_body,
    cpu_model,
    daemon_log_findings,
    daemon_processes,
    free_port,
    h2load_completions,
    make_prompts,
    make_transport,
    marked_pids,
    parse_h2load,
    percentile,
    print_header,
    run_tool,
    use_uvloop,
    versions,
    wait_http_ok,
    warm_up,
)

BENCH = Path(__file__).resolve().parent


# --- processes ----------------------------------------------------------------------------------


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, from /proc/<pid>/smaps_rollup; (0, 0) if the process is gone."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss = int(rest.split()[0]) * 1024
            elif key == "Pss":
                pss = int(rest.split()[0]) * 1024
    return rss, pss


# --- completion load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    label: str
    requests: int
    ok: int = 0
    failures: int = 0
    tokens: int = 0
    short: int = 0  # 200s with fewer completion tokens than max_tokens
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)
    other_cpu_s: float = 0.0  # CPU the rest of the machine used during the run: noise
    connections: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    def note_error(self, what: str) -> None:
        self.failures += 1
        self.errors[what] = self.errors.get(what, 0) + 1


async def run_load(
    label: str,
    url: str,
    prompts: list[str],
    args: argparse.Namespace,
    *,
    ignore_eos: bool,
    http2: bool,
    total: int,
    concurrency: int,
    time_limit_s: float,
) -> LoadResult:
    """Closed loop: `concurrency` clients, each sending its next request when the last one is answered."""
    result = LoadResult(label, total)
    transport = make_transport(args, http2)
    result.connections = transport.description
    issued = 0

    async def client_loop(index: int) -> None:
        nonlocal issued
        while issued < total:
            n = issued
            issued += 1
            body = completion_body(prompts[n % len(prompts)], args, ignore_eos)
            started = time.perf_counter()
            try:
                status, content = await transport.post(url + "/v1/completions", body)
            except transport.errors as exc:
                result.note_error(type(exc).__name__)
                continue
            elapsed = time.perf_counter() - started
            if status != 200:
                result.note_error(f"HTTP {status}")
                continue
            try:
                generated = int(json.loads(content)["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError):
                result.note_error("bad body")
                continue
            result.ok += 1
            result.tokens += generated
            result.short += generated < args.max_tokens
            result.latencies.append(elapsed)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(client_loop(i)) for i in range(concurrency)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                result.note_error(f"client crash: {task.exception()!r}")
    finally:
        result.wall_s = time.perf_counter() - t0
        result.client_cpu_s = time.process_time() - cpu0
        await transport.close()
    missing = total - result.ok - result.failures
    if missing > 0:
        result.failures += missing
        result.errors[f"not finished within {time_limit_s:g} s"] = missing
    return result


# --- /health load ------------------------------------------------------------------------------


@dataclass
class HealthResult:
    label: str
    rps: float = 0.0
    ok: int = 0
    failed: int = 0
    tool: str = ""
    command: str = ""
    raw: str = ""


def health_load(label: str, url: str, args: argparse.Namespace, *, http2: bool) -> HealthResult:
    connections, duration = args.health_connections, args.health_duration
    h2load, wrk = shutil.which("h2load"), shutil.which("wrk")
    if h2load:
        argv = [h2load, "-c", str(connections), "-t", str(args.health_threads), "-D", str(duration)]
        argv += ["--warm-up-time", "2"]
        argv += [] if http2 else ["--h1"]
        if http2:
            argv += ["-m", "10"]  # streams per connection
        argv.append(url + "/health")
        parsed = parse_h2load(label, argv, run_tool(argv, duration + 30))
        return HealthResult(label, parsed.rps, parsed.ok, parsed.failed, "h2load", parsed.command, parsed.raw)
    if wrk and not http2:
        argv = [wrk, "-t", str(args.health_threads), "-c", str(connections), "-d", f"{duration}s", url + "/health"]
        out = run_tool(argv, duration + 30)
        result = HealthResult(label, tool="wrk", command=shlex.join(argv), raw=out)
        if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
            result.rps = float(m.group(1))
        if m := re.search(r"(\d+) requests in", out):
            result.ok = int(m.group(1))
        for m in re.finditer(r"(?:Non-2xx or 3xx responses|Socket errors: .*?timeout) (\d+)", out):
            result.failed += int(m.group(1))
        return result
    return python_health_load(label, url, args, http2=http2)


def _python_health_worker(url: str, connections: int, duration: float, http2: bool, queue) -> None:
    async def main() -> tuple[int, int]:
        ok = failed = 0
        deadline = time.monotonic() + duration
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(http1=not http2, http2=http2, limits=limits, timeout=10) as client:

            async def loop() -> None:
                nonlocal ok, failed
                while time.monotonic() < deadline:
                    try:
                        response = await client.get(url)
                        ok += response.status_code == 200
                        failed += response.status_code != 200
                    except httpx.HTTPError:
                        failed += 1

            await asyncio.gather(*(loop() for _ in range(connections)))
        return ok, failed

    queue.put(asyncio.run(main()))


def python_health_load(label: str, url: str, args: argparse.Namespace, *, http2: bool) -> HealthResult:
    import multiprocessing

    procs_n = max(1, args.health_threads)
    per = max(1, args.health_connections // procs_n)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_python_health_worker, args=(url + "/health", per, args.health_duration, http2, queue))
        for _ in range(procs_n)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    ok = failed = 0
    for _ in procs:
        with contextlib.suppress(Exception):
            a, b = queue.get(timeout=args.health_duration + 60)
            ok, failed = ok + a, failed + b
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    wall = time.perf_counter() - t0
    return HealthResult(
        label, rps=ok / wall, ok=ok, failed=failed, tool=f"python httpx, {procs_n} processes", command="(built in)"
    )


# --- daemon processes and memory ---------------------------------------------------------------


@dataclass
class MemorySnapshot:
    rows: list[tuple[str, int, int, int, str]]  # role, pid, rss, pss, cmdline

    def total(self, roles: set[str]) -> tuple[int, int]:
        rss = sum(r[2] for r in self.rows if r[0] in roles)
        pss = sum(r[3] for r in self.rows if r[0] in roles)
        return rss, pss


def snapshot(roles: dict[str, list[int]]) -> MemorySnapshot:
    rows = []
    for role, pids in roles.items():
        for pid in pids:
            rss, pss = memory_of(pid)
            rows.append((role, pid, rss, pss, cmdline_of(pid)))
    return MemorySnapshot(rows)


FOUR = {"supervisor", "frontend", "tokenizer", "scheduler"}


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all processes), from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


def idle_cpu_percent(pids: list[int], window_s: float) -> float:
    before = cpu_seconds(pids)
    time.sleep(window_s)
    return 100.0 * (cpu_seconds(pids) - before) / window_s


IDLE_WINDOW_S = 3.0


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --- logs ------------------------------------------------------------------------------------------


def peer_log_findings(log_path: Path) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if re.search(r"Traceback|ERROR|Exception|error", ln)]
    non200 = [ln for ln in lines if '"POST /v1/completions' in ln and " 200 " not in ln]
    out = [f"{len(bad)} error-looking line(s), {len(non200)} non-200 access line(s)"] if bad or non200 else []
    return out + (bad + non200)[:8]


# --- main --------------------------------------------------------------------------------------


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and what follows for bench/vllm_peer.py (with --peer vllm only)."""
    p = argparse.ArgumentParser(description="daemon vs transformers serve on the demo model", allow_abbrev=False)
    p.add_argument(
        "--peer",
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers: this script's run (default); vllm: bench/vllm_peer.py --bench (W1, W2, W3 against "
        "vLLM's CPU build) with --repeats, --requests, --concurrency, --max-tokens, --h2-connections, "
        "--load-time-limit, --total-time-limit and --keep passed on, and any of its own options after them "
        "(e.g. --workloads W1)",
    )
    p.add_argument("--requests", type=int, default=500, help="completions per load run")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    p.add_argument("--repeats", type=int, default=3, help="load runs per configuration; the table shows the median run")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy on both servers")
    p.add_argument(
        "--h1-client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="HTTP/1.1 load client (HTTP/2 always uses httpx)",
    )
    p.add_argument("--h2-connections", type=int, default=4, help="h2c connections for the daemon's HTTP/2 run")
    p.add_argument("--total-time-limit", type=int, default=1800, help="seconds for the whole run, at most")
    p.add_argument("--load-time-limit", type=float, default=300.0, help="seconds per load run, at most")
    p.add_argument("--health-connections", type=int, default=128)
    p.add_argument("--health-duration", type=int, default=10, help="seconds of /health load per server")
    p.add_argument("--health-threads", type=int, default=1, help="load generator threads (h2load -t / wrk -t)")
    p.add_argument("--warmup-rounds", type=int, default=2, help="bursts of --concurrency completions before measuring")
    p.add_argument(
        "--no-crosscheck",
        dest="crosscheck",
        action="store_false",
        help="skip the extra completion runs driven by h2load (one fixed prompt)",
    )
    p.add_argument("--skip-peer", action="store_true", help="no transformers serve (daemon figures only)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both the daemon and the peer (e.g. OMP_NUM_THREADS=1); repeatable. "
        "Default: none, both run as shipped",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args, rest = p.parse_known_args()
    if rest and args.peer != "vllm":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def vllm_peer_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """bench/vllm_peer.py's command line for --peer vllm: its bench, W1 in this script's load shape."""
    argv = ["--bench"]
    for option, value in (
        ("--repeats", args.repeats),
        ("--requests", args.requests),
        ("--concurrency", args.concurrency),
        ("--max-tokens", args.max_tokens),
        ("--h2-connections", args.h2_connections),
        ("--load-time-limit", args.load_time_limit),
        ("--total-time-limit", args.total_time_limit),
    ):
        argv += [option, str(value)]
    return argv + (["--keep"] if args.keep else []) + rest


def main() -> int:
    args, rest = parse_args()
    if args.peer == "vllm":
        import vllm_peer  # bench/ is on sys.path as the script's directory

        argv = vllm_peer_argv(args, rest)
        print(f"--peer vllm: bench/vllm_peer.py {shlex.join(argv)}", flush=True)
        return vllm_peer.main(argv)
    client_loop = use_uvloop()

    frame = RunFrame("dm-bench-", args.total_time_limit)
    work, runtime_dir, cache_dir = frame.work, frame.runtime_dir, frame.cache_dir
    prompts = make_prompts(max(args.requests, 64))
    results: list[LoadResult] = []  # the median run (by req/s) of each configuration
    all_runs: dict[str, list[LoadResult]] = {}
    crosschecks: list[H2loadResult] = []
    health: list[HealthResult] = []
    mem_idle = mem_after = None
    peer_rss = None
    idle_cpu: dict[str, float] = {}
    print_header("serving", work, runtime_dir, versions())

    # SIGTERM (e.g. from `timeout`), the overall time limit and errors end the block; the servers are stopped.
    with frame.guarded():
        model_dir = frame.demo_model()

        server_env = dict(kv.split("=", 1) for kv in args.server_env)
        daemon_port = free_port()
        daemon = Server(
            "daemon",
            [
                str(BIN / "daemon"),
                "-c",
                str(CONFIG),
                "--set",
                f"server.port={daemon_port}",
                "--set",
                f"runtime.dir={runtime_dir}",
                "--set",
                f"runtime.cache_dir={cache_dir}",
                "--set",
                "logging.format=json",
            ],
            clean_env(**server_env),
            daemon_port,
            work / "daemon.log",
            is_daemon=True,
        )
        peer_port = free_port()
        peer = Server(
            "transformers serve",
            [
                str(BIN / "transformers"),
                "serve",
                "--continuous-batching",
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(peer_port),
                str(model_dir),
            ],
            clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **server_env),
            peer_port,
            work / "peer.log",
        )
        hello_port = free_port()
        hello = Server(
            "granian hello",
            [str(sys.executable), str(BENCH / "hello_app.py"), "--host", "127.0.0.1", "--port", str(hello_port)],
            clean_env(),
            hello_port,
            work / "hello.log",
        )
        from hello_app import granian_options  # noqa: E402  (bench/ is on sys.path as the script's directory)

        print("\n## commands")
        extra = "".join(f"{shlex.quote(kv)} " for kv in args.server_env)
        print(f"daemon: {extra}{shlex.join(daemon.argv)}")
        print(
            f"peer:   HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 {extra}{shlex.join(peer.argv)}"
            + ("  (skipped)" if args.skip_peer else "")
        )
        print(f"hello:  {shlex.join(hello.argv)}")
        options = {key: str(value) for key, value in granian_options("127.0.0.1", hello_port).items()}
        options.pop("log_dictconfig")
        print(f"        Granian settings: {options}")
        print(
            f"load:   {args.concurrency} closed-loop clients, {args.requests} completions per run, "
            f"max_tokens {args.max_tokens}, temperature {args.temperature}, prompts of 3-9 words (seeded), "
            f"ignore_eos on the daemon (the peer rejects the field: 422), tokens counted from usage; "
            f"HTTP/1.1 client {args.h1_client}, HTTP/2 client httpx, on {client_loop}, one client process; "
            f"each run bounded to {args.load_time_limit:.0f} s"
        )

        deadline = time.monotonic() + START_TIMEOUT_S
        frame.start(daemon)
        if not args.skip_peer:
            frame.start(peer)
        frame.start(hello)

        waited = wait_http_ok(daemon, "/health", deadline, ready_event='"daemon.ready"')
        print(f"\ndaemon ready after {waited:.1f} s on {daemon.url}")
        if not args.skip_peer:
            waited = wait_http_ok(peer, "/health", deadline)
            print(f"peer answering /health after {waited:.1f} s more on {peer.url}")
        waited = wait_http_ok(hello, "/", deadline)
        print(f"granian hello answering on {hello.url}")

        # Warm-up, then idle memory and idle CPU.
        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(warm_up(daemon.url, prompts, args, True, args.warmup_rounds), 120))
        print(f"daemon warm-up: {time.monotonic() - t0:.1f} s")
        if not args.skip_peer:
            t0 = time.monotonic()
            asyncio.run(asyncio.wait_for(warm_up(peer.url, prompts, args, False, args.warmup_rounds), 180))
            print(f"peer warm-up: {time.monotonic() - t0:.1f} s")
        roles = daemon_processes(daemon, runtime_dir)
        all_daemon = [pid for pids in roles.values() for pid in pids]
        idle_cpu["daemon (all processes)"] = idle_cpu_percent(all_daemon, IDLE_WINDOW_S)
        mem_idle = snapshot(roles)
        if not args.skip_peer:
            idle_cpu["transformers serve"] = idle_cpu_percent([peer.process.pid], IDLE_WINDOW_S)
            peer_rss = memory_of(peer.process.pid)
        for who, pct in idle_cpu.items():
            print(f"idle CPU over {IDLE_WINDOW_S:.0f} s, {who}: {pct:.1f}% of one core")

        def run_crosscheck(label: str, url: str, ignore_eos: bool, http2: bool) -> None:
            print(f"\nrunning: {label}, h2load client, one fixed prompt ...", flush=True)
            check = h2load_completions(
                label,
                url,
                completion_body(prompts[0], args, ignore_eos),
                frame.work,
                requests=args.requests,
                concurrency=args.concurrency,
                http2=http2,
                h2_connections=args.h2_connections,
                time_limit=args.load_time_limit,
            )
            if check is None:
                print("  (no h2load: skipped)")
                return
            crosschecks.append(check)
            print(f"  {check.command}")
            print(
                f"  {check.ok}/{args.requests} ok: {check.rps:.1f} req/s, mean latency {check.mean_ms:.0f} ms, "
                f"failures {check.failed}"
            )
            if not check.rps:
                print(check.raw[-1500:])

        # Completion load: the peer first, then it is stopped so that it takes no CPU from the daemon's runs.
        runs = []
        if not args.skip_peer:
            runs.append(("transformers serve, HTTP/1.1", peer.url, False, False))
        runs += [("daemon, HTTP/1.1", daemon.url, True, False), ("daemon, HTTP/2 (h2c)", daemon.url, True, True)]
        for label, url, ignore_eos, http2 in runs:
            if label.startswith("daemon") and peer.alive():
                if args.crosscheck:
                    run_crosscheck("transformers serve, HTTP/1.1", peer.url, False, False)
                frame.stop(peer, " (after its run)")
            watched = roles if label.startswith("daemon") else {"transformers serve": [peer.process.pid]}
            runs_of_label = []
            for repeat in range(args.repeats):
                print(f"\nrunning: {label}, run {repeat + 1}/{args.repeats} ...", flush=True)
                cpu_before = {role: cpu_seconds(pids) for role, pids in watched.items()}
                busy_before = machine_busy_seconds()
                result = asyncio.run(
                    run_load(
                        label,
                        url,
                        prompts,
                        args,
                        ignore_eos=ignore_eos,
                        http2=http2,
                        total=args.requests,
                        concurrency=args.concurrency,
                        time_limit_s=args.load_time_limit,
                    )
                )
                result.server_cpu = {role: cpu_seconds(pids) - cpu_before[role] for role, pids in watched.items()}
                result.other_cpu_s = (
                    machine_busy_seconds() - busy_before - sum(result.server_cpu.values()) - result.client_cpu_s
                )
                runs_of_label.append(result)
                print(
                    f"  {result.ok}/{result.requests} ok in {result.wall_s:.2f} s: {result.rps:.1f} req/s, "
                    f"{result.tps:.0f} tok/s, p50 {result.pct(0.5) * 1000:.0f} ms, "
                    f"p99 {result.pct(0.99) * 1000:.0f} ms, failures {result.failures} {result.errors or ''}; "
                    f"{result.short} short completions; client CPU {result.client_cpu_s:.1f} s ({result.connections})"
                )
                print(
                    "  server CPU during the run: "
                    + ", ".join(f"{role} {sec:.1f} s" for role, sec in result.server_cpu.items())
                    + f" (wall {result.wall_s:.2f} s, {os.cpu_count()} cores); "
                    f"everything else on the machine (other processes, softirq): {max(0.0, result.other_cpu_s):.1f} s"
                )
            all_runs[label] = runs_of_label
            median = sorted(runs_of_label, key=lambda r: r.rps)[len(runs_of_label) // 2]
            results.append(median)

        if args.crosscheck:
            run_crosscheck("daemon, HTTP/1.1", daemon.url, True, False)
            run_crosscheck("daemon, HTTP/2 (h2c)", daemon.url, True, True)

        # /health.
        for label, server, http2 in (
            ("daemon /health, HTTP/1.1", daemon, False),
            ("granian hello, HTTP/1.1", hello, False),
            ("daemon /health, HTTP/2 (h2c)", daemon, True),
            ("granian hello, HTTP/2 (h2c)", hello, True),
        ):
            print(f"\nrunning: {label} ...", flush=True)
            result = health_load(label, server.url, args, http2=http2)
            health.append(result)
            print(f"  {result.tool}: {result.command}")
            print(f"  {result.rps:.0f} req/s, {result.ok} ok, {result.failed} failed")
            if not result.rps:
                print(result.raw[-2000:])

        time.sleep(3)
        mem_after = snapshot(daemon_processes(daemon, runtime_dir))

    # --- report ----------------------------------------------------------------------------------
    print("\n## shutdown")
    for line in frame.stops:
        print(f"- {line}")
    still = [pid for s in frame.servers if s.is_daemon and s.process for pid in marked_pids(s.process.pid)]
    print(f"- processes left with the daemon's marker: {still or 'none'}")

    for s in frame.servers:
        findings = daemon_log_findings(s.log_path) if s.is_daemon else peer_log_findings(s.log_path)
        if s.name == "granian hello":
            continue
        print(f"\n## {s.name} log ({s.log_path}): {'nothing notable' if not findings else ''}")
        for line in findings[:20]:
            print(f"- {line}")

    if mem_idle:
        print("\n## daemon memory (RSS and PSS from /proc/<pid>/smaps_rollup)")
        print("| role | pid | RSS idle after warm-up | PSS | RSS after the load runs | command |")
        print("|---|---|---|---|---|---|")
        after = {r[1]: r for r in (mem_after.rows if mem_after else [])}
        for role, pid, rss, pss, cmd in mem_idle.rows:
            later = mb(after[pid][2]) if pid in after else "-"
            print(f"| {role} | {pid} | {mb(rss)} | {mb(pss)} | {later} | `{cmd[:70]}` |")
        if mem_after:
            for role, pid, rss, _, cmd in mem_after.rows:
                if pid not in {r[1] for r in mem_idle.rows}:
                    print(f"| {role} (new) | {pid} | - | - | {mb(rss)} | `{cmd[:70]}` |")
        four_rss, four_pss = mem_idle.total(FOUR)
        worker_rss, worker_pss = mem_idle.total({"worker"})
        print(
            f"\nsupervisor + front-end (Granian main and worker) + tokenizer + scheduler: {mb(four_rss)} RSS "
            f"({mb(four_pss)} PSS); worker: {mb(worker_rss)} RSS ({mb(worker_pss)} PSS)"
        )
        if peer_rss:
            print(f"peer (one process, model included), after warm-up: {mb(peer_rss[0])} RSS ({mb(peer_rss[1])} PSS)")

    print("\n## results")
    h1_client = (
        f"aiohttp {metadata.version('aiohttp')}"
        if args.h1_client == "aiohttp"
        else f"httpx {metadata.version('httpx')}"
    )
    print(
        f"Machine: {os.cpu_count()} cores ({cpu_model()}); the load client runs on the same cores as the servers. "
        f"Completions: {args.concurrency} closed-loop clients, {args.requests} requests per run, "
        f"max_tokens {args.max_tokens}, temperature {args.temperature}, median of {args.repeats} runs "
        f"(min-max in brackets); HTTP/1.1 client {h1_client}, HTTP/2 client httpx {metadata.version('httpx')} "
        f"over {args.h2_connections} h2c connections. /health: {args.health_connections} connections for "
        f"{args.health_duration} s ({health[0].tool if health else '-'}). "
        f"Servers' extra environment: {' '.join(args.server_env) or 'none (as shipped)'}."
    )
    print()
    print("| measure | daemon | transformers serve / bare Granian | ratio | goal |")
    print("|---|---|---|---|---|")

    def spread(label: str, value) -> str:
        values = [value(r) for r in all_runs.get(label, [])]
        return f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""

    def failures(label: str) -> str:
        runs = all_runs.get(label, [])
        return f"{sum(r.failures for r in runs)} of {sum(r.requests for r in runs)}"

    by = {r.label: r for r in results}
    peer_label = "transformers serve, HTTP/1.1"
    peer_r = by.get(peer_label)
    for label in ("daemon, HTTP/1.1", "daemon, HTTP/2 (h2c)"):
        r = by.get(label)
        if not r:
            continue
        proto = label.split(", ", 1)[1]
        vs = " (peer over HTTP/1.1)" if "HTTP/2" in proto else ""
        rps = lambda x: x.rps  # noqa: E731
        tps = lambda x: x.tps  # noqa: E731
        ratio = f"{r.rps / peer_r.rps:.1f}x" if peer_r and peer_r.rps else "-"
        peer_cell = f"{peer_r.rps:.1f}{spread(peer_label, rps)}" if peer_r else "-"
        print(f"| completions req/s, {proto} | {r.rps:.1f}{spread(label, rps)} | {peer_cell}{vs} | {ratio} | >= 5x |")
        ptps = f"{peer_r.tps:.0f}{spread(peer_label, tps)}" if peer_r else "-"
        tratio = f"{r.tps / peer_r.tps:.1f}x" if peer_r and peer_r.tps else "-"
        print(f"| generated tokens/s, {proto} | {r.tps:.0f}{spread(label, tps)} | {ptps}{vs} | {tratio} | |")
        p50 = f"{peer_r.pct(0.5) * 1000:.0f} / {peer_r.pct(0.99) * 1000:.0f}" if peer_r else "-"
        print(f"| latency p50 / p99 ms, {proto} | {r.pct(0.5) * 1000:.0f} / {r.pct(0.99) * 1000:.0f} | {p50}{vs} | | |")
        pf = failures(peer_label) if peer_r else "-"
        print(f"| failures, {proto} (all runs) | {failures(label)} | {pf}{vs} | | 0 |")
    cc = {c.label: c for c in crosschecks}
    peer_cc = cc.get(peer_label)
    for label in ("daemon, HTTP/1.1", "daemon, HTTP/2 (h2c)"):
        c = cc.get(label)
        if not c:
            continue
        proto = label.split(", ", 1)[1]
        vs = " (peer over HTTP/1.1)" if "HTTP/2" in proto else ""
        ratio = f"{c.rps / peer_cc.rps:.1f}x" if peer_cc and peer_cc.rps else "-"
        peer_cell = f"{peer_cc.rps:.1f}, {peer_cc.failed} failed{vs}" if peer_cc else "-"
        print(
            f"| cross-check: completions req/s, {proto}, h2load client, one fixed prompt | "
            f"{c.rps:.1f}, {c.failed} failed | {peer_cell} | {ratio} | |"
        )
    hb = {h.label: h for h in health}
    for proto in ("HTTP/1.1", "HTTP/2 (h2c)"):
        d, g = hb.get(f"daemon /health, {proto}"), hb.get(f"granian hello, {proto}")
        if d and g:
            ratio = f"{d.rps / g.rps:.2f}" if g.rps else "-"
            goal = ">= 0.5" if proto == "HTTP/1.1" else ""
            print(
                f"| /health req/s, {proto}, {args.health_connections} conns | {d.rps:.0f} | "
                f"{g.rps:.0f} (bare Granian hello) | {ratio} | {goal} |"
            )
            if d.failed or g.failed:
                print(f"| /health failures, {proto} | {d.failed} | {g.failed} | | 0 |")
    if mem_idle:
        four_rss, _ = mem_idle.total(FOUR)
        worker_rss, _ = mem_idle.total({"worker"})
        print(f"| idle RSS: supervisor + front-end (2 procs) + tokenizer + scheduler | {mb(four_rss)} | | | < 500 MB |")
        print(f"| idle RSS: model worker | {mb(worker_rss)} | | | |")
        if peer_rss:
            print(f"| RSS after warm-up, whole server | | {mb(peer_rss[0])} (transformers serve) | | |")
    return frame.finish(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
