"""Property-based tests of config loading: whatever the sources hold, the only failure is ConfigError.

Generated documents mix real keys (so many are near-valid) with unknown ones,
values of every TOML type, environment overrides using real, near-miss and
random DAEMON_* names, and `--set` lists. Loading must return a LoadedConfig or
raise ConfigError with one-line violations naming a rule; `check_config` must
never raise. For valid generated configs the effective values must be what
was written (later sources winning), and rendering the effective config as
TOML must load back to the same values.

Inputs that once escaped as other errors or broke the one-line format have
dedicated tests at the end of this file: line breaks in keys, paths and
`--set` arguments, `~user` paths of a user that does not exist, lone
surrogates in environment values, and nesting deeper than the parsers allow.
"""

from __future__ import annotations

import datetime
import json
import re
import string
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import tomli
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from daemon.config.check import LoadedConfig, check_config, load_config
from daemon.config.errors import ConfigError, OriginKind, Severity, Violation
from daemon.config.render import render_toml
from daemon.config.schema import MASK, SECTIONS, SETTINGS, DaemonSettings, SettingInfo, flat_values

BOUNDED = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SMALL = settings(BOUNDED, max_examples=60)

RULE_ID = re.compile(r"[a-z0-9][a-z0-9-]*(\.[a-z0-9][a-z0-9-]*)+")
ENV_VARS = [info.env_var for info in SETTINGS.values()]
SECTION_ENV_VARS = ["DAEMON_" + key.upper().replace(".", "__") for key in SECTIONS]
LEAF_NAMES = sorted({key.rpartition(".")[2] for key in SETTINGS})
SECTION_NAMES = sorted({key.rpartition(".")[2] for key in SECTIONS})
CHOICES = sorted(
    {
        str(choice)
        for info in SETTINGS.values()
        if get_origin(info.field.annotation) is Literal
        for choice in get_args(info.field.annotation)
    }
)


# --- generators --------------------------------------------------------------------------------


def _defuse(text: str) -> str:
    """Keep generated strings off the known `~user` crash (see test_tilde_user_path_*)."""
    if text.startswith("~") and text != "~" and not text.startswith("~/"):
        return "x" + text
    return text


# Line breaks are left out: they make multi-line violations (see test_violation_line_*).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r")
TEXT = st.text(CHARS, max_size=24).map(_defuse)
PATHLIKE = st.sampled_from(
    [
        "",
        ".",
        "..",
        "/",
        "rel",
        "rel/dir",
        "./x",
        "../x",
        "/abs/path",
        "/tmp",
        "~",
        "~/x",
        "builtin:demo",
        "builtin:",
        "builtin:nope",
        "a\x00b",
        "/a\x00b",
        "x" * 300,
        "/" + "y" * 200,
        "C:\\win\\path",
        "spa ce/é/ü",
        "/dev/null",
        "/proc/self",
        "tokenizer.json",
        "\t",
    ]
)
HOSTS = st.sampled_from(
    ["127.0.0.1", "0.0.0.0", "::", "[::1]", "localhost", "example.com", "bad host", "-x-", "a" * 300, "10.0.0.1:80"]
)
ADDRS = st.sampled_from(["10.0.0.1:25000", "[fd00::1]:25000", "host:0", "host:65536", "nohost", ":1", "h:8000"])
INTERESTING_INTS = st.sampled_from(
    [
        0,
        1,
        -1,
        2,
        3,
        4,
        127,
        128,
        1023,
        1024,
        2048,
        4096,
        8000,
        65535,
        65536,
        2**31,
        2**32 - 1,
        2**32,
        2**63 - 1,
        2**63,
        -(2**63),
        10**30,
        -(10**30),
    ]
)
INTS = st.one_of(INTERESTING_INTS, st.integers(), st.integers(min_value=-(2**70), max_value=2**70))
FLOATS = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, 0.5, 0.85, 1.0, 1e-300, 30.0, 86400.0, 86400.5, float("inf"), float("nan")]),
)
TIMEZONES = st.none() | st.builds(lambda m: datetime.timezone(datetime.timedelta(minutes=m)), st.integers(-1439, 1439))
DATETIMES = st.one_of(st.datetimes(timezones=TIMEZONES), st.dates(), st.times())

