"""lm-eval's loglikelihood and multiple-choice tasks against the daemon, scored as lm-eval's own
`hf` model scores them on the same checkpoint.

lm-eval's `local-completions` model asks the daemon for `echo: true, logprobs: 1, max_tokens: 1`
and reads the prompt tokens' logprobs (prompt scoring); its `hf` model runs transformers in
process. Both run here with the real `lm_eval` console script, on the demo model, with tasks
made in tests/lm_eval_task (no download), batch size 4, and every item's scores (the
continuation's log-likelihood and whether it is the greedy one) must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.daemons import REPO, clean_environ, serving

from daemon.engine.demo_model import ensure_demo_model

LM_EVAL = Path(sys.executable).parent / "lm_eval"  # the installed console script

TASKS = {"daemon_demo_loglik": "continuations.jsonl", "daemon_demo_choice": "choices.jsonl"}
LM_EVAL_TIMEOUT_S = 240
TOLERANCE = 2e-4  # float32 sums of a few log-probabilities, computed two ways


def start_lm_eval(model: str, model_args: str, output: Path, *extra: str) -> subprocess.Popen:
    """lm_eval on TASKS with `model`, started (its output under `output`)."""
    argv = [
        str(LM_EVAL),
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        "tests/lm_eval_task",
        "--batch_size",
        "4",
        "--output_path",
        str(output),
        "--log_samples",
        *extra,
    ]
    env = clean_environ(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(output / "hf"))
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def samples_of(run: subprocess.Popen, output: Path) -> dict[str, list[dict]]:
    """Each task's samples, by task, once `run` has ended well."""
    try:
        log, _ = run.communicate(timeout=LM_EVAL_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, log[-4000:]
    samples = {}
    for task in TASKS:
        (found,) = output.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in found.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


@pytest.fixture(scope="module")
def scores(tmp_path_factory, model_cache) -> tuple[dict, dict]:
    assert LM_EVAL.exists(), f"{LM_EVAL} is missing: lm-eval is in the test extra (pip install -e '.[test]')"
    model_dir = ensure_demo_model(model_cache)
    output = tmp_path_factory.mktemp("lm-eval")
    # the same prompts both ways: each backend has its own default for the BOS token, so both are told;
    # the two runs go side by side (most of each is starting lm_eval, and waiting for answers)
    reference = start_lm_eval(
        "hf", f"pretrained={model_dir},dtype=float32,add_bos_token=True", output / "hf", "--device", "cpu"
    )
    try:
        with serving(tmp_path_factory.mktemp("daemon"), model_cache) as daemon:
            model_args = (
                f"model=demo,base_url={daemon.url}/v1/completions,tokenizer={model_dir},"
                "tokenizer_backend=huggingface,add_bos_token=True"
            )
            served = samples_of(start_lm_eval("local-completions", model_args, output / "daemon"), output / "daemon")
        return served, samples_of(reference, output / "hf")
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


@pytest.mark.parametrize("task", TASKS)
def test_every_item_scores_as_lm_evals_hf_model(scores, task):
    served, reference = scores
    assert [s["doc_id"] for s in served[task]] == [s["doc_id"] for s in reference[task]]
    items = len((REPO / "tests" / "lm_eval_task" / TASKS[task]).read_text().splitlines())
    assert len(served[task]) == items
    for ours, theirs in zip(served[task], reference[task], strict=True):
        assert len(ours["resps"]) == len(theirs["resps"]), ours["doc_id"]
        for (ours_ll, ours_greedy), (theirs_ll, theirs_greedy) in (
            (r[0], t[0]) for r, t in zip(ours["resps"], theirs["resps"], strict=True)
        ):
            assert float(ours_ll) == pytest.approx(float(theirs_ll), abs=TOLERANCE), ours["doc_id"]
            assert ours_greedy == theirs_greedy, ours["doc_id"]
