"""The configuration sources: the TOML file and its line numbers, the environment, env files, --set.

Every test loads real files from a temporary directory through the real
pipeline (`load_config` / `check_config`) or calls the source functions
directly; nothing is mocked. Environments are passed explicitly, so the test
process's own DAEMON_* variables never leak in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.daemons import run_daemon
from harness.files import make_certificate, write_model_dir

from daemon.config.check import check_config, load_config
from daemon.config.errors import ConfigError, OriginKind
from daemon.config.render import render_toml
from daemon.config.schema import SETTINGS
from daemon.config.sources import cli_layer, env_layer, read_env_file
from daemon.config.toml_lines import locate_keys

BASE = '[model]\npath = "builtin:demo"\n'


def write(directory: Path, text: str, name: str = "server.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, **kwargs):
    kwargs.setdefault("environ", {})
    return load_config(path, **kwargs)


def errors_of(path: Path, **kwargs) -> list:
    """The violations that make loading fail (asserting that it does)."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_config(path, **kwargs)
    assert caught.value.violations
    return caught.value.violations


def only(violations: list, rule: str):
    matching = [v for v in violations if v.rule == rule]
    assert len(matching) == 1, [v.to_line() for v in violations]
    return matching[0]


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line of `text` containing `needle`."""
    numbers = [n for n, line in enumerate(text.split("\n"), 1) if needle in line]
    assert len(numbers) == 1, (needle, numbers)
    return numbers[0]


# --- locate_keys: where each key is defined ----------------------------------------------------


def test_locate_tables_and_keys_under_them() -> None:
    text = (
        "# header comment\n"
        "\n"
        "[server]\n"
        'host = "0.0.0.0"\n'
        "  port = 8000   # indented\n"
        "\n"
        "[server.tls]\n"
        'certfile = "c.pem"\n'
        "[model]\n"
        'path = "builtin:demo"\n'
    )
    assert locate_keys(text) == {
        "server": 3,
        "server.host": 4,
        "server.port": 5,
        "server.tls": 7,
        "server.tls.certfile": 8,
        "model": 9,
        "model.path": 10,
    }


def test_locate_dotted_keys_at_top_level_and_in_tables() -> None:
    text = 'model.path = "builtin:demo"\nserver . tls . keyfile = "k"\n[server]\ntls.certfile = "c"\nport=1\n'
    found = locate_keys(text)
    assert found["model.path"] == 1
    assert found["server.tls.keyfile"] == 2
    assert found["server.tls.certfile"] == 4
    assert found["server.port"] == 5


def test_locate_quoted_keys_and_headers() -> None:
    text = (
        "[server]\n"
        '"port" = 1\n'
        "'host' = \"x\"\n"
        "[\"server\".'tls']\n"
        '"certfile" = "a"\n'
        '[ "model" ]\n'
        '"path" = "builtin:demo"\n'
    )
    assert locate_keys(text) == {
        "server": 1,
        "server.port": 2,
        "server.host": 3,
        "server.tls": 4,
        "server.tls.certfile": 5,
        "model": 6,
        "model.path": 7,
    }


def test_locate_inline_table_keys_map_to_the_table_line(tmp_path: Path) -> None:
    text = BASE + '[server]\nport = 8000\ntls = { certfile = "c.pem", keyfile = 42 }\nhost = "127.0.0.1"\n'
    found = locate_keys(text)
    assert found["server.tls"] == 5
    assert "server.tls.keyfile" not in found  # inside the inline table: no line of its own
    assert found["server.host"] == 6
    # ... so an error about a key inside the inline table points at the table's line.
    path = write(tmp_path, text)
    violation = only(errors_of(path), "schema.type")
    assert violation.key == "server.tls.keyfile"
    assert violation.origin.line == 5
    assert f"{path}:5" in violation.to_line()


def test_locate_after_multiline_strings() -> None:
    text = (
        "[model]\n"
        'served_model_name = """\n'
        "[server]\n"
        "port = 1\n"
        '"""\n'
        "path = '''\n"
        "seed = 3\n"
        "'''\n"
        'dtype = """one line"""\n'
        "[server]\n"
        "port = 2\n"
    )
    found = locate_keys(text)
    assert found == {
        "model": 1,
        "model.served_model_name": 2,
        "model.path": 6,
        "model.dtype": 9,
        "server": 10,
        "server.port": 11,
    }