SCALARS = st.one_of(INTS, FLOATS, st.booleans(), TEXT, PATHLIKE, HOSTS, ADDRS, st.sampled_from(CHOICES), DATETIMES)
NAME = st.one_of(
    st.sampled_from(LEAF_NAMES),
    st.sampled_from(SECTION_NAMES),
    st.text(CHARS, min_size=0, max_size=12),
    st.text(string.ascii_lowercase + "_", min_size=1, max_size=12),
)


def _near_miss(name: str, draw: Any) -> str:
    """A one-edit variant of `name`: a character deleted, doubled, swapped or changed."""
    if not name:
        return "x"
    at = draw(st.integers(0, len(name) - 1))
    edit = draw(st.sampled_from(["delete", "double", "swap", "change", "case"]))
    if edit == "delete":
        return name[:at] + name[at + 1 :]
    if edit == "double":
        return name[:at] + name[at] + name[at:]
    if edit == "swap" and at + 1 < len(name):
        return name[:at] + name[at + 1] + name[at] + name[at + 2 :]
    if edit == "case":
        return name.swapcase()
    return name[:at] + draw(st.sampled_from("_-.xz0")) + name[at + 1 :]


@st.composite
def key_paths(draw: Any) -> tuple[str, ...]:
    """Where in the document to put a value: a real key, a real table, a near miss or anything."""
    kind = draw(st.sampled_from(["setting", "setting", "setting", "section", "near", "random"]))
    if kind == "setting":
        return tuple(draw(st.sampled_from(list(SETTINGS))).split("."))
    if kind == "section":
        return tuple(draw(st.sampled_from(list(SECTIONS))).split("."))
    if kind == "near":
        parts = draw(st.sampled_from(list(SETTINGS))).split(".")
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = _near_miss(parts[index], draw)
        return tuple(parts)
    return tuple(draw(st.lists(NAME, min_size=1, max_size=3)))


VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(NAME, children, max_size=4),
    max_leaves=10,
)


