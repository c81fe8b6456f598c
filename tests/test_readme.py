"""The README stays honest: its commands work as written and its generated sections are current.

Run `python tests/test_readme.py` to regenerate the generated sections.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness.daemons import REPO, RunningDaemon, popen_daemon, run_daemon, short_dir
from harness.procs import free_port

README = REPO / "README.md"
GENERATED = re.compile(r"(<!-- BEGIN generated: (?P<command>[^>]+?) -->\n)(?P<body>.*?)(<!-- END generated -->)", re.S)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _generated(command: str) -> str:
    result = run_daemon(*shlex.split(command)[1:])
    assert result.returncode == 0, result.stderr
    return result.stdout


def regenerate() -> None:
    text = README.read_text()
    README.write_text(GENERATED.sub(lambda m: m[1] + "\n" + _generated(m["command"]) + "\n" + m[4], text))


def test_generated_sections_are_current():
    sections = list(GENERATED.finditer(README.read_text()))
    assert {m["command"] for m in sections} == {
        "daemon config reference",
        "daemon config scopes",
        "daemon rules --format markdown",
        "daemon api fields",
        "daemon models",
    }
    for match in sections:
        assert match["body"].strip() == _generated(match["command"]).strip(), (
            f"README section '{match['command']}' is stale: run `python tests/test_readme.py`"
        )


def test_ci_runs_exactly_the_readme_test_command():
    commands = [line for block in _blocks("sh") for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci_lines == commands
    assert "pip install torch==2.13.0 &&" in commands[0]


def test_readme_run_command_installs_and_runs_the_demo_model():
    run = [
        line for block in _blocks("sh") for line in block.splitlines() if line.endswith("daemon -c configs/server.toml")
    ]
    assert len(run) == 1 and "pip install torch==2.13.0 && pip install -e . &&" in run[0]


def test_ci_first_runs_the_readme_run_command_on_a_fresh_install():
    """.ci/fresh-install (which CI runs whole, so it is not run here) comes before the tests, and
    runs the README's own run command: it reads the line from the README, it holds no copy."""
    steps = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert steps[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
    # started before the tests (in the background), and its status awaited after them: both must pass
    started = steps.index('bash .ci/fresh-install >"$fresh_log" 2>&1 &')
    tests = next(n for n, line in enumerate(steps) if "pytest" in line)
    assert started < tests and steps[started + 1] == "fresh=$!" and steps[tests + 1 :] == ['wait "$fresh"'], steps
    run = [line for block in _blocks("sh") for line in block.splitlines() if "daemon -c " in line]
    assert len(run) == 1 and "[test]" not in run[0]
    script = REPO / ".ci" / "fresh-install"
    assert run[0] not in script.read_text()
    printed = subprocess.run(["bash", str(script), "--print-command"], capture_output=True, text=True, timeout=30)
    assert (printed.returncode, printed.stdout) == (0, run[0] + "\n"), printed.stderr


@pytest.mark.parametrize(
    "readme, printed",
    [
        ("```sh\npip install . && daemon -c other.toml\n```\n", "pip install . && daemon -c other.toml\n"),
        ("```sh\ndaemon -c a.toml\ndaemon -c b.toml\n```\n", None),  # ambiguous: refused
        ("```text\ndaemon -c a.toml\n```\n", None),  # not a command
    ],
)
def test_fresh_install_reads_the_run_command_from_its_readme(tmp_path: Path, readme: str, printed: str | None):
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "fresh-install", tmp_path / ".ci")
    (tmp_path / "README.md").write_text(readme)
    result = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "fresh-install"), "--print-command"], capture_output=True, text=True, timeout=30
    )
    if printed is None:
        assert result.returncode != 0 and result.stdout == ""
        assert "could not read the run command from README.md" in result.stderr
    else:
        assert (result.returncode, result.stdout) == (0, printed), result.stderr


# Commands that talk to a running daemon: run by the test that starts one.
TO_RUNNING_DAEMON = re.compile(r"^daemon (reload|status) ")


def _daemon_commands() -> list[str]:
    lines = [line for block in _blocks("sh") for line in block.splitlines()]
    return [line for line in lines if re.match(r"^(\w+=\S+ )*daemon ", line)]


def test_readme_daemon_commands_work_as_written():
    commands = [line for line in _daemon_commands() if not TO_RUNNING_DAEMON.match(line)]
    assert len(commands) >= 4
    for line in commands:
        words = shlex.split(line, comments=True)
        env = dict(w.split("=", 1) for w in words if re.match(r"^\w+=", w) and words.index(w) < words.index("daemon"))
        result = run_daemon(*words[words.index("daemon") + 1 :], env=env)
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"


def test_readme_check_example_output_is_real(tmp_path: Path):
    bad = next(block for block in _blocks("toml") if "prot = 8001" in block)
    (tmp_path / "bad.toml").write_text(bad)
    shown = next(block for block in _blocks("text") if block.startswith("$ daemon check -c bad.toml"))
    result = run_daemon("check", "-c", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == shown.split("\n", 1)[1]


if __name__ == "__main__":
    sys.exit(regenerate())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_commands_work_against_the_default_config(tmp_path: Path, model_cache: Path):
    curls = [line for block in _blocks("sh") for line in block.splitlines() if line.startswith("curl ")]
    assert len(curls) >= 2
    port, runtime = free_port(), short_dir()
    log_path = tmp_path / "daemon.log"
    settings = {"server.port": port, "runtime.dir": runtime, "runtime.cache_dir": model_cache}
    sets = [word for key, value in settings.items() for word in ("--set", f"{key}={value}")]
    process = popen_daemon(["-c", "configs/server.toml", *sets], log_path, cwd=REPO)
    daemon = RunningDaemon(process, port, REPO / "configs/server.toml", runtime, log_path)
    try:
        daemon.wait_for_event("daemon.ready")
        for line in curls:
            result = subprocess.run(
                line.replace("127.0.0.1:8000", f"127.0.0.1:{port}") + " --fail --max-time 60",
                shell=True,
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert result.returncode == 0, f"{line}\n{result.stderr}"
            assert '"choices"' in result.stdout
        controls = [line for line in _daemon_commands() if TO_RUNNING_DAEMON.match(line)]
        assert {line.split()[1] for line in controls} == {"reload", "status"}
        for line in controls:  # with the override the daemon was started with
            result = run_daemon(*shlex.split(line, comments=True)[1:], "--set", f"runtime.dir={runtime}")
            assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
            assert "generation 1" in result.stdout, result.stdout
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        shutil.rmtree(runtime, ignore_errors=True)