def test_locate_after_multiline_arrays() -> None:
    text = (
        "[model]\n"
        "path = [\n"
        '  "]",  # a bracket in a string ]\n'
        "  [1, 2],\n"
        "  'x = 1',\n"
        "  { a = [3] },\n"
        "]\n"
        "seed = [ # open\n"
        "]\n"
        "dtype = [1, [2]]\n"
        "device = 'cpu'\n"
    )
    found = locate_keys(text)
    assert found == {"model": 1, "model.path": 2, "model.seed": 8, "model.dtype": 10, "model.device": 11}


def test_locate_array_of_tables() -> None:
    text = (
        "[[plugins]]\n"
        "name = 'a'\n"
        "[[plugins]]\n"
        "name = 'b'\n"
        "extra = 1\n"
        "[[server.listeners]]\n"
        "port = 1\n"
        "[server]\n"
        "port = 2\n"
    )
    found = locate_keys(text)
    assert found["plugins"] == 1
    assert found["plugins.extra"] == 5
    assert found["server.listeners"] == 6
    assert found["server.listeners.port"] == 7
    assert found["server.port"] == 9


def test_locate_with_crlf_line_endings() -> None:
    text = "[server]\r\nhost = 'x'\r\n\r\nport = 1\r\n"
    assert locate_keys(text) == {"server": 1, "server.host": 2, "server.port": 4}


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"])
def test_unicode_line_separators_do_not_shift_line_numbers(tmp_path: Path, separator: str) -> None:
    text = BASE + f'# a comment{separator}with a separator\n[server]\nhost = "a{separator}b"\nport = "x"\n'
    path = write(tmp_path, text)
    violation = only(errors_of(path, offline=True), "schema.type")
    assert violation.origin.line == line_of(text, "port =") == 6


def test_multiline_string_inside_inline_table(tmp_path: Path) -> None:
    text = BASE + '[server]\ntls = { min_version = """\nport = 1\n""" }\nport = "x"\n'
    path = write(tmp_path, text)
    violation = only(errors_of(path), "schema.type")
    assert violation.key == "server.port"
    assert violation.origin.line == 7


# --- errors name the right line ----------------------------------------------------------------


LONG_FILE = '''# daemon configuration
# with comments, multi-line values and several tables before the mistake

[server]
host = "127.0.0.1"
port = 8000
# port = "this one is commented out"

[model]
path = "builtin:demo"
served_model_name = """
demo
"""

[scheduler]
policy = "fcfs"
max_queued_requests = [
  1,
  2,
]

[logging]
level = "info"

[server.tls]
min_version = "1.3"
verify_client = "yes please"
'''


def test_wrong_type_deep_in_file_names_its_line(tmp_path: Path) -> None:
    text = LONG_FILE.replace("max_queued_requests = [\n  1,\n  2,\n]", "max_queued_requests = 16")
    path = write(tmp_path, text)
    violation = only(errors_of(path), "schema.type")
    assert violation.key == "server.tls.verify_client"
    assert violation.origin.line == line_of(text, "verify_client =") == 24
    assert violation.to_line().startswith(f"error[schema.type] server.tls.verify_client ({path}:24): ")
    assert "yes please" in violation.message


def test_every_wrong_key_names_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, LONG_FILE)
    by_key = {v.key: v for v in errors_of(path)}
    assert set(by_key) == {"scheduler.max_queued_requests", "server.tls.verify_client"}
    for key, needle in [
        ("scheduler.max_queued_requests", "max_queued_requests ="),
        ("server.tls.verify_client", "verify_client ="),
    ]:
        violation = by_key[key]
        assert violation.rule == "schema.type"
        assert violation.origin.kind is OriginKind.FILE
        assert violation.origin.name == str(path)
        assert violation.origin.line == line_of(LONG_FILE, needle)
        assert f"({path}:{violation.origin.line})" in violation.to_line()