def _put(document: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = document
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _leaf_types(annotation: Any) -> list[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [leaf for arg in get_args(annotation) for leaf in _leaf_types(arg)]
    return [annotation]


def _plausible(info: SettingInfo) -> st.SearchStrategy:
    """Values of roughly the right type for one setting, often on or just past its bounds."""
    options: list[st.SearchStrategy] = []
    for leaf in _leaf_types(info.field.annotation):
        if get_origin(leaf) is Literal:
            choices = [str(c) for c in get_args(leaf)]
            options.append(st.sampled_from(choices + [c.upper() for c in choices] + ["", "other"]))
        elif leaf is bool:
            options.append(st.booleans())
        elif leaf is int:
            options += [INTERESTING_INTS, st.integers(-5, 70_000)]
        elif leaf is float:
            options.append(
                st.one_of(
                    st.sampled_from([0.0, 0.5, 0.85, 0.99, 1.0, 30.0, 86400.0, 86401.0, -1.0]),
                    st.floats(-1.0, 100_000.0),
                )
            )
        elif leaf is not type(None):  # str, paths, secrets
            options += [PATHLIKE, HOSTS, ADDRS, TEXT]
    return st.one_of(options)


PLAUSIBLE = {key: _plausible(info) for key, info in SETTINGS.items()}


@st.composite
def entries(draw: Any) -> tuple[tuple[str, ...], Any]:
    """One (key path, value): mostly a real key with a plausible value, else anything anywhere."""
    path = draw(key_paths())
    key = ".".join(path)
    if key in PLAUSIBLE and draw(st.integers(0, 3)):
        return path, draw(PLAUSIBLE[key])
    return path, draw(VALUES)


@st.composite
def documents(draw: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"model": {"path": "builtin:demo"}} if draw(st.integers(0, 3)) else {}
    for path, value in draw(st.lists(entries(), max_size=8)):
        _put(document, path, value)
    return document


def _as_env_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)


ENV_VALUES = st.one_of(
    TEXT,
    st.just(""),
    PATHLIKE,
    HOSTS,
    SCALARS.map(_as_env_text),
    st.dictionaries(st.sampled_from(LEAF_NAMES + SECTION_NAMES) | NAME, VALUES, max_size=4).map(
        lambda d: json.dumps(d, default=str)
    ),
    st.sampled_from(
        [
            "{",
            "[1, 2]",
            "null",
            '"x"',
            "{}",
            "true",
            "1e999",
            "NaN",
            '{"port": 9001}',
            '{"tls": {"min_version": "1.3"}}',
        ]
    ),
)


@st.composite
def overrides(draw: Any) -> tuple[str, str]:
    """(dotted key, value text) for --set, or (variable name, value) for the environment; mostly real keys."""
    key = draw(st.sampled_from(list(SETTINGS)))
    value = draw(PLAUSIBLE[key].map(_as_env_text) if draw(st.integers(0, 3)) else ENV_VALUES)
    return key, value


@st.composite
def env_items(draw: Any) -> tuple[str, str]:
    kind = draw(st.sampled_from(["real", "real", "real", "real", "section", "near", "single", "random", "other"]))
    if kind == "real":
        key, value = draw(overrides())
        name = SETTINGS[key].env_var
        return draw(st.sampled_from([name, name, name.lower(), name.title()])), value
    if kind == "section":
        return draw(st.sampled_from(SECTION_ENV_VARS)), draw(ENV_VALUES)
    if kind == "near":
        name = _near_miss(draw(st.sampled_from(ENV_VARS)), draw)
    elif kind == "single":  # DAEMON_SERVER_PORT for DAEMON_SERVER__PORT
        name = draw(st.sampled_from(ENV_VARS)).replace("__", "_")
    elif kind == "random":
        name = "DAEMON_" + draw(st.text(string.ascii_uppercase + string.digits + "_", max_size=20))
    else:
        name = draw(
            st.sampled_from(
                [
                    "DAEMON_PARENT_PID",
                    "DAEMON_OPTS",
                    "DAEMON_",
                    "DAEMON___",
                    "PATH",
                    "HOME",
                    "XDG_RUNTIME_DIR",
                    "RUNTIME_DIRECTORY",
                    "daemon_opts",
                ]
            )
        )
    return name, draw(ENV_VALUES)


ENVIRONS = st.lists(env_items(), max_size=6).map(dict)

SET_ARGS = st.one_of(
    overrides().map(lambda kv: f"{kv[0]}={kv[1]}"),
    overrides().map(lambda kv: f"{kv[0]}={kv[1]}"),
    overrides().map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(list(SECTIONS)), ENV_VALUES),
    st.builds(lambda parts, value: f"{'.'.join(parts)}={value}", key_paths(), TEXT),
    TEXT,
    st.sampled_from(["=", "server.port", "server.port=", " server.port = 9000", "=9000", "server.port==1"]),
)
SETS = st.lists(SET_ARGS, max_size=3)


# --- helpers -----------------------------------------------------------------------------------


def assert_good_violations(violations: list[Violation]) -> None:
    assert violations, "a ConfigError must say what is wrong"
    for violation in violations:
        assert isinstance(violation, Violation)
        assert RULE_ID.fullmatch(violation.rule), violation.rule
        line = violation.to_line()
        assert line.strip(), violation
        assert "\n" not in line and "\r" not in line, line
        assert f"[{violation.rule}]" in line
        assert violation.severity in (Severity.ERROR, Severity.WARNING)


def assert_load_outcome(
    path: Path, environ: Mapping[str, str], sets: list[str], env_file: Path | None = None
) -> LoadedConfig | None:
    """check_config never raises; load_config agrees with it and raises only ConfigError."""
    report = check_config(path, environ=environ, sets=sets, env_file=env_file)
    event("loaded" if report.config else "rejected")
    for violation in report.violations:
        event(f"rule {violation.rule}")
    if report.violations:
        assert_good_violations(report.violations)
    try:
        loaded = load_config(path, environ=environ, sets=sets, env_file=env_file)
    except ConfigError as exc:
        assert_good_violations(exc.violations)
        assert any(v.severity is Severity.ERROR for v in exc.violations), exc.violations
        assert report.config is None and not report.passed()
        assert str(exc) == "\n".join(v.to_line() for v in exc.violations)
        return None
    assert isinstance(loaded, LoadedConfig)
    assert report.config is not None and report.passed()
    assert flat_values(loaded.settings, reveal_secrets=True) == flat_values(report.config.settings, reveal_secrets=True)
    assert not [v for v in loaded.warnings if v.severity is not Severity.WARNING]
    return loaded


