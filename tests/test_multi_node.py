"""Multi-node (distributed.nnodes 2) on loopback: two supervisors, one per "node", each run as
`daemon -c` on a config that differs only by what the environment gives each node (node_rank,
runtime dir), as Ansible or Kubernetes would start them. tp_size 2: one rank on each node.

Node 0 runs every tier and rank 0, which serves the group's store at dist_init_addr; node 1 runs
only its worker, rank 1. One cluster serves the whole module (a start costs seconds); each test
leaves both nodes serving the base config. Greedy output is compared with one node serving the
same demo model alone (tp_size 1), which the tensor-parallel tests already compare with tp_size 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w
from harness.daemons import (
    DAEMON,
    RunningDaemon,
    clean_environ,
    popen_daemon,
    run_daemon,
    serving,
    short_dir,
    stop_daemons,
)
from harness.load import Client, Options, Requests
from harness.metrics import engine_figures
from harness.procs import free_port
from harness.wait import until

from daemon.pids import pid_alive

READY_S = 120.0  # a node is ready within this long (both start at once: node 0 waits for node 1)
READ_TIMEOUT_S = 30.0
KILL_BOUND_S = 10.0  # requests in flight end this soon after node 1 is killed
PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
MAX_TOKENS = 16
NODE_1 = {"DAEMON_DISTRIBUTED__NODE_RANK": "1"}


def node_config(port: int, init_port: int, cache_dir: Path, **model: object) -> str:
    """The file every node reads (the runtime dir comes from each node's environment)."""
    settings = {
        "server": {"host": "127.0.0.1", "port": port},
        "model": {"path": "builtin:demo", "device": "cpu", "tp_size": 2, **model},
        "logging": {"format": "json"},
        "runtime": {"cache_dir": str(cache_dir), "drain_timeout_s": 10, "watch_config": False},
        "distributed": {"nnodes": 2, "dist_init_addr": f"127.0.0.1:{init_port}"},
    }
    return tomli_w.dumps(settings)


@dataclass
class Cluster:
    directory: Path
    port: int
    nodes: list[RunningDaemon]
    runtime_dirs: list[Path]
    started: list[RunningDaemon]

    @property
    def head(self) -> RunningDaemon:
        return self.nodes[0]

    def config(self, node: int) -> Path:
        return self.directory / f"node{node}" / "server.toml"

    def start_node(self, node: int, *, env: dict[str, str] | None = None, wait: bool = True) -> RunningDaemon:
        """`daemon -c` as node `node` would run it, on its copy of the config."""
        runtime = self.runtime_dirs[node]
        node_env = {"DAEMON_RUNTIME__DIR": str(runtime), "GLOO_SOCKET_IFNAME": "lo"}
        if node:
            node_env.update(NODE_1)
        node_env.update(env or {})
        log_path = self.directory / f"node{node}-{len(self.started)}.log"
        process = popen_daemon(["-c", str(self.config(node))], log_path, node_env)
        daemon = RunningDaemon(process, self.port, self.config(node), runtime, log_path)
        self.started.append(daemon)
        self.nodes[node] = daemon
        if wait:
            daemon.wait_for_event("daemon.ready", timeout=READY_S)
        return daemon

    def write(self, text: str) -> None:
        for node in (0, 1):
            self.config(node).write_text(text)

    def reload(self, node: int) -> subprocess.Popen:
        """`daemon reload` of node `node`, running (it waits for the reload's report)."""
        args = ["reload", "--runtime-dir", str(self.runtime_dirs[node]), "--format", "json"]
        return subprocess.Popen(
            [str(DAEMON), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_environ()
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_cache) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("nodes")
    for node in (0, 1):
        (directory / f"node{node}").mkdir()
    cluster = Cluster(directory, free_port(), [None, None], [short_dir(), short_dir()], [])  # type: ignore[list-item]
    cluster.write(node_config(cluster.port, free_port(), model_cache))
    try:
        cluster.start_node(0, wait=False)
        cluster.start_node(1)
        cluster.head.wait_for_event("daemon.ready", timeout=READY_S)
        yield cluster
    finally:
        for runtime in cluster.runtime_dirs[1:]:  # stop_daemons removes one dir: the other here
            stop_daemons([d for d in cluster.started if d.runtime_dir == runtime], runtime, drain_s=15)
        head_dir = cluster.runtime_dirs[0]
        stop_daemons([d for d in cluster.started if d.runtime_dir == head_dir], head_dir, drain_s=15)


@pytest.fixture
def nodes(cluster: Cluster) -> Cluster:
    """The cluster with node 1 running (a test that failed half-way may have left it stopped) and
    the group formed, before each test."""
    if cluster.nodes[1].process.poll() is not None:
        cluster.start_node(1)
    wait_group_serving(cluster)
    return cluster


@pytest.fixture(scope="module")
def one_node_greedy(tmp_path_factory, model_cache) -> list[str]:
    """What the demo model writes greedily for PROMPTS on one node, tp_size 1."""
    with serving(tmp_path_factory.mktemp("one-node"), model_cache, {"model.device": "cpu"}) as daemon:
        return greedy(daemon.url)


def greedy(url: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=READ_TIMEOUT_S).raise_for_status().json()
        texts.append(answer["choices"][0]["text"])
    return texts


def head_ranks(cluster: Cluster) -> list[dict]:
    """The ranks of the group node 0's worker leads ([] while it has none up)."""
    info = httpx.get(cluster.head.url + "/server_info", timeout=10).raise_for_status().json()
    return (info["model"] or {}).get("ranks", [])


def node_worker_pid(cluster: Cluster) -> int:
    return cluster.nodes[1].tier_pids()["worker-0"]


def wait_group_serving(cluster: Cluster, timeout: float = READY_S) -> None:
    """Until the head's worker is up with a rank on each node, node 1's being the worker node 1's
    supervisor runs now, and a request goes through."""

    def formed() -> bool:
        try:
            ranks = head_ranks(cluster)
            node_pid = node_worker_pid(cluster)
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            return False
        return [(r["rank"], r["node"]) for r in ranks] == [(0, 0), (1, 1)] and ranks[1]["pid"] == node_pid

    until(formed, timeout, interval=0.5, what="the group formed over both nodes")
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    until(
        lambda: httpx.post(cluster.head.url + "/v1/completions", json=body, timeout=READ_TIMEOUT_S).status_code == 200,
        timeout,
        interval=0.5,
        what="a completion through both nodes",
    )


def test_two_nodes_serve_greedy_output_equal_to_one_node(nodes, one_node_greedy):
    cluster = nodes
    assert greedy(cluster.head.url) == one_node_greedy
    ranks = head_ranks(cluster)
    assert ranks[0]["pid"] == cluster.head.tier_pids()["worker-0"]
    # node 1 runs its worker and nothing else: no front-end, scheduler or tokenizer
    assert list(cluster.nodes[1].tier_pids()) == ["worker-0"]
    for node in (0, 1):  # each node's `daemon status` lists the ranks it holds (node 0's: every rank)
        status = run_daemon("status", "--runtime-dir", str(cluster.runtime_dirs[node]))
        assert status.returncode == 0 and "cpu (node 1)" in status.stdout, status.stdout + status.stderr


def test_check_says_what_each_node_runs_and_the_hash_they_share(tmp_path: Path, model_cache):
    config = tmp_path / "server.toml"
    config.write_text(node_config(8000, 29500, model_cache))

    def plan(**env: str) -> dict:
        result = run_daemon("check", "-c", str(config), "--format", "json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["node"]

    head, node1 = plan(), plan(DAEMON_DISTRIBUTED__NODE_RANK="1", DAEMON_RUNTIME__DIR="/tmp/node-1")
    assert head["tiers"] == ["worker", "scheduler", "tokenizer", "frontend"] and head["ranks"] == [0]
    assert node1["tiers"] == ["worker"] and node1["ranks"] == [1]
    assert node1["joins_group_at"] == head["serves_group_at"] == "127.0.0.1:29500"
    assert head["group_hash"] == node1["group_hash"]  # node_rank and the runtime dir are the node's own
    assert plan(DAEMON_MODEL__SEED="7")["group_hash"] != head["group_hash"]
    text = run_daemon("check", "-c", str(config), env={"DAEMON_DISTRIBUTED__NODE_RANK": "1"}).stdout
    assert "node 1 of 2 runs only its worker, rank 1 of 2, joining node 0 at 127.0.0.1:29500" in text, text


def test_node_one_killed_under_load_then_back(nodes, one_node_greedy):
    """kill -9 of node 1's whole daemon: requests in flight on node 0 end with a 503 (or an error
    event) promptly, node 0 keeps running and holds new ones; node 1 started again, the group
    re-forms and serves the same output."""
    cluster = nodes
    node1 = cluster.nodes[1]
    old_rank = node_worker_pid(cluster)
    clients = [Client(protocol, stream, False) for protocol in ("h1", "h2") for stream in (True, False)]
    load = Requests(cluster.head.url, clients, Options(max_tokens=1500, read_timeout=READ_TIMEOUT_S))
    load.wait_streaming()
    # every request in the engine (the non-streamed ones too): none still on its way in, which
    # would be held for the worker's return (and end with a 503 only after runtime.drain_timeout_s)
    until(lambda: engine_figures(cluster.head)[0] >= len(clients), 15, interval=0.05, what="all requests running")
    killed_at = time.monotonic()
    os.killpg(node1.pid, signal.SIGKILL)  # the supervisor and its worker: a machine gone
    node1.process.wait(10)
    outcomes = load.join(KILL_BOUND_S + READ_TIMEOUT_S)
    report = f"{load.report()}\n{cluster.head.log_tail(20)}"
    assert any(o.explicit_error for o in outcomes), f"the kill hit no request in flight\n{report}"
    for outcome in outcomes:
        assert outcome.kind == "complete" or outcome.explicit_error, report
        if outcome.explicit_error:
            assert outcome.ended_at - killed_at <= KILL_BOUND_S, f"{outcome.label} took too long\n{report}"
        if outcome.kind == "http-error":
            assert outcome.status == 503, report
    until(lambda: not pid_alive(old_rank), 10, what="node 1's rank gone with its supervisor")
    assert cluster.head.process.poll() is None, cluster.head.log_tail()
    assert cluster.head.events("tier.regrouping", tier="worker"), "node 0's worker did not leave the group"

    cluster.start_node(1)
    wait_group_serving(cluster)
    assert greedy(cluster.head.url) == one_node_greedy


def test_node_with_another_config_is_refused_on_both_sides(nodes):
    """Node 1 started with a different model.seed: node 0 refuses it, and both log the key that
    differs; node 1 keeps coming back (no crash loop) until it runs the same config."""
    cluster = nodes
    cluster.nodes[1].stop()
    mark = cluster.head.log.mark()
    odd = cluster.start_node(1, env={"DAEMON_MODEL__SEED": "7"}, wait=False)
    head_refusal = cluster.head.log.wait("worker.node_refused", since=mark, timeout=READY_S, node=1)
    assert head_refusal is not None
    node_refusal = odd.wait_for_event("worker.node_refused", timeout=READY_S)
    for refusal in (head_refusal, node_refusal):
        assert "model.seed" in refusal["reason"] and "differs from node 0's" in refusal["reason"], refusal
    odd.wait_for_event("tier.regrouping", timeout=READY_S)  # started again, not counted as a crash
    until(lambda: len(odd.events("worker.node_refused")) >= 2, READY_S, what="node 1 refused a second time")
    assert odd.process.poll() is None and not odd.events("tier.died"), odd.log_tail()
    odd.stop()
    cluster.start_node(1)
    wait_group_serving(cluster)


def test_reload_on_every_node_reforms_the_group(nodes, one_node_greedy):
    """A worker setting changed in every node's file, then `daemon reload` on each: node 0 drains and
    starts a new rank 0, which waits for node 1; node 1 restarts its worker with the new config and
    joins; both report the reload applied, and the output is the same."""
    cluster = nodes
    old_ranks = {r["pid"] for r in head_ranks(cluster)}
    text = cluster.config(0).read_text().replace("tp_size = 2\n", "tp_size = 2\nseed = 3\n")
    assert "seed = 3" in text
    cluster.write(text)
    head_reload = cluster.reload(0)  # its new rank 0 waits for node 1 to come with the same config
    node_reload = cluster.reload(1)
    try:
        node_out, _ = node_reload.communicate(timeout=READY_S)
        head_out, _ = head_reload.communicate(timeout=READY_S)
    finally:
        for command in (head_reload, node_reload):
            if command.poll() is None:
                command.kill()
                command.communicate()
    assert node_reload.returncode == 0 and '"applied"' in node_out, node_out
    assert head_reload.returncode == 0 and '"applied"' in head_out, head_out
    wait_group_serving(cluster)
    assert not {r["pid"] for r in head_ranks(cluster)} & old_ranks, "the group was not formed anew"
    assert greedy(cluster.head.url) == one_node_greedy
    assert [e for e in cluster.head.events("worker.node_joined") if e.get("generation") == 2], "joined under gen 2"