def test_syntax_error_names_its_line(tmp_path: Path) -> None:
    text = BASE + "[server]\nhost = '127.0.0.1'\nport = = 8000\n"
    violation = only(errors_of(write(tmp_path, text)), "file.syntax")
    assert violation.origin.line == 5
    assert "line 5" in violation.message


def test_encoding_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_bytes(BASE.encode() + b"[server]\nhost = '\xff'\n")
    violation = only(errors_of(path), "file.encoding")
    assert violation.origin.line == 4


def test_unknown_key_names_its_line_and_suggests(tmp_path: Path) -> None:
    text = BASE + "[server]\nhost = '127.0.0.1'\nprot = 8001\n"
    violation = only(errors_of(write(tmp_path, text)), "schema.unknown-key")
    assert violation.key == "server.prot"
    assert violation.origin.line == 5
    assert "server.port" in violation.fix


# --- the config file itself --------------------------------------------------------------------


def test_missing_config_file_is_an_error_not_defaults(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    violation = only(errors_of(path, environ={"DAEMON_MODEL__PATH": "builtin:demo"}), "file.missing")
    assert str(path) in violation.message
    report = check_config(path, environ={"DAEMON_MODEL__PATH": "builtin:demo"})
    assert report.config is None and not report.passed()
    assert [v.rule for v in report.violations] == ["file.missing"]


def test_missing_config_file_fails_daemon_check(tmp_path: Path) -> None:
    result = run_daemon("check", "-c", str(tmp_path / "nope.toml"), env={"DAEMON_MODEL__PATH": "builtin:demo"})
    assert result.returncode == 2, result
    assert "error[file.missing]" in result.stdout + result.stderr


def test_directory_as_config_file_is_unreadable(tmp_path: Path) -> None:
    violation = only(errors_of(tmp_path), "file.unreadable")
    assert "directory" in violation.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    path.chmod(0)
    try:
        only(errors_of(path), "file.unreadable")
    finally:
        path.chmod(0o600)


def test_empty_file_is_missing_model_path_not_silently_valid(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, "")), "schema.missing")
    assert violation.key == "model.path"


# --- the environment ---------------------------------------------------------------------------


def test_empty_environment_values_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "[server]\nport = 9000\n")
    loaded = load(
        path,
        environ={
            "DAEMON_SERVER__PORT": "",
            "DAEMON_SERVER__API_KEY": "",
            "DAEMON_SERVER": "",
            "DAEMON_MODEL__PATH": "",
        },
    )
    assert loaded.settings.server.port == 9000
    assert loaded.origin("server.port").kind is OriginKind.FILE
    assert loaded.settings.server.api_key is None
    assert loaded.settings.model.path == "builtin:demo"


def test_empty_values_in_layers_leave_no_origin() -> None:
    layer = env_layer({"DAEMON_SERVER__PORT": "", "DAEMON_LOGGING__LEVEL": "debug"}, lambda name: name)
    assert layer.values == {"logging": {"level": "debug"}}
    assert set(layer.origins) == {"logging.level"}


@pytest.mark.parametrize(
    "name", ["daemon_server__port", "Daemon_Server__Port", "DAEMON_server__PORT", "DAEMON_SERVER__PORT"]
)
def test_environment_names_are_case_insensitive(tmp_path: Path, name: str) -> None:
    loaded = load(write(tmp_path, BASE), environ={name: "9100"})
    assert loaded.settings.server.port == 9100
    assert loaded.origin("server.port").kind is OriginKind.ENV
    assert loaded.origin("server.port").name == name


@pytest.mark.parametrize(
    "name",
    ["DAEMON_OPTS", "daemon_opts", "DAEMON_HOME", "DAEMON_LOG", "DAEMON_", "DAEMON_PARENT_PID", "daemon_parent_pid"],
)
def test_unrelated_daemon_variables_are_ignored(tmp_path: Path, name: str) -> None:
    loaded = load(write(tmp_path, BASE), environ={name: "--verbose {not json"})
    assert loaded.settings.server.port == 8000