# --- never anything but ConfigError ------------------------------------------------------------


def _env_file_text(items: list[tuple[str, str]], styles: list[int]) -> str:
    """KEY=value lines as people write them: bare, quoted, exported, commented."""
    lines = []
    for (name, value), style in zip(items, styles + [0] * len(items), strict=False):
        lines.append(
            [
                f"{name}={value}",
                f'{name}="{value}"',
                f"export {name}={value}",
                f"{name}='{value}' # note",
                f"# {name}={value}",
            ][style]
        )
    return "\n".join(lines) + "\n"


ENV_FILES = st.none() | st.builds(
    _env_file_text, st.lists(env_items(), max_size=4), st.lists(st.integers(0, 4), max_size=4)
)


@BOUNDED
@given(document=documents(), environ=ENVIRONS, sets=SETS, env_file_text=ENV_FILES)
def test_random_documents_and_overrides_raise_only_config_error(
    document: dict, environ: dict, sets: list, env_file_text: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "server.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        env_file = None
        if env_file_text is not None:
            env_file = Path(tmp) / "daemon.env"
            env_file.write_text(env_file_text, encoding="utf-8")
        assert_load_outcome(path, environ, sets, env_file)


@st.composite
def near_valid_documents(draw: Any) -> dict[str, Any]:
    """Only real keys, with values of roughly the right type: most get past the schema into the rules."""
    document: dict[str, Any] = {"model": {"path": "builtin:demo"}}
    for key in draw(st.lists(st.sampled_from([k for k in SETTINGS if k != "model.path"]), unique=True, max_size=8)):
        _put(document, tuple(key.split(".")), draw(PLAUSIBLE[key]))
    return document


REAL_ENVIRONS = st.lists(overrides().map(lambda kv: (SETTINGS[kv[0]].env_var, kv[1])), max_size=4).map(dict)
REAL_SETS = st.lists(overrides().map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=2)


@BOUNDED
@given(document=near_valid_documents(), environ=REAL_ENVIRONS | ENVIRONS, sets=REAL_SETS)
def test_near_valid_configs_raise_only_config_error(document: dict, environ: dict, sets: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "server.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        assert_load_outcome(path, environ, sets)


def _mutate(text: str, cuts: list[tuple[int, str]]) -> str:
    for at, insert in cuts:
        at = at % (len(text) + 1)
        text = text[:at] + insert + text[at:]
    return text


CONTENTS = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=512).map(str.encode),
    st.builds(
        lambda doc, cuts: _mutate(tomli_w.dumps(doc), cuts).encode("utf-8"),
        documents(),
        st.lists(
            st.tuples(
                st.integers(0, 10_000),
                st.sampled_from(["[", "]", "=", '"', "'''", "\n", "{", ".", "#", "\x00", "\ufeff", "[[a]]\n"]),
            ),
            max_size=4,
        ),
    ),
    st.builds(lambda doc, n: tomli_w.dumps(doc).encode("utf-8")[:n], documents(), st.integers(0, 400)),
)


@BOUNDED
@given(content=CONTENTS, environ=st.lists(env_items(), max_size=2).map(dict))
def test_random_file_content_raises_only_config_error(content: bytes, environ: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "server.toml"
        path.write_bytes(content)
        loaded = assert_load_outcome(path, environ, [])
    if loaded is None:
        return
    # Whatever was accepted really is TOML: the rules do not get to see garbage.
    tomli.loads(content.decode("utf-8"))


# --- valid configs: the effective values are the ones written ------------------------------------


def _env_bool(value: bool, spelling: int) -> str:
    return [("true", "false"), ("1", "0"), ("yes", "no"), ("on", "off"), ("True", "False")][spelling][0 if value else 1]


# key -> strategy of (value in the file, text in the environment, expected effective value)
def _same(values: st.SearchStrategy) -> st.SearchStrategy:
    return values.map(lambda v: (v, str(v), v))


def _bools() -> st.SearchStrategy:
    return st.builds(lambda v, s: (v, _env_bool(v, s), v), st.booleans(), st.integers(0, 4))


def _floats(**bounds: Any) -> st.SearchStrategy:
    return st.floats(allow_nan=False, allow_infinity=False, **bounds).map(lambda v: (v, repr(v), v))


# No line or paragraph separators: they shift the file's line numbers (see test_sources.py).
SERVED_NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=20).filter(
    lambda s: ":" not in s
)
RUNTIME_DIR_NAMES = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)

