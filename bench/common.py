"""What the benchmarks share (bench/serve.py, bench/vllm_peer.py, bench/reload.py): the paths, the servers
they start and stop (the daemon's marked processes too), the completion load's client side (prompts,
transports, warm-up, percentiles, h2load), and the run's frame (temp dirs, limits, header, versions, the
daemon's log findings, the servers stopped whatever happens).

bench/ is on sys.path as the scripts' directory: they import this module as `common`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "configs" / "server.toml"

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 40.0
REQUEST_TIMEOUT_S = 120.0

_WORD_TEXT = """
the river house light water garden morning evening story letter window music voice small great little
old long first last early quiet gentle strong simple careful curious famous ancient modern distant
mountain valley forest island harbour market station library bridge village winter summer spring autumn
child teacher doctor farmer painter sailor writer stranger friend walked carried opened watched listened
"""


WORDS = _WORD_TEXT.split()


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another program listens on (this one), for as long as the block runs."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)
        yield holder.getsockname()[1]


def marked_pids(supervisor_pid: int) -> list[int]:
    """Live processes started by the daemon's supervisor: they carry DAEMON_PARENT_PID=<pid>."""
    marker = f"DAEMON_PARENT_PID={supervisor_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return sorted(found)


def ppid_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    return None


def cmdline_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    is_daemon: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=REPO,
                start_new_session=True,  # its own process group: the whole group is killed at the end
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> str:
        """SIGTERM, wait; then SIGKILL the process group and (daemon) every marked process left."""
        if self.process is None:
            return "not started"
        pid = self.process.pid
        outcome = "already exited"
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
                outcome = f"stopped by SIGTERM (exit {self.process.returncode})"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(10)
                outcome = f"did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM: killed"
        else:
            outcome = f"already exited ({self.process.returncode})"
        # Anything left in its process group (e.g. a Granian worker), then the daemon's marked processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        leftovers = marked_pids(pid) if self.is_daemon else []
        for child in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if leftovers:
            outcome += f"; killed {len(leftovers)} leftover process(es) {leftovers}"
        return outcome


def wait_http_ok(server: Server, path: str, deadline: float, *, ready_event: str | None = None) -> float:
    """Poll until `path` answers 200 (and, for the daemon, its log has `ready_event`); seconds waited."""
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited ({server.process.returncode}):\n{server.log_tail()}")
            if ready_event is None or ready_event in server.log_path.read_text(errors="replace"):
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(server.url + path).status_code == 200:
                        return time.monotonic() - started
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def read_status(runtime_dir: Path, supervisor_pid: int) -> dict | None:
    """The supervisor's status.json (in its socket directory under runtime.dir); None while unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((runtime_dir / f"daemon-{supervisor_pid}" / "status.json").read_text())
    return None


def daemon_processes(daemon: Server, runtime_dir: Path) -> dict[str, list[int]]:
    """The daemon's processes by role: supervisor, frontend (Granian main + workers), tokenizer, scheduler, worker."""
    supervisor = daemon.process.pid
    status = read_status(runtime_dir, supervisor)
    if status is None:
        raise RuntimeError(f"no readable status.json for supervisor {supervisor} under {runtime_dir}")
    roles: dict[str, list[int]] = {"supervisor": [supervisor]}
    by_pid: dict[int, str] = {supervisor: "supervisor"}
    for tier in status["tiers"]:
        roles.setdefault(tier["tier"], []).append(tier["pid"])
        by_pid[tier["pid"]] = tier["tier"]
    # Granian's workers (and anything else started under a tier) carry the marker, with a tier as parent.
    for pid in marked_pids(supervisor):
        if pid in by_pid:
            continue
        parent = ppid_of(pid)
        role = by_pid.get(parent, "other")
        role = "frontend" if role == "frontend" else f"{role} (child)" if role != "other" else "other"
        roles.setdefault(role, []).append(pid)
    return roles


# --- completion load ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def make_prompts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def completion_body(prompt: str, args: argparse.Namespace, ignore_eos: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