def test_parent_pid_variable_is_not_a_setting(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, BASE), environ={"DAEMON_PARENT_PID": "12345"})
    assert "DAEMON_PARENT_PID" not in {o.name for o in loaded.origins.values()}


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("DAEMON_SERVER_PORT", "DAEMON_SERVER__PORT"),
        ("daemon_server_port", "DAEMON_SERVER__PORT"),
        ("DAEMON_SERVER__PROT", "DAEMON_SERVER__PORT"),
        ("DAEMON_SERVER_TLS__CERTFILE", "DAEMON_SERVER__TLS__CERTFILE"),
        ("DAEMON_SCHEDULER__POLICIES", "DAEMON_SCHEDULER__POLICY"),
    ],
)
def test_near_miss_variable_is_an_error_with_did_you_mean(tmp_path: Path, name: str, suggestion: str) -> None:
    violation = only(errors_of(write(tmp_path, BASE), environ={name: "9001"}), "env.unknown-variable")
    assert f"did you mean {suggestion}?" in violation.fix
    assert violation.origin.kind is OriginKind.ENV and violation.origin.name == name


def test_unknown_variable_with_delimiter_is_an_error(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, BASE), environ={"DAEMON_FOO__BAR": "1"}), "env.unknown-variable")
    assert "DAEMON_FOO__BAR" in violation.message
    assert "reference" in violation.fix


def test_table_variable_takes_a_json_object(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[server]\nhost = "0.0.0.0"\nworkers = 2\n')
    loaded = load(
        path, environ={"DAEMON_SERVER": '{"port": 9001, "workers": 3}', "DAEMON_SERVER__TLS": '{"min_version": "1.3"}'}
    )
    server = loaded.settings.server
    assert (server.port, server.workers, server.host, server.tls.min_version) == (9001, 3, "0.0.0.0", "1.3")
    assert loaded.origin("server.port").name == "DAEMON_SERVER"
    assert loaded.origin("server.workers").name == "DAEMON_SERVER"
    assert loaded.origin("server.host").kind is OriginKind.FILE  # merged, not replaced
    assert loaded.origin("server.tls.min_version").name == "DAEMON_SERVER__TLS"


def test_table_variable_with_bad_json_is_invalid_json(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, BASE), environ={"DAEMON_SERVER": '{"port": 9001'}), "env.invalid-json")
    assert violation.key == "server"
    assert "DAEMON_SERVER" in violation.message
    assert violation.origin.name == "DAEMON_SERVER"
    assert "DAEMON_SERVER__" in violation.fix  # shows the one-key-per-variable form


def test_table_variable_with_json_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    violations = errors_of(write(tmp_path, BASE), environ={"DAEMON_SERVER": "[1, 2]"})
    assert all(v.key == "server" for v in violations)


def test_setting_variable_value_is_parsed_to_the_key_type(tmp_path: Path) -> None:
    loaded = load(
        write(tmp_path, BASE),
        environ={
            "DAEMON_SERVER__ENABLE_HTTP2": "false",
            "DAEMON_SCHEDULER__MEM_FRACTION_STATIC": "0.5",
            "DAEMON_LOGGING__LEVEL": "WARNING",
        },
    )
    assert loaded.settings.server.enable_http2 is False
    assert loaded.settings.scheduler.mem_fraction_static == 0.5
    assert loaded.settings.logging.level == "warning"


def test_wrong_typed_environment_value_names_the_variable(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, BASE), environ={"DAEMON_SERVER__PORT": "eighty"}), "schema.type")
    assert violation.key == "server.port"
    assert "(environment variable DAEMON_SERVER__PORT)" in violation.to_line()


def test_environment_beats_file(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, BASE + "[server]\nport = 9000\n"), environ={"DAEMON_SERVER__PORT": "9100"})
    assert loaded.settings.server.port == 9100


# --- env files ---------------------------------------------------------------------------------