VALID = {
    "server.port": _same(st.integers(1, 65535)),
    "server.host": _same(st.sampled_from(["127.0.0.1", "0.0.0.0", "::", "localhost", "example.com", "::1"])),
    "server.enable_http2": _bools(),
    "server.http2_max_concurrent_streams": _same(st.integers(1, 2**32 - 1)),
    "server.workers": _same(st.integers(1, 256)),
    "server.backlog": _same(st.integers(128, 65535)),
    "server.api_key": _same(st.text(string.printable.strip(), min_size=1, max_size=16)),
    "server.max_request_body_bytes": _same(st.integers(1024, 1024**3)),
    "tokenizer.workers": _same(st.integers(1, 64)),
    "scheduler.policy": _same(st.sampled_from(["fcfs", "lof", "priority"])),
    "scheduler.max_running_requests": _same(st.integers(1, 1_000_000)),
    "scheduler.max_queued_requests": _same(st.integers(0, 10_000_000)),
    "scheduler.mem_fraction_static": _floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    "scheduler.chunked_prefill_size": _same(st.one_of(st.just(-1), st.integers(1, 2**20))),
    "scheduler.enable_prefix_caching": _bools(),
    "model.served_model_name": _same(SERVED_NAMES),
    "model.dtype": _same(st.sampled_from(["auto", "float32", "float16", "bfloat16"])),
    "model.device": _same(st.sampled_from(["auto", "cpu"])),
    "model.tp_size": _same(st.just(1)),  # > 1 is refused until tensor parallelism lands
    "model.context_length": _same(st.integers(1, 2048)),
    "model.seed": _same(st.integers(0, 2**63 - 1)),
    "logging.level": st.builds(
        lambda level, case: (case(level), case(level), level),
        st.sampled_from(["debug", "info", "warning", "error", "critical"]),
        st.sampled_from([str.lower, str.upper, str.title]),
    ),
    "logging.format": _same(st.sampled_from(["auto", "json", "console"])),
    "logging.access_log": _bools(),
    "runtime.drain_timeout_s": _floats(min_value=0.0, max_value=86400.0, exclude_min=True),
    "runtime.watch_config": _bools(),
    "runtime.dir": RUNTIME_DIR_NAMES.map(lambda name: (name, name, name)),  # relative: resolved below
}
SECRET_KEYS = {key for key, info in SETTINGS.items() if info.is_secret}
DERIVED = {"model.path", "tokenizer.path", "model.served_model_name", "runtime.dir", "runtime.cache_dir"}
DEFAULTS = flat_values(DaemonSettings(model={"path": "builtin:demo"}), reveal_secrets=True)


@st.composite
def valid_setups(draw: Any) -> dict[str, tuple[str, Any]]:
    """For some keys, a valid value in the file, the environment and/or --set: key -> {source: (raw, expected)}."""
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=10))
    setup = {}
    for key in keys:
        sources = draw(st.lists(st.sampled_from(["file", "env", "set"]), min_size=1, max_size=3, unique=True))
        setup[key] = {source: draw(VALID[key]) for source in sources}
    return setup


def _write_valid(directory: Path, setup: dict) -> tuple[Path, dict[str, str], list[str]]:
    document: dict[str, Any] = {"model": {"path": "builtin:demo"}}
    environ: dict[str, str] = {}
    sets: list[str] = []
    for key, sources in setup.items():
        if "file" in sources:
            _put(document, tuple(key.split(".")), sources["file"][0])
        if "env" in sources:
            environ[SETTINGS[key].env_var] = sources["env"][1]
        if "set" in sources:
            sets.append(f"{key}={sources['set'][1]}")
    path = directory / "server.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path, environ, sets