class Transport:
    """POSTs JSON and returns (status, body); one per load run."""

    description = ""
    errors: tuple = ()

    async def post(self, url: str, body: dict) -> tuple[int, bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class AiohttpH1(Transport):
    """HTTP/1.1 keep-alive connections, at most `connections` of them (aiohttp: a light client)."""

    def __init__(self, connections: int):
        import aiohttp

        self.errors = (aiohttp.ClientError, asyncio.TimeoutError)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.description = f"aiohttp {metadata.version('aiohttp')}, {connections} HTTP/1.1 keep-alive connections"

    async def post(self, url: str, body: dict) -> tuple[int, bytes]:
        async with self.session.post(url, json=body) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self.session.close()


class HttpxTransport(Transport):
    """httpx: HTTP/1.1 with `connections` connections, or h2c (prior knowledge) over `connections` connections."""

    errors = (httpx.HTTPError,)

    def __init__(self, connections: int, http2: bool, streams: int):
        version = metadata.version("httpx")
        if http2:
            # Each client holds one connection and multiplexes its share of the streams on it.
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            self.clients = [
                httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=REQUEST_TIMEOUT_S)
                for _ in range(connections)
            ]
            per = -(-streams // connections)
            self.description = f"httpx {version}, {connections} h2c connections, up to {per} streams each"
        else:
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            self.clients = [httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)]
            self.description = f"httpx {version}, {connections} HTTP/1.1 keep-alive connections"
        self._next = 0

    async def post(self, url: str, body: dict) -> tuple[int, bytes]:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        response = await client.post(url, json=body)
        return response.status_code, response.content

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


def make_transport(args: argparse.Namespace, http2: bool) -> Transport:
    if http2:
        return HttpxTransport(max(1, min(args.h2_connections, args.concurrency)), True, args.concurrency)
    if args.h1_client == "aiohttp":
        return AiohttpH1(args.concurrency)
    return HttpxTransport(args.concurrency, False, args.concurrency)


async def warm_up(url: str, prompts: list[str], args: argparse.Namespace, ignore_eos: bool, rounds: int) -> None:
    """One completion (it also starts the peer's batching loop), then `rounds` bursts at full concurrency."""
    transport = make_transport(args, http2=False)
    try:
        status, content = await transport.post(url + "/v1/completions", completion_body(prompts[0], args, ignore_eos))
        if status != 200:
            raise RuntimeError(f"warm-up completion: HTTP {status}: {content[:300]!r}")
        burst = prompts[-args.concurrency :]
        for _ in range(rounds):
            answers = await asyncio.gather(
                *(transport.post(url + "/v1/completions", completion_body(p, args, ignore_eos)) for p in burst)
            )
            bad = [status for status, _ in answers if status != 200]
            if bad:
                raise RuntimeError(f"warm-up burst: {len(bad)} non-200 answers ({sorted(set(bad))})")
    finally:
        await transport.close()


# --- h2load ---------------------------------------------------------------------------------------


@dataclass
class H2loadResult:
    """One h2load run, read from its summary: req/s, answered (2xx) and failed requests, mean latency."""

    label: str
    command: str
    rps: float = 0.0
    ok: int = 0
    failed: int = 0  # non-2xx answers, errors and timeouts; with a request count, every request not answered 2xx
    requests: int = 0  # asked for; 0 for a run bounded by time
    mean_ms: float = float("nan")
    raw: str = ""


def parse_h2load(label: str, argv: list[str], out: str, requests: int = 0) -> H2loadResult:
    result = H2loadResult(label, shlex.join(argv), requests=requests, raw=out)
    if m := re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out):
        result.rps = float(m.group(1))
    unanswered = 0
    if m := re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out):
        result.ok = int(m.group(1))
        result.failed = int(m.group(2)) + int(m.group(3)) + int(m.group(4))
        unanswered = int(m.group(3)) + int(m.group(4))
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out):
        # Only a 2xx is a success here; h2load's "failed" may or may not hold the other statuses: the larger.
        result.ok = min(result.ok, int(m.group(1)))
        result.failed = max(result.failed, unanswered + int(m.group(2)) + int(m.group(3)) + int(m.group(4)))
    if m := re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out):
        result.mean_ms = _h2load_ms(m.group(3))
    if requests:
        result.failed = max(result.failed, requests - result.ok)  # h2load killed or cut short: the rest failed
    return result