def test_env_file_values_apply_beat_environment_and_name_the_file(tmp_path: Path) -> None:
    env_file = write(
        tmp_path,
        "# comment\nDAEMON_SERVER__PORT=9200\nexport DAEMON_LOGGING__LEVEL=debug\nDAEMON_SERVER__HOST=\n",
        "daemon.env",
    )
    path = write(tmp_path, BASE + '[server]\nport = 9000\nhost = "0.0.0.0"\n')
    loaded = load(path, environ={"DAEMON_SERVER__PORT": "9100", "DAEMON_SCHEDULER__POLICY": "lof"}, env_file=env_file)
    assert loaded.settings.server.port == 9200
    assert loaded.settings.logging.level == "debug"
    assert loaded.settings.server.host == "0.0.0.0"  # empty value in the env file: ignored
    assert loaded.settings.scheduler.policy == "lof"  # the process environment still applies
    origin = loaded.origin("server.port")
    assert origin.kind is OriginKind.ENV_FILE and origin.file == env_file
    assert str(origin) == f"DAEMON_SERVER__PORT in env file {env_file}"
    assert loaded.origin("scheduler.policy").kind is OriginKind.ENV


def test_error_from_env_file_value_names_the_file(tmp_path: Path) -> None:
    env_file = write(tmp_path, "DAEMON_SERVER__PORT=eighty\n", "daemon.env")
    violation = only(errors_of(write(tmp_path, BASE), env_file=env_file), "schema.type")
    assert f"env file {env_file}" in violation.to_line()


def test_unknown_variable_in_env_file_is_an_error(tmp_path: Path) -> None:
    env_file = write(tmp_path, "DAEMON_SERVER_PORT=9001\n", "daemon.env")
    violation = only(errors_of(write(tmp_path, BASE), env_file=env_file), "env.unknown-variable")
    assert violation.origin.kind is OriginKind.ENV_FILE


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    env_file = tmp_path / "missing.env"
    violation = only(errors_of(write(tmp_path, BASE), env_file=env_file), "env-file.missing")
    assert str(env_file) in violation.message
    with pytest.raises(ConfigError):
        read_env_file(env_file)


def test_env_file_that_is_not_utf8_is_unreadable(tmp_path: Path) -> None:
    env_file = tmp_path / "daemon.env"
    env_file.write_bytes(b"DAEMON_SERVER__HOST=\xff\xfe\n")
    only(errors_of(write(tmp_path, BASE), env_file=env_file), "env-file.unreadable")


# --- --set -------------------------------------------------------------------------------------


def test_set_beats_environment_and_env_file(tmp_path: Path) -> None:
    env_file = write(tmp_path, "DAEMON_SERVER__PORT=9200\n", "daemon.env")
    loaded = load(
        write(tmp_path, BASE), environ={"DAEMON_SERVER__PORT": "9100"}, env_file=env_file, sets=["server.port=9300"]
    )
    assert loaded.settings.server.port == 9300
    assert loaded.origin("server.port").kind is OriginKind.CLI
    assert str(loaded.origin("server.port")) == "--set server.port"


def test_later_set_beats_earlier_set(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, BASE), sets=["server.port=9001", "server.port=9002"])
    assert loaded.settings.server.port == 9002


def test_set_value_may_contain_equals_signs() -> None:
    layer = cli_layer(["model.served_model_name=a=b"])
    assert layer.values == {"model": {"served_model_name": "a=b"}}


@pytest.mark.parametrize(
    "assignment, rule",
    [
        ("server.port", "cli.syntax"),
        ("=9000", "cli.syntax"),
        ("server.port=", "cli.syntax"),
        ("server.prot=9000", "cli.unknown-key"),
    ],
)
def test_bad_set_is_an_error(tmp_path: Path, assignment: str, rule: str) -> None:
    violation = only(errors_of(write(tmp_path, BASE), sets=[assignment]), rule)
    assert violation.origin.kind is OriginKind.CLI


def test_unknown_set_key_suggests_the_right_one(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, BASE), sets=["server.prot=9000"]), "cli.unknown-key")
    assert "server.port" in violation.fix


