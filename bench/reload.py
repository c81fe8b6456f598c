"""Hot reload under load: how long each kind of config change takes to serve, and what it costs the clients.

    .venv/bin/pip install -e '.[bench]'      # aiohttp, uvloop (the load client)
    .venv/bin/python bench/reload.py         # --help for the knobs; ~3 minutes on 2 cores

What it does, in order (every wait is bounded, the whole run by --total-time-limit;
every process it starts is stopped at the end, on errors and SIGTERM too, by PID):

1. Writes a config file into a directory of its own (configs/server.toml with a free
   port, runtime.dir and runtime.cache_dir in temp directories, JSON logs,
   runtime.watch_config = true, model.context_length 2048, runtime.hang_timeout_s
   --hang-timeout) and starts `daemon -c <that file>` on the demo model.
   The model load time is read from the daemon's log at start: the worker's
   tier.started to its tier.ready.
2. Warms up, then starts a closed-loop load that runs until the end: --clients
   clients (64), each sending its next completion when the last one is answered
   (max_tokens 16, ignore_eos, prompts of 3-9 words; every other client streams,
   with usage), over aiohttp HTTP/1.1 keep-alive connections. Clients never retry:
   a failed request is counted, the client pauses --error-pause seconds and sends
   its next one. After a lead-in it measures --steady seconds of steady state.
3. For each repeat, for each class of change, while the load runs: edits the config
   file the way editors do (write a temp file, os.replace it over the config) and
   waits for the supervisor's config.reload log event that follows:
     live       scheduler.max_queued_requests 1024 <-> 1000   (pushed to every tier)
     tokenizer  tokenizer.workers 1 <-> 2                      (a new pool; the old one drains)
     frontend   server.workers 1 <-> 2                         (a new Granian on the same socket; the old drains)
     model      model.seed +1                                  (the worker is replaced; new requests are held)
     model-bg   model.seed +1, runtime.model_reload blue_green (the new worker loads beside the old one)
     model-rolling  model.seed +1, runtime.model_reload rolling (with --dp-size 2: one replica at a
                time is drained and replaced while the other serves; with one replica, as model)
     context    model.context_length 2048 <-> 1024             (as model; the tokenizer follows the new limit)
   Then it waits until every tier is up again and --settle seconds have passed.
   Two more classes are faults, not changes that should succeed (bench/reload_faults.py):
     doomed     server.port to a port this script holds, model.seed +1: must be rejected in
                its prepare phase with every process unchanged; then the file is written back
     frozen     SIGSTOP of the model worker: the supervisor must declare it hung after
                runtime.hang_timeout_s, kill it and start a new one; requests in flight end
   After the last round, one change back to the starting config (every class that
   differs at once: reported per change, not in the table), and --steady seconds of
   steady state again, on the same config as the first.
4. Stops the load, runs `daemon reload --runtime-dir DIR --format json` once (the
   file has not changed since: "unchanged" expected), stops the daemon, and prints
   the commands, the machine, the versions, the daemon's log findings, per-trial
   details and a markdown table (medians over the repeats).

Definitions (also printed with the table):
- time to new generation: from the os.replace of the config file to the timestamp
  of the supervisor's config.reload event (result "applied"), which it logs once the
  whole transaction is done: file watch debounce, check, new tiers up, old ones
  drained and gone, live settings acknowledged by every tier. It is cross-checked
  by the first request that started after that event and succeeded (it can only
  have been served by the new generation's processes): the goals are checked
  against that one. /server_info is read after
  each change to check that the front-end reports the new generation and value.
- reload window: from the write to 1 s (--window-tail) after the config.reload
  event. A request is in the window when its lifetime overlaps it. Failed requests
  are counted by kind (HTTP status, connection closed before/while answering,
  reset, error event in a stream, timeout); p99 is over the window's successes.
- steady p99: the successful requests wholly inside the steady-state measurement
  before the first change (and, for comparison, after the last one).
- doomed and frozen: see bench/reload_faults.py (times from the write, or from the
  SIGSTOP; the requests in flight at the freeze are counted apart from the others).

The load client runs on the same cores as the daemon (2 on the build machines),
and other work on the machine moves the figures: read them as rough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

# bench/ is on sys.path as the script's directory: common.py is what both benchmarks share, the
# reload_*.py and daemon_files.py modules are this one's parts.
from common import (
    BIN,
    CONFIG,
    REPO,
    START_TIMEOUT_S,
    Server,
    clean_env,
    daemon_log_findings,
    daemon_processes,
    free_port,
    limit_run,
    make_prompts,
    marked_pids,
    percentile,
    print_header,
    print_notes,
    remove_work,
    use_uvloop,
    versions,
    wait_http_ok,
    warm_up,
)
from daemon_files import LogTail, config_text, tier_startups, write_atomically
from reload_changes import CLASSES as CHANGE_CLASSES
from reload_changes import CONTEXT_LENGTHS, Bench, Trial, changed, describe_report, reload_argv, run_trial
from reload_faults import (
    FAULT_CLASSES,
    doomed_line,
    freeze_line,
    print_fault_details,
    print_fault_results,
    run_doomed,
    run_frozen,
)
from reload_load import Load, failures_by_kind, ok_latencies
from reload_report import fmt_ms, fmt_s, print_changes, print_results, steady_p99

STOP_LOAD_GRACE_S = 40.0  # after the last change, how long requests in flight may take to finish
CLASSES = CHANGE_CLASSES + FAULT_CLASSES


class Overtime(KeyboardInterrupt):
    """--total-time-limit ran out (a KeyboardInterrupt, so that it also leaves an asyncio loop)."""


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Hot reload of the daemon under a closed-loop load: time to the new generation, failed "
        "requests and p99 latency while each class of config change (live field, tokenizer, front-end, model "
        "worker, context length) is applied by editing the watched config file; and two faults: a reload that "
        "must be rejected (doomed), a model worker frozen by SIGSTOP (frozen).",
    )
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients (HTTP/1.1 keep-alive connections)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every completion (with ignore_eos)")
    p.add_argument(
        "--stream-percent", type=int, default=50, help="share of the clients that stream (SSE, with usage), in %%"
    )
    p.add_argument("--repeats", type=int, default=3, help="changes of each class; the table shows medians")
    p.add_argument("--dp-size", type=int, default=1, help="model.dp_size of the daemon (2: rolling reloads)")
    p.add_argument(
        "--classes",
        default=",".join(CLASSES),
        help=f"comma-separated classes of change to run, in this order (default: {','.join(CLASSES)})",
    )
    p.add_argument("--lead-in", type=float, default=5.0, help="seconds of load before the steady-state measurement")
    p.add_argument("--steady", type=float, default=6.0, help="seconds of steady-state measurement (before and after)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a reload before the next change")
    p.add_argument(
        "--window-tail", type=float, default=1.0, help="seconds after the config.reload event still in its window"
    )
    p.add_argument(
        "--trigger",
        choices=("file", "command"),
        default="file",
        help="file: the daemon's watcher (runtime.watch_config) sees the new file; command: watch_config off, "
        "and `daemon reload --format json` is run after each write",
    )
    p.add_argument("--reload-timeout", type=float, default=120.0, help="longest wait for one reload, in seconds")
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=5.0,
        help="runtime.hang_timeout_s of the daemon (the frozen class waits this long for tier.hung), in seconds",
    )
    p.add_argument("--error-pause", type=float, default=0.1, help="seconds a client waits after a failed request")
    p.add_argument(
        "--max-requests", type=int, default=0, help="stop the load after this many requests (0: only by time)"
    )
    p.add_argument("--load-time-limit", type=float, default=600.0, help="seconds the load may run, at most")
    p.add_argument("--total-time-limit", type=int, default=900, help="seconds for the whole run, at most")
    p.add_argument("--warmup-rounds", type=int, default=2, help="bursts of --clients completions before the load")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory afterwards: config, daemon log, and every request in requests.csv",
    )
    args = p.parse_args()
    args.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if unknown := [c for c in args.classes if c not in CLASSES]:
        p.error(f"unknown class(es) {unknown}; choose from {', '.join(CLASSES)}")
    # What common.warm_up reads.
    args.concurrency, args.temperature, args.h1_client = args.clients, 0.0, "aiohttp"
    return args


async def measure(bench: Bench, values: dict[str, dict], prompts: list[str], out: dict) -> None:
    """The load and the changes; results go into `out` as they come (an abort keeps what was measured)."""
    args, daemon = bench.args, bench.daemon
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda s=signum: (out.setdefault("cancelled_by", s), main.cancel()))

    load = Load(daemon.url, prompts, args)
    out["load"] = load
    await load.start()
    try:
        print(f"\nload running: {args.clients} clients; lead-in {args.lead_in:g} s", flush=True)
        await asyncio.sleep(args.lead_in)
        out["steady_before"] = (time.time(), time.time() + args.steady)
        await asyncio.sleep(args.steady)
        steady = load.inside(*out["steady_before"])
        print(
            f"steady state: {len(steady)} requests in {args.steady:g} s, p50 "
            f"{fmt_ms(percentile(ok_latencies(steady), 0.5))} ms, p99 {fmt_ms(percentile(ok_latencies(steady), 0.99))} "
            f"ms, failures {failures_by_kind(steady) or 0}",
            flush=True,
        )
        trials: list[Trial] = out["trials"]
        initial = values

        def label(kind: str, repeat: int) -> str:
            return f"change {repeat + 1}/{args.repeats}, {kind}" if kind in CLASSES else kind

        async def one(kind: str, repeat: int, new_values: dict[str, dict], change: str) -> None:
            nonlocal values
            print(f"\n{label(kind, repeat)}: ", end="", flush=True)
            trial, values = await run_trial(bench, kind, repeat, values, new_values, change)
            trials.append(trial)
            print(
                f"{trial.change}: {trial.result} generation {trial.generation}, restarted "
                f"{trial.restarted or 'nothing'}, config.reload {fmt_s(trial.to_generation)} s after the write "
                f"(watcher {fmt_s(trial.detected - trial.written)} s, transaction {fmt_s(trial.duration_s)} s)"
                + (f"; {trial.reason}" if trial.reason else "")
                + (f"; daemon reload: {trial.command_report}" if trial.command_report else ""),
                flush=True,
            )

        for repeat in range(args.repeats):
            for kind in args.classes:
                if kind not in FAULT_CLASSES:
                    await one(kind, repeat, *changed(values, kind))
                    continue
                print(f"\n{label(kind, repeat)}: ", end="", flush=True)
                if kind == "doomed":
                    out["doomed"].append(doomed := await run_doomed(bench, repeat, values))
                    print(doomed_line(doomed), flush=True)
                elif freeze := await run_frozen(bench, repeat):
                    out["freezes"].append(freeze)
                    print(freeze_line(freeze), flush=True)
                else:
                    print("no model worker up to stop", flush=True)
        # Back to the starting config (one change of everything that differs), so that the steady
        # state after the changes runs the same config as the one before them.
        if differs := [
            f"{section}.{key} {values[section][key]} -> {wanted}"
            for section, keys in initial.items()
            for key, wanted in keys.items()
            if values[section][key] != wanted
        ]:
            await one("restore", 0, initial, "back to the start: " + ", ".join(differs))
        out["steady_after"] = (time.time(), time.time() + args.steady)
        await asyncio.sleep(args.steady)
    finally:
        print("\nstopping the load ...", flush=True)
        await load.stop(STOP_LOAD_GRACE_S)
        for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main() -> int:
    args = parse_args()
    client_loop = use_uvloop()

    t_begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dm-reload-", dir="/tmp"))
    runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))  # short: Unix socket paths
    cache_dir = work / "cache"
    etc = work / "etc"  # the watched directory holds the config file alone
    etc.mkdir()
    config_path = etc / "server.toml"
    prompts = make_prompts(1024)
    daemon: Server | None = None
    log: LogTail | None = None
    out: dict = {"trials": [], "doomed": [], "freezes": []}
    notes: list[str] = []
    stop_line = ""
    reload_command = ""
    startup_load = float("nan")
    exit_code = 0

    reinstall_limits = limit_run(args.total_time_limit, Overtime)
    client = f"aiohttp {metadata.version('aiohttp')}, load client loop {client_loop}"
    print_header("hot reload", work, runtime_dir, f"{versions()}, {client}")
    print(f"bench command: {shlex.join([sys.executable, *sys.argv])}")

    try:
        from daemon.engine.demo_model import ensure_demo_model

        print(f"demo model: {ensure_demo_model(cache_dir)}")
        port = free_port()
        values = tomllib.loads(CONFIG.read_text())
        values["server"]["port"] = port
        values["server"]["workers"] = 1
        values["tokenizer"]["workers"] = 1
        values["scheduler"]["max_queued_requests"] = 1024
        values["model"]["seed"] = 0
        values["model"]["context_length"] = CONTEXT_LENGTHS[0]
        values["runtime"]["hang_timeout_s"] = args.hang_timeout
        values["runtime"]["model_reload"] = "drain"
        values["model"]["dp_size"] = args.dp_size
        values["logging"]["format"] = "json"
        values["runtime"].update(dir=str(runtime_dir), cache_dir=str(cache_dir))
        values["runtime"]["watch_config"] = args.trigger == "file"
        write_atomically(config_path, config_text(values))
        daemon = Server("daemon", [str(BIN / "daemon"), "-c", str(config_path)], clean_env(), port, work / "daemon.log")
        daemon.is_daemon = True
        log = LogTail(daemon.log_path)

        print("\n## commands")
        print(f"daemon: {shlex.join(daemon.argv)}  (cwd {REPO}; no DAEMON_* variables)")
        print(f"config ({config_path}), as started:\n")
        print("    " + config_text(values).strip().replace("\n", "\n    "))
        print(
            f"\nload: {args.clients} closed-loop clients, POST /v1/completions, max_tokens {args.max_tokens}, "
            f"ignore_eos, greedy, prompts of 3-9 words (seeded), {args.stream_percent}% of the clients streaming "
            f"(SSE with usage); aiohttp HTTP/1.1 keep-alive on {client_loop}, one client process; no retries "
            f"(a client pauses {args.error_pause:g} s after a failure); bounded to {args.load_time_limit:g} s"
            + (f" and {args.max_requests} requests" if args.max_requests else "")
        )
        how = (
            "the daemon's watcher (runtime.watch_config) reloads it"
            if args.trigger == "file"
            else f"then `{shlex.join(reload_argv(runtime_dir))}` reloads it"
        )
        print(
            f"changes: the config file is rewritten (temp file + os.replace) and {how}; classes "
            f"{', '.join(args.classes)}, {args.repeats} rounds, then one change back to the starting config"
        )

        deadline = time.monotonic() + START_TIMEOUT_S
        daemon.start()
        waited = wait_http_ok(daemon, "/health", deadline, ready_event='"daemon.ready"')
        print(f"\ndaemon ready after {waited:.1f} s on {daemon.url} (supervisor PID {daemon.process.pid})")
        log.poll()
        workers = [s for s in tier_startups(log.records) if s["tier"] == "worker"]
        if workers:
            startup_load = workers[0]["ready"] - workers[0]["started"]
            print(f"model load time at start (worker tier.started -> tier.ready, idle machine): {startup_load:.2f} s")

        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(warm_up(daemon.url, prompts, args, True, args.warmup_rounds), 120))
        print(f"warm-up: {time.monotonic() - t0:.1f} s")

        with contextlib.suppress(asyncio.CancelledError):  # a signal cancelled it: see out["cancelled_by"]
            bench = Bench(args, daemon, config_path, runtime_dir, log)
            asyncio.run(measure(bench, values, prompts, out))
        reinstall_limits()  # the loop's handlers are gone with it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if (signum := out.get("cancelled_by")) == signal.SIGALRM:
            raise Overtime(f"the whole run took longer than --total-time-limit {args.total_time_limit} s")
        if signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        roles = daemon_processes(daemon, runtime_dir)
        out["processes"] = {role: len(pids) for role, pids in roles.items()}

        # One reload by command: nothing changed since the last one.
        reload_command = shlex.join(reload_argv(runtime_dir))
        done = subprocess.run(
            reload_argv(runtime_dir), capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO
        )
        out["command_reload"] = describe_report(done.returncode, done.stdout, done.stderr)
    except Overtime as exc:
        exit_code = 1
        notes.append(f"benchmark aborted: {exc}")
    except KeyboardInterrupt as exc:
        exit_code = 130
        notes.append(f"interrupted ({exc or 'SIGINT'})")
    except Exception as exc:  # report what happened, still stop everything and print what was measured
        exit_code = 1
        notes.append(f"benchmark aborted: {type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the stop below finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if daemon is not None:
            stop_line = daemon.stop()

    # --- report --------------------------------------------------------------------------------------
    trials: list[Trial] = out["trials"]
    doomed, freezes = out["doomed"], out["freezes"]
    windows = [*trials, *(d.trial for d in doomed), *freezes]  # every class's measured window
    load: Load | None = out.get("load")
    if load is not None:
        for window in windows:
            window.attach(load)

    if load is not None and args.keep:
        with open(work / "requests.csv", "w") as stream:
            stream.write("started,ended,stream,failure\n")
            for r in load.records:
                stream.write(f"{r.started:.6f},{r.ended:.6f},{int(r.stream)},{json.dumps(r.failure or '')}\n")

    print("\n## shutdown")
    print(f"- daemon: {stop_line or 'not started'}")
    if daemon is not None and daemon.process is not None:
        still = marked_pids(daemon.process.pid)
        print(f"- processes left with the daemon's marker: {still or 'none'}")
    if "processes" in out:
        print(f"- the daemon's processes after the last change, by role: {out['processes']}")
    if "command_reload" in out:
        print(f"- `{reload_command}`: {out['command_reload']}")
    if load is not None and load.crashes:
        print(f"- load clients: {load.crashes}")
    if daemon is not None:
        findings = daemon_log_findings(daemon.log_path)
        print(f"\n## daemon log ({daemon.log_path}): {'nothing notable' if not findings else ''}")
        for line in findings[:25]:
            print(f"- {line}")

    print_changes(trials, notes)
    print_fault_details(doomed, freezes, notes)
    print_results(args, out, trials, load, startup_load, [r for w in windows for r in w.in_window])
    print_fault_results(doomed, freezes, steady_p99(load, out))
    print_notes(notes)
    print(f"\nwhole run: {time.monotonic() - t_begin:.0f} s")
    if remove_work(work, runtime_dir, keep=bool(args.keep or exit_code)):
        print(f"logs kept in {work}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