def _expected(key: str, source: str, value: Any, config_dir: Path) -> Any:
    if key == "runtime.dir":
        return str((config_dir if source == "file" else Path.cwd()) / value)
    return value


@BOUNDED
@given(setup=valid_setups())
def test_valid_values_load_and_later_sources_win(setup: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp).resolve()
        path, environ, sets = _write_valid(directory, setup)
        loaded = load_config(path, environ=environ, sets=sets)
        values = flat_values(loaded.settings, reveal_secrets=True)
        text_lines = path.read_text(encoding="utf-8").splitlines()
        for key, sources in setup.items():
            winner = next(source for source in ("set", "env", "file") if source in sources)
            assert values[key] == _expected(key, winner, sources[winner][2], directory), key
            origin = loaded.origin(key)
            assert origin.kind is {"set": OriginKind.CLI, "env": OriginKind.ENV, "file": OriginKind.FILE}[winner]
            if winner == "file":  # the origin names the line that holds the key
                assert origin.name == str(path)
                assert text_lines[origin.line - 1].startswith(key.rpartition(".")[2] + " = ")
            elif winner == "env":
                assert origin.name == SETTINGS[key].env_var
        # Keys no source set keep their defaults (derived ones aside).
        for key in SETTINGS.keys() - setup.keys() - DERIVED:
            assert values[key] == DEFAULTS[key], key
        assert values["model.path"] == "builtin:demo"


# Variables beside the overrides that the load reads or must ignore. Only absolute runtime
# directories: a relative one is kept relative (see test_relative_xdg_runtime_dir_round_trips).
OTHER_ENV = st.fixed_dictionaries(
    {},
    optional={
        "XDG_RUNTIME_DIR": st.sampled_from(["/run/user/1000", "/tmp/xdg"]),
        "RUNTIME_DIRECTORY": st.sampled_from(["/run/daemon", "/run/daemon:/run/other"]),
        "DAEMON_OPTS": TEXT,
        "DAEMON_PARENT_PID": st.sampled_from(["1", "not-a-pid"]),
    },
)