def test_set_naming_a_table_does_not_suggest_itself(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, BASE), sets=['server.tls={"min_version": "1.3"}']), "cli.unknown-key")
    assert "did you mean server.tls?" not in violation.fix


# --- relative paths ----------------------------------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: runtime.dir under pytest's tmp_path would be too long
    for Unix socket paths (rule runtime.dir-too-long)."""
    directory = Path(tempfile.mkdtemp(prefix="ds", dir="/tmp")).resolve()
    yield directory
    shutil.rmtree(directory)


def test_relative_paths_in_file_resolve_against_its_directory(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = short_tmp / "etc" / "daemon"
    config_dir.mkdir(parents=True)
    write_model_dir(config_dir / "models" / "tiny")
    (config_dir / "tok").mkdir()
    (config_dir / "tok" / "tokenizer.json").write_text("{}")
    (config_dir / "tls").mkdir()
    make_certificate(config_dir / "tls")
    path = write(
        config_dir,
        '[model]\npath = "models/tiny"\n[tokenizer]\npath = "./tok"\n[runtime]\ndir = "run"\n'
        '[server.tls]\ncertfile = "tls/server.crt"\nkeyfile = "tls/../tls/server.key"\n',
    )
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load(path)  # loads: every file was found, though none is under the working directory
    assert loaded.settings.model.path == str(config_dir / "models" / "tiny")
    assert loaded.settings.tokenizer.path == str(config_dir / "tok")
    assert loaded.settings.runtime.dir == config_dir / "run"
    assert loaded.settings.server.tls.certfile == config_dir / "tls" / "server.crt"
    assert loaded.settings.server.tls.keyfile.resolve() == config_dir / "tls" / "server.key"
    assert loaded.settings.model.served_model_name == "tiny"


def test_relative_config_path_resolves_against_the_file_not_the_cwd(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(short_tmp / "conf", BASE + '[runtime]\ndir = "run"\n')
    monkeypatch.chdir(short_tmp)
    loaded = load(Path("conf/server.toml"))
    assert loaded.settings.runtime.dir == short_tmp / "conf" / "run"


def test_relative_paths_from_environment_and_set_resolve_against_cwd(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(short_tmp / "conf", BASE)
    cwd = short_tmp / "cwd"
    write_model_dir(cwd / "m")
    monkeypatch.chdir(cwd)
    loaded = load(path, environ={"DAEMON_RUNTIME__DIR": "run"}, sets=["model.path=m", "tokenizer.path=./m"])
    assert loaded.settings.runtime.dir == cwd / "run"
    assert loaded.settings.model.path == str(cwd / "m")
    assert loaded.settings.tokenizer.path == str(cwd / "m")


def test_relative_paths_in_table_json_resolve_against_cwd(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(short_tmp / "conf", BASE)
    monkeypatch.chdir(short_tmp)
    loaded = load(path, environ={"DAEMON_RUNTIME": '{"dir": "run"}'})
    assert loaded.settings.runtime.dir == short_tmp / "run"


def test_home_relative_path_in_file_expands(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(short_tmp / "home"))
    loaded = load(write(short_tmp / "conf", BASE + '[runtime]\ndir = "~/run"\n'))
    assert loaded.settings.runtime.dir == short_tmp / "home" / "run"


@pytest.mark.parametrize("source", ["file", "env", "set"])
def test_builtin_model_refs_are_never_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    monkeypatch.chdir(tmp_path)
    if source == "file":
        path, kwargs = (
            write(tmp_path / "conf", '[model]\npath = "builtin:demo"\n[tokenizer]\npath = "builtin:demo"\n'),
            {},
        )
    elif source == "env":
        path, kwargs = (
            write(tmp_path / "conf", ""),
            {"environ": {"DAEMON_MODEL__PATH": "builtin:demo", "DAEMON_TOKENIZER__PATH": "builtin:demo"}},
        )
    else:
        path, kwargs = (
            write(tmp_path / "conf", ""),
            {"sets": ["model.path=builtin:demo", "tokenizer.path=builtin:demo"]},
        )
    loaded = load(path, **kwargs)
    assert loaded.settings.model.path == "builtin:demo"
    assert loaded.settings.tokenizer.path == "builtin:demo"
    assert loaded.settings.model.served_model_name == "demo"


def test_unknown_builtin_ref_is_kept_as_a_name(tmp_path: Path) -> None:
    violation = only(errors_of(write(tmp_path, '[model]\npath = "builtin:nope"\n')), "model.path-missing")
    assert "builtin:nope" in violation.message
    assert str(tmp_path) not in violation.message  # not turned into a path under the config directory


# --- secrets -----------------------------------------------------------------------------------


def test_empty_api_key_variable_is_ignored(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, BASE + '[server]\napi_key = "from-file"\n'), environ={"DAEMON_SERVER__API_KEY": ""})
    assert loaded.settings.server.api_key.get_secret_value() == "from-file"
    loaded = load(write(tmp_path, BASE), environ={"DAEMON_SERVER__API_KEY": ""})
    assert loaded.settings.server.api_key is None


@pytest.mark.parametrize(
    "text, environ, secret",
    [
        (BASE + "[server]\napi_key = 123\n", {}, "123"),
        (BASE + '[server]\napi_key = ["hunter2"]\n', {}, "hunter2"),
        (BASE + "[server.tls]\nkeyfile_password = 98765\n", {}, "98765"),
        (BASE + '[server.tls]\nkeyfile_password = { pw = "hunter2" }\n', {}, "hunter2"),
        (BASE, {"DAEMON_SERVER": '{"api_key": 4242}'}, "4242"),
        (BASE, {"DAEMON_SERVER__TLS": '{"keyfile_password": ["hunter2"]}'}, "hunter2"),
    ],
    ids=["int-api-key", "list-api-key", "int-password", "table-password", "json-api-key", "json-password"],
)
def test_wrong_typed_secret_is_not_echoed(tmp_path: Path, text: str, environ: dict, secret: str) -> None:
    path = write(tmp_path, text)
    violations = errors_of(path, environ=environ)
    violation = only(violations, "schema.type")
    assert violation.key in {k for k, info in SETTINGS.items() if info.is_secret}
    assert secret not in violation.to_line()
    assert secret not in str(violation.to_dict())
    report = check_config(path, environ=environ)
    assert all(secret not in v.to_line() for v in report.violations)


def test_secret_from_environment_is_masked_in_rendered_config(tmp_path: Path) -> None:
    loaded = load(
        write(tmp_path, BASE), environ={"DAEMON_SERVER__API_KEY": "hunter2", "DAEMON_SERVER__HOST": "0.0.0.0"}
    )
    assert loaded.settings.server.api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in render_toml(loaded, sources=True)
    assert "hunter2" not in repr(loaded.settings)


@pytest.mark.parametrize(
    "text, environ",
    [
        (BASE + '[[server]]\napi_key = "hunter2"\n', {}),
        (BASE, {"DAEMON_SERVER": '[{"api_key": "hunter2"}]'}),
        (BASE, {"DAEMON_SERVER__TLS": '[{"keyfile_password": "hunter2"}]'}),
    ],
    ids=["array-of-tables", "env-json-array", "env-json-tls-array"],
)
def test_secret_inside_wrong_typed_table_is_not_echoed(tmp_path: Path, text: str, environ: dict) -> None:
    violations = errors_of(write(tmp_path, text), environ=environ)
    assert all("hunter2" not in v.to_line() for v in violations), [v.to_line() for v in violations]


def test_secret_from_set_is_not_printed_in_violations(tmp_path: Path) -> None:
    violation = only(
        errors_of(write(tmp_path, BASE), sets=["server.tls.keyfile_password=hunter2"]), "tls.password-without-key"
    )
    assert "hunter2" not in violation.to_line()


def test_secret_from_set_is_not_printed_by_render_with_sources(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, BASE), sets=["server.api_key=hunter2"])
    assert "hunter2" not in render_toml(loaded, sources=True)