def _h2load_ms(text: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float("nan")


def h2c_shape(concurrency: int, h2_connections: int) -> tuple[int, int]:
    """(connections, streams on each) that keep `concurrency` requests in flight over h2c."""
    connections = max(1, min(h2_connections, concurrency))
    return connections, -(-concurrency // connections)


def h2load_completions(
    label: str,
    url: str,
    body: dict,
    work: Path,
    *,
    requests: int,
    concurrency: int,
    http2: bool,
    h2_connections: int,
    time_limit: float,
) -> H2loadResult | None:
    """A closed loop of `requests` POSTs of one fixed completion body, `concurrency` in flight, driven by
    h2load (C, so nearly free of client cost): HTTP/1.1 over `concurrency` connections, or h2c over
    `h2_connections` connections sharing the streams. None without h2load."""
    h2load = shutil.which("h2load")
    if not h2load:
        return None
    body_path = work / f"body-{abs(hash(label))}.json"
    body_path.write_text(json.dumps(body))
    if http2:
        connections, streams = h2c_shape(concurrency, h2_connections)
        shape = ["-c", str(connections), "-m", str(streams)]
    else:
        shape = ["--h1", "-c", str(concurrency)]
    argv = [h2load, "-n", str(requests), *shape, "-t", "1", "-d", str(body_path)]
    # -N bounds the wait for an answer; -T would close a busy connection after that long, mid-run.
    argv += ["-H", "content-type: application/json", "-N", str(int(REQUEST_TIMEOUT_S)), url + "/v1/completions"]
    return parse_h2load(label, argv, run_tool(argv, time_limit), requests)


def abba_rounds(
    rounds: int, loads: list[str], run: Callable[[str], tuple[float, int, str]]
) -> tuple[dict[str, list[float]], int]:
    """Each load run once a round, two loads in ABBA order (the one that ran second runs first the
    next round, so that a drift of the shared machine's speed weighs on both alike), each run
    printed: `run(load)` gives its rate (generated tok/s), failed requests and the engine's line.
    Returns the rates by load, round by round, and the failed requests."""
    measured: dict[str, list[float]] = {name: [] for name in loads}
    failures = 0
    for round_ in range(rounds):
        for name in loads if round_ % 2 == 0 else loads[::-1]:
            rate, failed, line = run(name)
            measured[name].append(rate)
            failures += failed
            print(f"round {round_ + 1}, {name}: {rate:,.0f} generated tok/s ({failed} failed)", flush=True)
            print(f"  engine: {line}", flush=True)
    return measured, failures


def ratio_line(what: str, baseline: list[float], measured: list[float]) -> str:
    """`what`, round by round and the median: each round's two runs are neighbours in time, so their
    ratio is the figure the noise of a shared machine disturbs least."""
    ratios = [m / b for b, m in zip(baseline, measured, strict=True)]
    return (
        f"{what}, round by round: "
        + ", ".join(f"{100 * (r - 1):+.0f}%" for r in ratios)
        + f"; median {100 * (statistics.median(ratios) - 1):+.0f}%"
    )


# --- logs, machine, run ---------------------------------------------------------------------------


def daemon_log_findings(log_path: Path) -> list[str]:
    """Warnings, errors and tier restarts in the daemon's JSON log."""
    found, restarts, counts = [], 0, {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.strip():
                counts["non-JSON line"] = counts.get("non-JSON line", 0) + 1
                if counts["non-JSON line"] <= 5:
                    found.append(f"non-JSON: {line[:300]}")
            continue
        level = str(record.get("level", "")).lower()
        event = str(record.get("event", ""))
        if event == "tier.started" and record.get("epoch", 1) != 1:
            restarts += 1
        if level in {"warning", "error", "critical", "exception"} or event in {"tier.exited", "tier.crashed"}:
            key = f"{level} {event}"
            counts[key] = counts.get(key, 0) + 1
            if counts[key] <= 3:
                found.append(json.dumps(record)[:400])
    summary = [f"{n} x {key}" for key, n in sorted(counts.items())]
    if restarts:
        summary.append(f"{restarts} tier restart(s) (tier.started with epoch > 1)")
    return summary + found


def run_tool(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        return f"timed out after {timeout} s\n{exc.stdout or ''}"


def versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for dist in ("daemon", "torch", "transformers", "granian", "uvicorn", "fastapi", "httpx", "h2"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    if shutil.which("h2load"):
        out = run_tool(["h2load", "--version"], 10).strip().splitlines()
        parts.append(out[0] if out else "h2load")
    return ", ".join(parts)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def print_header(what: str, work: Path, runtime_dir: Path, versions_line: str) -> None:
    print(f"# daemon {what} benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: nproc={os.cpu_count()} ({cpu_model()}), {platform.platform()}")
    print(f"versions: {versions_line}")
    print(f"work dir: {work} (runtime.dir {runtime_dir})")
    print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}")


def limit_run(seconds: int, overtime: type[BaseException]) -> Callable[[], None]:
    """SIGTERM ends the run as ^C would, and so does `seconds` running out (raising `overtime`).
    Returns what installs the handlers again (after an event loop replaced them)."""

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def out_of_time(signum, frame):
        raise overtime(f"the whole run took longer than --total-time-limit {seconds} s")

    def install() -> None:
        signal.signal(signal.SIGTERM, interrupted)
        signal.signal(signal.SIGALRM, out_of_time)

    install()
    signal.alarm(seconds)
    return install


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DAEMON_")}
    env.update(extra)
    return env


def use_uvloop() -> str:
    """Run the load client's event loops on uvloop where installed: the loop's name."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"\nNOTE: {note}")


def remove_work(work: Path, runtime_dir: Path, *, keep: bool) -> bool:
    """Remove the run's runtime dir, and its work dir unless `keep`: whether the work dir was kept."""
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(runtime_dir, ignore_errors=True)
    return keep


class RunFrame:
    """What every run that starts servers needs around its measurements: a work directory (logs, the
    demo model's cache) and a short runtime.dir, the time limit, the notes and exit code, and the servers
    it started, each stopped whatever happens (errors, SIGTERM, the limit)."""

    def __init__(self, prefix: str, total_time_limit: int):
        self.work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))  # short: Unix socket paths
        self.cache_dir = self.work / "cache"
        self.total_time_limit = total_time_limit
        self.notes: list[str] = []
        self.stops: list[str] = []  # "<server>: <how it stopped>", in order
        self.servers: list[Server] = []
        self._stopped: set[int] = set()
        self.exit_code = 0

    def demo_model(self) -> Path:
        from daemon.engine.demo_model import ensure_demo_model

        model_dir = ensure_demo_model(self.cache_dir)
        print(f"demo model: {model_dir}")
        return model_dir

    def start(self, server: Server) -> None:
        self.servers.append(server)
        server.start()

    def start_demo_daemon(
        self, settings: dict[str, object] | None = None, name: str = "daemon", config: Path = CONFIG
    ) -> Server:
        """`daemon -c configs/server.toml` (the demo model; or `config`) on a free port, in this run's
        runtime and cache dirs, logging JSON, with `settings` (--set); returned once it logs daemon.ready."""
        port = free_port()
        argv = [str(BIN / "daemon"), "-c", str(config)]
        for key, value in (
            ("server.port", port),
            ("runtime.dir", self.runtime_dir),
            ("runtime.cache_dir", self.cache_dir),
            ("logging.format", "json"),
            *(settings or {}).items(),
        ):
            argv += ["--set", f"{key}={value}"]
        daemon = Server(name, argv, clean_env(), port, self.work / f"{name}.log", is_daemon=True)
        self.start(daemon)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "daemon.ready" not in daemon.log_path.read_text(errors="replace"):
            if not daemon.alive():
                raise RuntimeError(f"the daemon exited:\n{daemon.log_tail()}")
            time.sleep(0.2)
        return daemon

    def stop(self, server: Server, why: str = "") -> str:
        line = f"{server.name}: {server.stop()}{why}"
        self._stopped.add(id(server))
        self.stops.append(line)
        return line

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Runs the block under the time limit; an error, ^C or SIGTERM ends it with a note and an exit code
        instead of a traceback out of main, so that what was measured is still reported."""
        limit_run(self.total_time_limit, TimeoutError)
        try:
            yield
        except Exception as exc:
            self.exit_code = 1
            self.notes.append(f"benchmark aborted: {type(exc).__name__}: {exc}")
            import traceback

            traceback.print_exc()
        except KeyboardInterrupt as exc:
            self.exit_code = 130
            self.notes.append(f"interrupted ({exc or 'SIGINT'})")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the stops below finish
            for server in reversed(self.servers):
                # Also one that exited by itself: its process group (and marked processes) may live on.
                if server.process is not None and (server.alive() or id(server) not in self._stopped):
                    self.stop(server)

    def finish(self, *, keep: bool) -> int:
        """The notes, then the temp directories removed (the work dir kept on request or failure)."""
        print_notes(self.notes)
        if remove_work(self.work, self.runtime_dir, keep=keep or bool(self.exit_code)):
            print(f"\nlogs kept in {self.work}")
        return self.exit_code