@BOUNDED
@given(setup=valid_setups(), extra_env=OTHER_ENV)
def test_rendered_effective_config_round_trips(setup: dict, extra_env: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as elsewhere:
        path, environ, sets = _write_valid(Path(tmp), setup)
        first = load_config(path, environ={**extra_env, **environ}, sets=sets)
        rendered = render_toml(first)
        tomli.loads(rendered)  # valid TOML
        for line in rendered.splitlines():
            if not line.startswith("#") and line.partition(" = ")[0] in {k.rpartition(".")[2] for k in SECRET_KEYS}:
                assert line.endswith(f'"{MASK}"'), line  # secrets are masked, never written out
        again = Path(elsewhere) / "effective.toml"  # another directory: no relative path may survive
        again.write_text(rendered, encoding="utf-8")
        second = load_config(again, environ={})
        assert flat_values(second.settings) == flat_values(first.settings)
        if all(flat_values(first.settings)[key] is None for key in SECRET_KEYS):
            assert second.hash == first.hash  # equal configs, equal fingerprints
        # Rendering is stable (the header names the file, and the hash covers the unmasked secrets).
        assert render_toml(second).splitlines()[2:] == rendered.splitlines()[2:]


# --- inputs that once escaped the properties ----------------------------------------


def _load(text: str, *, environ: dict | None = None, sets: list[str] | None = None) -> LoadedConfig | ConfigError:
    """Load `text`: the config, or its ConfigError; any other exception propagates (the bug). check_config
    agrees (it never raises, and rejects exactly what load_config rejects)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "server.toml"
        path.write_text(text, encoding="utf-8")
        report = check_config(path, environ=environ or {}, sets=sets or [])
        try:
            loaded = load_config(path, environ=environ or {}, sets=sets or [])
        except ConfigError as exc:
            assert report.config is None, report
            assert_good_violations(exc.violations)
            return exc
    assert report.config is not None, [v.to_line() for v in report.violations]
    return loaded


BASE = '[model]\npath = "builtin:demo"\n'
MISSING_USER = "~no_such_user_for_daemon_tests"


@pytest.mark.parametrize(
    "text, environ, sets, rule",
    [
        (f'[model]\npath = "{MISSING_USER}/m"\n', {}, [], "model.path-missing"),
        (BASE, {}, [f"tokenizer.path={MISSING_USER}"], "tokenizer.path-missing"),
        (BASE, {"DAEMON_RUNTIME__DIR": f"{MISSING_USER}/run"}, [], None),  # a directory the daemon makes
    ],
    ids=["file", "set", "env"],
)
def test_tilde_user_path_of_missing_user_is_kept_as_written(text: str, environ: dict, sets: list, rule: str | None):
    """`~user` of a user that does not exist is no crash: the path is kept as written (not expanded), and
    the rules judge it as they would any other: missing where it must exist."""
    result = _load(text, environ=environ, sets=sets)
    if rule is None:
        assert isinstance(result, LoadedConfig), result
        assert str(result.settings.runtime.dir).endswith(f"/{MISSING_USER}/run"), result.settings.runtime.dir
    else:
        assert isinstance(result, ConfigError), result
        assert [v.rule for v in result.violations] == [rule], [v.to_line() for v in result.violations]
        assert MISSING_USER in result.violations[0].to_line(), result.violations[0].to_line()


def test_surrogate_in_environment_path_is_config_error_or_loads() -> None:
    result = _load(BASE, environ={"DAEMON_RUNTIME__DIR": "/tmp/d\udcff"})
    if isinstance(result, LoadedConfig):  # then as it was given
        assert result.settings.runtime.dir == Path("/tmp/d\udcff"), result.settings.runtime.dir


def test_deeply_nested_json_in_environment_is_config_error() -> None:
    result = _load(BASE, environ={"DAEMON_SERVER": "[" * 100_000})
    assert isinstance(result, ConfigError), result
    assert [v.rule for v in result.violations] == ["env.invalid-json"], [v.to_line() for v in result.violations]


def test_deeply_nested_toml_is_config_error() -> None:
    result = _load(BASE + "x = " + "[" * 1000 + "]" * 1000 + "\n")
    assert isinstance(result, ConfigError) and result.violations[0].rule == "file.syntax", result


@pytest.mark.parametrize(
    "text, environ, sets",
    [
        (BASE + '"a\\nb" = 1\n', {}, []),  # unknown key with a newline
        ('[model]\npath = "x\\ny"\n', {}, []),  # model.path-missing message names the path
        (BASE, {"DAEMON_X\nY__Z": "1"}, []),  # unknown variable name
        (BASE, {}, ["server.host=a\nb"]),  # the --set origin
    ],
    ids=["key", "path", "env-name", "set"],
)
def test_violation_line_is_one_line_whatever_the_input(text: str, environ: dict, sets: list) -> None:
    exc = _load(text, environ=environ, sets=sets)
    assert isinstance(exc, ConfigError), exc
    for violation in exc.violations:
        assert "\n" not in violation.to_line(), violation.to_line()


@pytest.mark.parametrize("variable", ["XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"])
def test_relative_xdg_runtime_dir_round_trips(variable: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as elsewhere:
        path = Path(tmp) / "server.toml"
        path.write_text(BASE, encoding="utf-8")
        first = load_config(path, environ={variable: "relative-run"})
        again = Path(elsewhere) / "effective.toml"
        again.write_text(render_toml(first), encoding="utf-8")
        assert flat_values(load_config(again, environ={}).settings) == flat_values(first.settings)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "run\\u0000dir",
        ".",
        "run",
    ],
    ids=["empty", "nul", "dot", "name"],
)
def test_runtime_dir_in_file_is_rejected_or_absolute(value: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "server.toml"
        path.write_text(BASE + f'[runtime]\ndir = "{value}"\n', encoding="utf-8")
        try:
            loaded = load_config(path, environ={})
        except ConfigError:
            return
        assert loaded.settings.runtime.dir.is_absolute(), loaded.settings.runtime.dir
