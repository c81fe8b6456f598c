"""lm-eval's `local-completions` model against the real daemon: the README's command, as written.

The command is read from the README's "Evaluating with lm-eval" section and run with the
real `lm_eval` console script; only the port, the cache directory and the output path are
this test's. The task (tests/lm_eval_task) is a small generate_until task made here, so
nothing is downloaded. lm-eval is in the `test` extra: without it these tests fail.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.daemons import REPO, RunningDaemon, clean_environ, serving
from harness.metrics import scrape

from daemon.engine.demo_model import demo_dir_name

LM_EVAL = Path(sys.executable).parent / "lm_eval"  # the installed console script
LM_EVAL_TIMEOUT_S = 150
TASK = "daemon_demo_qa"
QUESTIONS = REPO / "tests" / "lm_eval_task" / "questions.jsonl"
README_URL = "http://127.0.0.1:8000"
README_CACHE = "$HOME/.cache/daemon/"
COMPLETIONS = ("endpoint", "/v1/completions")


def readme_command() -> tuple[dict[str, str], list[str]]:
    """The README's lm_eval command: (environment assignments, argv)."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if " lm_eval " in line]
    assert len(commands) == 1, f"the README should show one lm_eval command, not {commands}"
    words = shlex.split(commands[0])
    start = words.index("lm_eval")
    return dict(word.split("=", 1) for word in words[:start]), words[start + 1 :]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@dataclass
class Evaluation:
    run: subprocess.CompletedProcess
    output: Path
    batch_size: int
    before: dict
    after: dict

    def results(self) -> dict:
        found = list(self.output.rglob("results_*.json"))
        assert len(found) == 1, f"expected one results file under {self.output}: {found}\n{self.log()}"
        return json.loads(found[0].read_text())

    def samples(self) -> list[dict]:
        found = list(self.output.rglob(f"samples_{TASK}_*.jsonl"))
        assert len(found) == 1, f"expected one samples file under {self.output}: {found}\n{self.log()}"
        return [json.loads(line) for line in found[0].read_text().splitlines()]

    def delta(self, name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted(labels)))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def log(self) -> str:
        return (self.run.stdout + self.run.stderr)[-4000:]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


@pytest.fixture(scope="module")
def evaluation(daemon, model_cache, tmp_path_factory) -> Evaluation:
    """The README's command, run once against the daemon, with /metrics read before and after."""
    assert LM_EVAL.exists(), f"{LM_EVAL} is missing: lm-eval is in the test extra (pip install -e '.[test]')"
    env, argv = readme_command()
    args = option(argv, "--model_args")
    model_args = dict(pair.split("=", 1) for pair in args.split(","))
    assert model_args["base_url"] == f"{README_URL}/v1/completions", model_args
    assert model_args["tokenizer"] == README_CACHE + demo_dir_name(), "the README names another demo model directory"
    model_args.update(base_url=f"{daemon.url}/v1/completions", tokenizer=str(model_cache / demo_dir_name()))
    argv[argv.index(args)] = ",".join(f"{key}={value}" for key, value in model_args.items())
    output = tmp_path_factory.mktemp("lm-eval")
    argv[argv.index("--output_path") + 1] = str(output / "results")
    before = scrape(daemon)
    run = subprocess.run(
        [str(LM_EVAL), *argv],
        cwd=REPO,  # the task's data_files path is relative to the repository root
        env=clean_environ(**env, HF_HOME=str(output / "hf")),  # datasets' cache: this run's own
        capture_output=True,
        text=True,
        timeout=LM_EVAL_TIMEOUT_S,
    )
    return Evaluation(run, output / "results", int(option(argv, "--batch_size")), before, scrape(daemon))


def test_lm_eval_scores_the_task(evaluation):
    assert evaluation.run.returncode == 0, evaluation.log()
    results = evaluation.results()
    questions = len(QUESTIONS.read_text().splitlines())
    assert results["n-samples"][TASK] == {"original": questions, "effective": questions}
    score = results["results"][TASK]["exact_match,none"]
    assert 0.0 <= score <= 1.0  # the demo model's text is random: the score says nothing


def test_every_prompt_got_an_answer(evaluation):
    samples = evaluation.samples()
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS.read_text().splitlines())))
    for sample in samples:
        assert len(sample["resps"]) == 1 and len(sample["resps"][0]) == 1, sample
        answer = sample["resps"][0][0]
        assert isinstance(answer, str) and "\n" not in answer, sample  # "\n" is the task's stop string
        assert sample["filtered_resps"] == [answer], sample


def test_requests_came_batched(evaluation):
    """From the daemon's side: each HTTP request carried batch_size prompts, each answered."""
    prompts = len(QUESTIONS.read_text().splitlines())
    assert evaluation.batch_size > 1, "the README's command should send batches"
    assert evaluation.delta("daemon_requests_total", COMPLETIONS, ("status", "200")) == math.ceil(
        prompts / evaluation.batch_size
    )
    assert evaluation.delta("daemon_prompt_tokens_count") == prompts  # one observation per prompt
    assert evaluation.delta("daemon_completion_tokens_count") == prompts
    refused = {
        key: value - evaluation.before.get(key, 0.0)
        for key, value in evaluation.after.items()
        if key[0] == "daemon_requests_total" and COMPLETIONS in key[1] and ("status", "200") not in key[1]
    }
    assert not any(refused.values()), refused
