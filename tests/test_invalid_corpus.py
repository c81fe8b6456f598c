"""A corpus of invalid configurations: each must be reported with the right rule id, key and source.

Every case is one row of `CASES`: the config file text (with placeholders such as
`{model}` for files the case builds in its tmp_path), optional environment
variables, env file and `--set` arguments, and the violation expected: its rule
id (a catalogue rule or a `schema.*` / `file.*` / `env.*` / `cli.*` id) and key.
Each case runs the real pipeline, `check_config`, with an explicit environment,
so the test machine's own DAEMON_* variables cannot leak in.

`test_every_checked_rule_has_a_case` makes sure every rule of the catalogue
with a check has a case here, so a new rule cannot land without one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness.daemons import clean_environ, run_daemon
from harness.files import make_certificate, write_model_dir, write_safetensors

from daemon.config import OriginKind, Severity, check_config
from daemon.config.facts import CudaProbe, Facts
from daemon.config.rules import RULES, RULES_BY_ID
from daemon.config.schema import DaemonSettings

PASSWORD = "s3cret-pass"
IS_ROOT = os.geteuid() == 0


# --- files a case can refer to as {name} ------------------------------------------------------


def _model(tmp: Path) -> Path:
    return write_model_dir(tmp / "model")


def _without(name: str, file: str, **shape: Any) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        root = write_model_dir(tmp / name, **shape)
        (root / file).unlink()
        return root

    return build


def _bad_json_config(tmp: Path) -> Path:
    root = write_model_dir(tmp / "badjson")
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return root


def _truncated(tmp: Path) -> Path:
    root = write_model_dir(tmp / "truncated")
    write_safetensors(root / "model.safetensors", {"embed.weight": [16, 8]}, truncate_by=4)
    return root


def _pair(name: str, password: str | None = None) -> Callable[[Path], tuple[Path, Path]]:
    return lambda tmp: make_certificate(tmp, name=name, password=password)


def _text(name: str, content: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / name).write_text(content)
        return tmp / name

    return build


# name -> builder; a builder returning a (cert, key) pair defines `<name>` (cert) and `<name>_key`.
BUILDERS: dict[str, Callable[[Path], Any]] = {
    "tmp": lambda tmp: tmp,
    "model": _model,
    "no_tokenizer": lambda tmp: write_model_dir(tmp / "notok", tokenizer=False),
    "gpt2": lambda tmp: write_model_dir(tmp / "gpt2", architecture="GPT2LMHeadModel"),
    "relu2": lambda tmp: write_model_dir(tmp / "relu2", config={"hidden_act": "relu2"}),
    "rope_mrope": lambda tmp: write_model_dir(tmp / "mrope", config={"rope_scaling": {"type": "mrope"}}),
    "awq": lambda tmp: write_model_dir(tmp / "awq", config={"quantization_config": {"quant_method": "awq"}}),
    "fp8": lambda tmp: write_model_dir(tmp / "fp8", config={"torch_dtype": "float8_e4m3fn"}),
    "no_config": _without("noconfig", "config.json"),
    "bad_json_config": _bad_json_config,
    "no_weights": _without("noweights", "model.safetensors"),
    "missing_shard": _without("sharded", "model-00002-of-00003.safetensors", shards=3),
    "truncated": _truncated,
    "cert": _pair("server"),
    "other": _pair("other"),
    "enc": _pair("enc", PASSWORD),
    "garbage": _text("garbage.pem", "this is not a PEM file\n"),
    "afile": _text("afile", "a regular file, not a directory\n"),
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class Files:
    """Builds, on first mention, the files a case's placeholders name, under one tmp_path.

    `{short}` is a directory with a short path, for runtime.dir (Unix socket paths are short).
    """

    def __init__(self, tmp: Path, short: Path | None = None):
        self.tmp = tmp
        self.values: dict[str, str] = {}
        if short is not None:
            (short / "afile").write_text("a regular file, not a directory\n")
            (short / "readonly").mkdir(mode=0o500, exist_ok=True)
            (short / "open").mkdir(exist_ok=True)
            (short / "open").chmod(0o777)  # anyone could replace the sockets in it
            self.values["short"] = str(short)

    def _build(self, name: str) -> str | None:
        if name in self.values:
            return self.values[name]
        base = name.removesuffix("_key")
        if base not in BUILDERS:
            return None
        built = BUILDERS[base](self.tmp)
        if isinstance(built, tuple):
            self.values[base], self.values[f"{base}_key"] = str(built[0]), str(built[1])
        else:
            self.values[base] = str(built)
        return self.values.get(name)

    def sub(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            value = self._build(match[1])
            return match[0] if value is None else value

        return _PLACEHOLDER.sub(replace, text)


# --- the corpus ---------------------------------------------------------------------------------

M = '[model]\npath = "{model}"\n'  # two lines: keys after it start on line 3
TLS = M + '[server.tls]\ncertfile = "{cert}"\nkeyfile = "{cert_key}"\n'  # keys after it start on line 6
MISSING_FILE = "<missing>"


@dataclass(frozen=True)
class Case:
    id: str
    toml: str | None  # config file text; None: do not write it (see `config`)
    rule: str
    key: str | None
    env: dict[str, str] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    env_file: str | None = None  # env file text; MISSING_FILE: pass a path that does not exist
    line: int | None = None  # expected origin: this line of the config file
    source: str | None = None  # expected str(origin)
    fix: str | None = None  # expected in the fix
    warning: bool = False  # a warning rule: reported, but the config stays usable
    encoding: str = "utf-8"  # how the file text is written
    config: str | None = None  # the path to check, when it is not the written file
    marks: tuple[Any, ...] = ()


def case(id: str, toml: str | None, rule: str, key: str | None, **kwargs: Any) -> Case:
    return Case(id, toml, rule, key, **kwargs)


def bug(reason: str) -> tuple[Any, ...]:
    return (pytest.mark.xfail(strict=True, reason=f"BUG: {reason}"),)


CASES: list[Case] = [
    # --- the file itself ---------------------------------------------------------------------
    case("syntax-missing-value", M + "[server]\nport =\n", "file.syntax", None, line=4),
    case("syntax-unclosed-table-header", M + "[server\nport = 1\n", "file.syntax", None, line=3),
    case("syntax-duplicate-key", M + "[server]\nport = 1\nport = 2\n", "file.syntax", None, line=5),
    case("syntax-unterminated-string", M + '[server]\nhost = "abc\n', "file.syntax", None, line=4),
    case("syntax-two-values", M + "[server]\nport = 80 80\n", "file.syntax", None, line=4),
    case("syntax-duplicate-table", M + "[model]\n", "file.syntax", None, line=3),
    case("syntax-unclosed-array", M + "[server]\nhost = 'a'\nx = [1,\n", "file.syntax", None, line=6),
    case(
        "syntax-missing-equals-after-multiline-string",
        M + '[server]\nhost = """\nlocalhost\n"""\nport 5\n',
        "file.syntax",
        None,
        line=7,
    ),
    case("non-utf8-latin1", M + "# caf\xe9\n", "file.encoding", None, line=3, encoding="latin-1"),
    case("non-utf8-utf16", M, "file.encoding", None, line=1, encoding="utf-16"),
    case("missing-file", None, "file.missing", None, config="{tmp}/nowhere.toml", source="{tmp}/nowhere.toml"),
    case("directory-as-file", None, "file.unreadable", None, config="{tmp}", source="{tmp}"),
    # --- required keys -----------------------------------------------------------------------
    case("empty-file", "", "schema.missing", "model.path", fix="DAEMON_MODEL__PATH"),
    case("model-table-without-path", '[model]\ndtype = "float32"\n', "schema.missing", "model.path"),
    case("no-model-table", "[server]\nport = 9000\n", "schema.missing", "model.path", fix="--set model.path="),
    # --- wrong types, from the file ----------------------------------------------------------
    case("port-string", M + '[server]\nport = "eighty"\n', "schema.type", "server.port", line=4),
    case("port-fraction", M + "[server]\nport = 80.5\n", "schema.type", "server.port", line=4),
    case("http2-integer-for-bool", M + "[server]\nenable_http2 = 2\n", "schema.type", "server.enable_http2", line=4),
    case(
        "verify-client-word",
        M + '[server.tls]\nverify_client = "maybe"\n',
        "schema.type",
        "server.tls.verify_client",
        line=4,
    ),
    case("tls-not-a-table", M + '[server]\ntls = "yes"\n', "schema.type", "server.tls", line=4),
    case("port-as-table", M + "[server.port]\n", "schema.type", "server.port", line=3),
    case("server-array-of-tables", M + "[[server]]\n", "schema.type", "server", line=3),
    case("model-path-integer", "[model]\npath = 5\n", "schema.type", "model.path", line=2),
    case(
        "total-tokens-array",
        M + "[scheduler]\nmax_total_tokens = [1, 2]\n",
        "schema.type",
        "scheduler.max_total_tokens",
        line=4,
    ),
    case("certfile-integer", M + "[server.tls]\ncertfile = 5\n", "schema.type", "server.tls.certfile", line=4),
    case("inline-table-port-string", 'server = { port = "abc" }\n' + M, "schema.type", "server.port", line=1),
    case("dotted-key-port-string", 'server.port = "abc"\n' + M, "schema.type", "server.port", line=1),
    case(
        "bool-as-port",
        M + "[server]\nport = true\n",
        "schema.type",
        "server.port",
        line=4,
    ),
    # --- wrong types, from the environment, env files and --set ------------------------------
    case(
        "env-port-not-integer",
        M,
        "schema.type",
        "server.port",
        env={"DAEMON_SERVER__PORT": "abc"},
        source="environment variable DAEMON_SERVER__PORT",
    ),
    case(
        "env-http2-word",
        M,
        "schema.type",
        "server.enable_http2",
        env={"DAEMON_SERVER__ENABLE_HTTP2": "maybe"},
        source="environment variable DAEMON_SERVER__ENABLE_HTTP2",
    ),
    case(
        "env-table-json-array",
        M,
        "schema.type",
        "server",
        env={"DAEMON_SERVER": "[1]"},
        source="environment variable DAEMON_SERVER",
    ),
    case(
        "env-table-json-wrong-leaf",
        M,
        "schema.type",
        "server.tls.certfile",
        env={"DAEMON_SERVER__TLS": '{"certfile": 5}'},
        source="environment variable DAEMON_SERVER__TLS",
    ),
    case(
        "env-table-not-json",
        M,
        "env.invalid-json",
        "server",
        env={"DAEMON_SERVER": "port=9000"},
        source="environment variable DAEMON_SERVER",
        fix="DAEMON_SERVER__",
    ),
    case(
        "env-lowercase-name",
        M,
        "server.port-range",
        "server.port",
        env={"daemon_server__port": "0"},
        source="environment variable daemon_server__port",
    ),
    case(
        "envfile-workers-zero",
        M,
        "workers.min",
        "server.workers",
        env_file="DAEMON_SERVER__WORKERS=0\n",
        source="DAEMON_SERVER__WORKERS in env file {tmp}/override.env",
    ),
    case("envfile-missing", M, "env-file.missing", None, env_file=MISSING_FILE, source="{tmp}/override.env"),
    case(
        "set-port-not-integer",
        M,
        "schema.type",
        "server.port",
        sets=("server.port=abc",),
        source="--set server.port",
    ),
    # --- out of range ------------------------------------------------------------------------
    case(
        "port-zero", M + "[server]\nport = 0\n", "server.port-range", "server.port", line=4, fix="between 1 and 65535"
    ),
    case("port-70000", M + "[server]\nport = 70000\n", "server.port-range", "server.port", line=4),
    case(
        "env-port-zero",
        M,
        "server.port-range",
        "server.port",
        env={"DAEMON_SERVER__PORT": "0"},
        source="environment variable DAEMON_SERVER__PORT",
    ),
    case(
        "env-table-json-port-zero",
        M,
        "server.port-range",
        "server.port",
        env={"DAEMON_SERVER": '{"port": 0}'},
        source="environment variable DAEMON_SERVER",
    ),
    case(
        "set-port-70000",
        M,
        "server.port-range",
        "server.port",
        sets=("server.port=70000",),
        source="--set server.port",
    ),
    case(
        "http2-streams-zero",
        M + "[server]\nhttp2_max_concurrent_streams = 0\n",
        "server.http2-streams-range",
        "server.http2_max_concurrent_streams",
        line=4,
    ),
    case(
        "http2-streams-2-32",
        M + f"[server]\nhttp2_max_concurrent_streams = {2**32}\n",
        "server.http2-streams-range",
        "server.http2_max_concurrent_streams",
        line=4,
    ),
    case("server-workers-zero", M + "[server]\nworkers = 0\n", "workers.min", "server.workers", line=4),
    case("tokenizer-workers-zero", M + "[tokenizer]\nworkers = 0\n", "workers.min", "tokenizer.workers", line=4),
    case("tp-size-zero", M + "tp_size = 0\n", "model.tp-size-min", "model.tp_size", line=3),
    case(
        "env-tp-size-zero",
        M,
        "model.tp-size-min",
        "model.tp_size",
        env={"DAEMON_MODEL__TP_SIZE": "0"},
        source="environment variable DAEMON_MODEL__TP_SIZE",
    ),
    case(
        "mem-fraction-one",
        M + "[scheduler]\nmem_fraction_static = 1.0\n",
        "scheduler.mem-fraction-range",
        "scheduler.mem_fraction_static",
        line=4,
    ),
    case(
        "mem-fraction-zero",
        M + "[scheduler]\nmem_fraction_static = 0.0\n",
        "scheduler.mem-fraction-range",
        "scheduler.mem_fraction_static",
        line=4,
    ),
    case(
        "mem-fraction-nan",
        M + "[scheduler]\nmem_fraction_static = nan\n",
        "scheduler.mem-fraction-range",
        "scheduler.mem_fraction_static",
        line=4,
    ),
    case("backlog-too-small", M + "[server]\nbacklog = 10\n", "schema.range", "server.backlog", line=4),
    case(
        "drain-timeout-inf", M + "[runtime]\ndrain_timeout_s = inf\n", "schema.range", "runtime.drain_timeout_s", line=4
    ),
    case(
        "drain-timeout-zero", M + "[runtime]\ndrain_timeout_s = 0\n", "schema.range", "runtime.drain_timeout_s", line=4
    ),
    case("api-key-empty", M + '[server]\napi_key = ""\n', "schema.range", "server.api_key", line=4),
    case("nccl-port-70000", M + "[distributed]\nnccl_port = 70000\n", "schema.range", "distributed.nccl_port", line=4),
    case("node-rank-negative", M + "[distributed]\nnode_rank = -1\n", "schema.range", "distributed.node_rank", line=4),
    case("seed-beyond-int64", M + f"seed = {2**63}\n", "schema.range", "model.seed", line=3),
    case(
        "host-empty",
        M + '[server]\nhost = ""\n',
        "schema.range",
        "server.host",
        line=4,
    ),
    # --- bad choices -------------------------------------------------------------------------
    case(
        "log-level-typo",
        M + '[logging]\nlevel = "warn"\n',
        "schema.choice",
        "logging.level",
        line=4,
        fix='did you mean "warning"?',
    ),
    case(
        "dtype-typo", M + 'dtype = "bfloat"\n', "schema.choice", "model.dtype", line=3, fix='did you mean "bfloat16"?'
    ),
    case(
        "env-device-typo",
        M,
        "schema.choice",
        "model.device",
        env={"DAEMON_MODEL__DEVICE": "cdua"},
        source="environment variable DAEMON_MODEL__DEVICE",
        fix='did you mean "cuda"?',
    ),
    case(
        "tls-min-version",
        M + '[server.tls]\nmin_version = "1.1"\n',
        "schema.choice",
        "server.tls.min_version",
        line=4,
        fix='"1.2" | "1.3"',
    ),
    case(
        "log-format-unknown",
        M + '[logging]\nformat = "yaml"\n',
        "schema.choice",
        "logging.format",
        line=4,
        fix='"auto" | "json" | "console"',
    ),
    case(
        "policy-typo-catalogue-id",
        M + '[scheduler]\npolicy = "fcfss"\n',
        "scheduler.policy-choice",
        "scheduler.policy",
        line=4,
    ),
    # --- unknown keys ------------------------------------------------------------------------
    case(
        "unknown-key-typo",
        M + "[server]\nprot = 8000\n",
        "schema.unknown-key",
        "server.prot",
        line=4,
        fix="did you mean server.port?",
    ),
    case(
        "unknown-table-typo",
        M + "[servr]\nport = 8000\n",
        "schema.unknown-key",
        "servr",
        line=3,
        fix="did you mean server?",
    ),
    case(
        "key-in-wrong-table",
        M + "workers = 2\n",
        "schema.unknown-key",
        "model.workers",
        line=3,
        fix="did you mean server.workers?",
    ),
    case("key-at-top-level", "port = 1\n" + M, "schema.unknown-key", "port", line=1, fix="did you mean server.port?"),
    case(
        "unknown-tls-key",
        M + '[server.tls]\ncert_file = "x"\n',
        "schema.unknown-key",
        "server.tls.cert_file",
        line=4,
        fix="did you mean server.tls.certfile?",
    ),
    case(
        "env-json-unknown-key",
        M,
        "schema.unknown-key",
        "server.tls.x",
        env={"DAEMON_SERVER": '{"tls": {"x": 1}}'},
        source="environment variable DAEMON_SERVER",
    ),
    case(
        "unknown-table-only-as-subtable",
        M + '[servr.tls]\ncertfile = "x"\n',
        "schema.unknown-key",
        "servr",
        line=3,
    ),
    # --- unknown environment variables and bad --set -----------------------------------------
    case(
        "env-unknown-key",
        M,
        "env.unknown-variable",
        None,
        env={"DAEMON_SERVER__PROT": "8000"},
        source="environment variable DAEMON_SERVER__PROT",
        fix="did you mean DAEMON_SERVER__PORT?",
    ),
    case(
        "env-single-underscore",
        M,
        "env.unknown-variable",
        None,
        env={"DAEMON_SERVER_PORT": "8000"},
        source="environment variable DAEMON_SERVER_PORT",
        fix="did you mean DAEMON_SERVER__PORT?",
    ),
    case(
        "env-unknown-section",
        M,
        "env.unknown-variable",
        None,
        env={"DAEMON_FOO__BAR": "1"},
        source="environment variable DAEMON_FOO__BAR",
        fix="daemon config reference",
    ),
    case("set-without-equals", M, "cli.syntax", None, sets=("server.port",), source="--set argument 1"),
    case("set-without-key", M, "cli.syntax", None, sets=("=9000",), source="--set argument 1"),
    case("set-empty-value", M, "cli.syntax", "server.port", sets=("server.port=",), source="--set server.port"),
    case(
        "set-unknown-key",
        M,
        "cli.unknown-key",
        "server.prot",
        sets=("server.prot=9000",),
        source="--set server.prot",
        fix="did you mean server.port?",
    ),
    # --- TLS rules ---------------------------------------------------------------------------
    case(
        "tls-key-without-cert",
        M + '[server.tls]\nkeyfile = "{cert_key}"\n',
        "tls.key-without-cert",
        "server.tls.keyfile",
        line=4,
    ),
    case(
        "tls-cert-without-key",
        M + '[server.tls]\ncertfile = "{cert}"\n',
        "tls.cert-without-key",
        "server.tls.certfile",
        line=4,
    ),
    case(
        "tls-ca-without-cert",
        M + '[server.tls]\nca_certs = "{cert}"\n',
        "tls.ca-without-cert",
        "server.tls.ca_certs",
        line=4,
    ),
    case(
        "tls-password-without-key",
        M + '[server.tls]\nkeyfile_password = "x"\n',
        "tls.password-without-key",
        "server.tls.keyfile_password",
        line=4,
    ),
    case(
        "tls-refresh-without-cert",
        M + "[server.tls]\nrefresh = true\n",
        "tls.refresh-without-cert",
        "server.tls.refresh",
        line=4,
    ),
    case(
        "tls-verify-client-without-ca",
        TLS + "verify_client = true\n",
        "tls.verify-client-without-ca",
        "server.tls.verify_client",
        line=6,
    ),
    case(
        "tls-ca-certs-unused",
        TLS + 'ca_certs = "{other}"\n',
        "tls.ca-certs-unused",
        "server.tls.ca_certs",
        line=6,
        warning=True,
    ),
    case(
        "tls-certfile-missing",
        M + '[server.tls]\ncertfile = "{tmp}/nope.crt"\nkeyfile = "{cert_key}"\n',
        "tls.file-missing",
        "server.tls.certfile",
        line=4,
    ),
    case(
        "tls-keyfile-is-directory",
        M + '[server.tls]\ncertfile = "{cert}"\nkeyfile = "{tmp}"\n',
        "tls.file-missing",
        "server.tls.keyfile",
        line=5,
    ),
    case(
        "tls-ca-certs-missing",
        TLS + 'ca_certs = "{tmp}/nope.pem"\nverify_client = true\n',
        "tls.file-missing",
        "server.tls.ca_certs",
        line=6,
    ),
    case(
        "tls-cert-key-mismatch",
        M + '[server.tls]\ncertfile = "{cert}"\nkeyfile = "{other_key}"\n',
        "tls.cert-invalid",
        "server.tls.certfile",
        line=4,
    ),
    case(
        "tls-cert-not-pem",
        M + '[server.tls]\ncertfile = "{garbage}"\nkeyfile = "{cert_key}"\n',
        "tls.cert-invalid",
        "server.tls.certfile",
        line=4,
    ),
    case(
        "tls-encrypted-key-no-password",
        M + '[server.tls]\ncertfile = "{enc}"\nkeyfile = "{enc_key}"\n',
        "tls.cert-invalid",
        "server.tls.keyfile_password",
    ),
    case(
        "tls-wrong-password",
        M + '[server.tls]\ncertfile = "{enc}"\nkeyfile = "{enc_key}"\n',
        "tls.cert-invalid",
        "server.tls.keyfile_password",
        env={"DAEMON_SERVER__TLS__KEYFILE_PASSWORD": "wrong"},
        source="environment variable DAEMON_SERVER__TLS__KEYFILE_PASSWORD",
    ),
    case(
        "tls-encrypted-key-wrong-cert",
        M + f'[server.tls]\ncertfile = "{{cert}}"\nkeyfile = "{{enc_key}}"\nkeyfile_password = "{PASSWORD}"\n',
        "tls.cert-invalid",
        "server.tls.certfile",
        line=4,
    ),
    case(
        "tls-ca-not-pem",
        TLS + 'ca_certs = "{garbage}"\nverify_client = true\n',
        "tls.ca-invalid",
        "server.tls.ca_certs",
        line=6,
    ),
    # --- HTTP front-end rules ----------------------------------------------------------------
    case("host-invalid", M + '[server]\nhost = "bad host!"\n', "server.host-invalid", "server.host", line=4),
    case(
        "env-host-invalid",
        M,
        "server.host-invalid",
        "server.host",
        env={"DAEMON_SERVER__HOST": "-bad-"},
        source="environment variable DAEMON_SERVER__HOST",
    ),
    case(
        "public-without-api-key",
        M + '[server]\nhost = "0.0.0.0"\n',
        "server.public-without-api-key",
        "server.host",
        line=4,
        warning=True,
    ),
    # A non-root user gets this warning; root may bind any port, so for root there is nothing to warn about.
    case(
        "privileged-port",
        M + "[server]\nport = 80\n",
        "server.privileged-port",
        "server.port",
        line=4,
        warning=True,
        marks=(
            pytest.mark.skipif(
                IS_ROOT,
                reason="root may bind ports < 1024: the rule rightly stays silent, so it can only be seen as non-root",
            ),
        ),
    ),
    case(
        "ports-conflict-nccl",
        M + "[server]\nport = 29500\n[distributed]\nnccl_port = 29500\n",
        "ports.conflict",
        "distributed.nccl_port",
        line=6,
    ),
    case(
        "ports-conflict-dist-init",
        M + 'tp_size = 2\n[server]\nport = 25000\n[distributed]\nnnodes = 2\ndist_init_addr = "[::1]:25000"\n',
        "ports.conflict",
        "distributed.dist_init_addr",
        line=8,
    ),
    # --- model and tokenizer rules -----------------------------------------------------------
    case("model-dir-missing", '[model]\npath = "{tmp}/no-such-model"\n', "model.path-missing", "model.path", line=2),
    case("model-path-is-file", '[model]\npath = "{afile}"\n', "model.path-missing", "model.path", line=2),
    case(
        "model-builtin-unknown",
        '[model]\npath = "builtin:nope"\n',
        "model.path-missing",
        "model.path",
        line=2,
        fix="builtin:demo",
    ),
    case("model-path-too-long", '[model]\npath = "/' + "a" * 5000 + '"\n', "model.path-missing", "model.path", line=2),
    case(
        "env-model-dir-missing",
        "",
        "model.path-missing",
        "model.path",
        env={"DAEMON_MODEL__PATH": "{tmp}/no-such-model"},
        source="environment variable DAEMON_MODEL__PATH",
    ),
    case("model-no-config", '[model]\npath = "{no_config}"\n', "model.config-invalid", "model.path", line=2),
    case(
        "model-config-not-json", '[model]\npath = "{bad_json_config}"\n', "model.config-invalid", "model.path", line=2
    ),
    case("model-no-weights", '[model]\npath = "{no_weights}"\n', "model.weights-missing", "model.path", line=2),
    case("model-shard-missing", '[model]\npath = "{missing_shard}"\n', "model.weights-missing", "model.path", line=2),
    case("model-weights-truncated", '[model]\npath = "{truncated}"\n', "model.weights-corrupt", "model.path", line=2),
    case(
        "model-architecture",
        '[model]\npath = "{gpt2}"\n',
        "model.architecture-unsupported",
        "model.path",
        line=2,
        fix="LlamaForCausalLM",
    ),
    case("model-activation", '[model]\npath = "{relu2}"\n', "model.activation-unsupported", "model.path", line=2),
    case("model-rope", '[model]\npath = "{rope_mrope}"\n', "model.rope-unsupported", "model.path", line=2),
    case("model-quantized", '[model]\npath = "{awq}"\n', "model.quantization-unsupported", "model.path", line=2),
    case("model-fp8", '[model]\npath = "{fp8}"\n', "model.dtype-unsupported", "model.path", line=2),
    case(
        "tokenizer-files-missing",
        '[model]\npath = "{no_tokenizer}"\n',
        "tokenizer.path-missing",
        "tokenizer.path",
        source="derived from model.path",
    ),
    case(
        "tokenizer-dir-missing",
        M + '[tokenizer]\npath = "{tmp}/no-tokenizer"\n',
        "tokenizer.path-missing",
        "tokenizer.path",
        line=4,
    ),
    case(
        "tokenizer-builtin-unknown",
        M + '[tokenizer]\npath = "builtin:nope"\n',
        "tokenizer.path-missing",
        "tokenizer.path",
        line=4,
    ),
    case(
        "served-name-colon",
        M + 'served_model_name = "llama:7b"\n',
        "model.served-name-colon",
        "model.served_model_name",
        line=3,
    ),
    case("tp-does-not-divide-heads", M + "tp_size = 8\n", "model.tp-divides-heads", "model.tp_size", line=3),
    case(
        "tp-does-not-divide-demo-heads",
        '[model]\npath = "builtin:demo"\ntp_size = 3\n',
        "model.tp-divides-heads",
        "model.tp_size",
        line=3,
    ),
    case(
        "replicas-over-nodes",
        M + 'tp_size = 2\ndp_size = 2\n[distributed]\nnnodes = 2\ndist_init_addr = "10.0.0.1:25000"\n',
        "distributed.one-replica-over-nodes",
        "model.dp_size",
        line=4,
    ),
    case(
        "blue-green-over-nodes",
        M + 'tp_size = 2\n[runtime]\nmodel_reload = "blue_green"\n[distributed]\nnnodes = 2\n'
        'dist_init_addr = "10.0.0.1:25000"\n',
        "distributed.no-blue-green-over-nodes",
        "runtime.model_reload",
        line=5,
    ),
    case("cuda-unavailable", M + 'device = "cuda"\n', "model.cuda-unavailable", "model.device", line=3),
    case(
        "context-exceeds-model",
        M + "context_length = 8192\n",
        "model.context-exceeds-model",
        "model.context_length",
        line=3,
    ),
    case(
        "context-exceeds-demo",
        '[model]\npath = "builtin:demo"\ncontext_length = 4096\n',
        "model.context-exceeds-model",
        "model.context_length",
        line=3,
    ),
    case(
        "half-on-cpu",
        M + 'device = "cpu"\ndtype = "float16"\n',
        "model.half-on-cpu",
        "model.dtype",
        line=4,
        warning=True,
    ),
    # --- scheduler rules ---------------------------------------------------------------------
    case(
        "total-tokens-below-context",
        M + "[scheduler]\nmax_total_tokens = 1000\n",
        "scheduler.total-tokens-below-context",
        "scheduler.max_total_tokens",
        line=4,
    ),
    case(
        "chunked-prefill-zero",
        M + "[scheduler]\nchunked_prefill_size = 0\n",
        "scheduler.chunked-prefill-size",
        "scheduler.chunked_prefill_size",
        line=4,
    ),
    case(
        "chunked-prefill-minus-two",
        M + "[scheduler]\nchunked_prefill_size = -2\n",
        "scheduler.chunked-prefill-size",
        "scheduler.chunked_prefill_size",
        line=4,
    ),
    case(
        "chunk-exceeds-cache",
        M + "[scheduler]\nmax_total_tokens = 5000\nchunked_prefill_size = 8192\n",
        "scheduler.chunk-exceeds-cache",
        "scheduler.chunked_prefill_size",
        line=5,
        warning=True,
    ),
    case(
        "running-exceeds-cache",
        M + "[scheduler]\nmax_total_tokens = 4096\nmax_running_requests = 5000\n",
        "scheduler.running-exceeds-cache",
        "scheduler.max_running_requests",
        line=5,
        warning=True,
    ),
    # --- distributed rules -------------------------------------------------------------------
    case(
        "node-rank-not-below-nnodes",
        M + 'tp_size = 2\n[distributed]\nnnodes = 2\nnode_rank = 2\ndist_init_addr = "10.0.0.1:25000"\n',
        "distributed.node-rank-range",
        "distributed.node_rank",
        line=6,
    ),
    case(
        "init-addr-required",
        M + "tp_size = 2\n[distributed]\nnnodes = 2\n",
        "distributed.init-addr-required",
        "distributed.nnodes",
        line=5,
    ),
    case(
        "init-addr-no-port",
        M + 'tp_size = 2\n[distributed]\nnnodes = 2\ndist_init_addr = "10.0.0.1"\n',
        "distributed.init-addr-format",
        "distributed.dist_init_addr",
        line=6,
    ),
    case(
        "init-addr-port-zero",
        M + 'tp_size = 2\n[distributed]\nnnodes = 2\ndist_init_addr = "10.0.0.1:0"\n',
        "distributed.init-addr-format",
        "distributed.dist_init_addr",
        line=6,
    ),
    case(
        "init-addr-unused",
        M + '[distributed]\ndist_init_addr = "10.0.0.1:25000"\n',
        "distributed.init-addr-unused",
        "distributed.dist_init_addr",
        line=4,
        warning=True,
    ),
    case(
        "tp-not-divisible-by-nnodes",
        M + 'tp_size = 1\n[distributed]\nnnodes = 2\ndist_init_addr = "10.0.0.1:25000"\n',
        "distributed.tp-divisible-by-nnodes",
        "model.tp_size",
        line=3,
    ),
    # --- runtime rules -----------------------------------------------------------------------
    case(
        "runtime-dir-too-long",
        M + '[runtime]\ndir = "/' + "d" * 70 + '"\n',
        "runtime.dir-too-long",
        "runtime.dir",
        line=4,
        fix="at most 59 bytes",
    ),
    # A directory under a regular file cannot be created by anyone, root included (os.access
    # ignores permission bits for root, so an unwritable directory would not do). Under {short}:
    # tmp_path is too long a prefix for runtime.dir (runtime.dir-too-long would fire too).
    case(
        "runtime-dir-under-file",
        M + '[runtime]\ndir = "{short}/afile/sub"\n',
        "runtime.dir-not-a-directory",
        "runtime.dir",
        line=4,
    ),
    case(
        "runtime-dir-unwritable",
        M + '[runtime]\ndir = "{short}/readonly/sub"\n',
        "runtime.dir-unwritable",
        "runtime.dir",
        line=4,
        warning=True,
        marks=(pytest.mark.skipif(IS_ROOT, reason="root writes anywhere: see test_runtime_dir_unwritable_rule"),),
    ),
    case(
        "runtime-dir-world-writable",
        M + '[runtime]\ndir = "{short}/open"\n',
        "runtime.dir-unsafe",
        "runtime.dir",
        line=4,
    ),
    case(
        "runtime-dir-nul",
        M + '[runtime]\ndir = "/tmp/daemon\\u0000x"\n',
        "schema.type",
        "runtime.dir",
        line=4,
    ),
]


def _is_xfail(c: Case) -> bool:
    return any(getattr(m, "name", None) == "xfail" for m in c.marks)


def _violations_text(report: Any) -> str:
    return "\n".join(v.to_line() for v in report.violations) or "(no violations)"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dmc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _prepare(c: Case, tmp: Path, short: Path) -> tuple[Path, dict[str, Any], Files]:
    """Write the case's files under `tmp`; return the config path and check_config's arguments."""
    files = Files(tmp, short)
    path = tmp / "server.toml"
    if c.toml is not None:
        path.write_bytes(files.sub(c.toml).encode(c.encoding))
    if c.config is not None:
        path = Path(files.sub(c.config))
    kwargs: dict[str, Any] = {
        "environ": {name: files.sub(value) for name, value in c.env.items()},
        "sets": [files.sub(s) for s in c.sets],
    }
    if c.env_file is not None:
        kwargs["env_file"] = tmp / "override.env"
        if c.env_file != MISSING_FILE:
            kwargs["env_file"].write_text(files.sub(c.env_file))
    files.values.setdefault("tmp", str(tmp))
    return path, kwargs, files


def _find(report: Any, c: Case) -> list[Any]:
    pool = report.warnings if c.warning else report.errors
    return [v for v in pool if v.rule == c.rule and v.key == c.key]


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_invalid_config_is_reported(c: Case, tmp_path: Path, short_dir: Path) -> None:
    path, kwargs, files = _prepare(c, tmp_path, short_dir)
    report = check_config(path, **kwargs)
    found = _find(report, c)
    assert found, f"expected {'warning' if c.warning else 'error'}[{c.rule}] {c.key}, got:\n{_violations_text(report)}"
    violation = found[0]
    assert violation.severity is (Severity.WARNING if c.warning else Severity.ERROR)
    assert violation.message and violation.fix
    if c.line is not None:
        assert violation.origin is not None and violation.origin.kind is OriginKind.FILE, violation
        assert violation.origin.name == str(path)
        assert violation.origin.line == c.line, violation.to_line()
    if c.source is not None:
        assert str(violation.origin) == files.sub(c.source)
    if c.fix is not None:
        assert c.fix in violation.fix
    if c.warning:
        # A warning is reported, yet the configuration stays usable (unless --strict).
        assert report.errors == [], _violations_text(report)
        assert report.config is not None
        assert report.passed() and not report.passed(strict=True)
    else:
        assert report.config is None
        assert not report.passed()
    for other in report.violations:  # every violation, not only the expected one, is complete
        assert other.message and other.fix, other


def test_corpus_is_large_and_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert len([c for c in CASES if not _is_xfail(c)]) >= 45


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[model]\npath = "builtin:demo"\n[server]\napi_key = ""\n')
    report = check_config(path, environ={"DAEMON_SERVER__TLS__KEYFILE_PASSWORD": "hunter2-secret"})
    assert [v.rule for v in report.errors] == ["schema.range", "tls.password-without-key"]
    assert "hunter2-secret" not in _violations_text(report)


def test_the_base_config_is_clean(tmp_path: Path) -> None:
    """Cases add one mistake to `M`, so `M` alone must produce no violation at all."""
    path = tmp_path / "server.toml"
    path.write_text(Files(tmp_path).sub(M))
    # Unrelated DAEMON_* variables (another program's, or the daemon's own for its children) pass.
    report = check_config(path, environ={"DAEMON_HOME": "/opt/x", "DAEMON_PARENT_PID": "1"})
    assert report.violations == [], _violations_text(report)
    assert report.config is not None


# --- every rule has a case ----------------------------------------------------------------------

# Rules that cannot fire through check_config on this CPU-only test machine, and why.
CANNOT_FIRE_HERE = {
    # It only runs with device = "cuda" and at least one visible GPU; here torch sees none, and
    # model.cuda-unavailable fires instead. Its check is tested directly below.
    "model.tp-exceeds-gpus": "needs a visible CUDA GPU",
    "runtime.blue-green-needs-cache-size": "needs a visible CUDA GPU",
}


def _covered() -> set[str]:
    return {c.rule for c in CASES if not _is_xfail(c)}


def test_every_checked_rule_has_a_case() -> None:
    checked = {r.id for r in RULES if r.check is not None}
    assert set(CANNOT_FIRE_HERE) <= checked  # the exemptions name real, checked rules
    missing = sorted(checked - _covered() - set(CANNOT_FIRE_HERE))
    assert not missing, f"rules without a case in the invalid corpus: {missing}"


@pytest.mark.parametrize(
    "rule_id",
    [r.id for r in RULES if r.check is None],
)
def test_every_schema_bound_rule_has_a_case(rule_id: str) -> None:
    """A schema-bound rule is reported under its own id for a value out of its key's bounds."""
    assert rule_id in _covered()


class OneGpuFacts(Facts):
    """This machine's facts, except that one CUDA device is visible."""

    @property
    def cuda(self) -> CudaProbe:  # type: ignore[override]
        return CudaProbe(devices=1)


def _settings(**model: Any) -> DaemonSettings:
    distributed = model.pop("distributed", {})
    return DaemonSettings(model={"path": "builtin:demo", **model}, distributed=distributed)


def test_tp_exceeds_gpus_rule() -> None:
    rule = RULES_BY_ID["model.tp-exceeds-gpus"]
    facts = OneGpuFacts()
    findings = rule.findings(_settings(device="cuda", tp_size=2), facts)
    assert [f.message for f in findings] == ["tp_size 2 needs 2 GPUs on this node but 1 are visible"]
    # Within the node's GPUs, spread over nodes, or not on CUDA at all: nothing to report.
    assert rule.findings(_settings(device="cuda", tp_size=1), facts) == []
    two_nodes = {"nnodes": 2, "dist_init_addr": "10.0.0.1:25000"}
    assert rule.findings(_settings(device="cuda", tp_size=2, distributed=two_nodes), facts) == []
    assert rule.findings(_settings(device="cuda", tp_size=4, distributed=two_nodes), facts) != []
    assert rule.findings(_settings(device="auto", tp_size=2), facts) == []
    assert rule.findings(_settings(device="cpu", tp_size=2), facts) == []


def test_tp_and_kv_heads_rule(tmp_path: Path) -> None:
    """tp_size must divide the attention heads; the KV heads it may divide or be a multiple of (each
    is then replicated, as vLLM does)."""
    rule = RULES_BY_ID["model.tp-divides-heads"]

    def findings(heads: int, kv_heads: int, tp: int) -> list[str]:
        model = write_model_dir(tmp_path / f"m-{heads}-{kv_heads}", heads=heads, kv_heads=kv_heads)
        settings = DaemonSettings(model={"path": str(model), "tp_size": tp})
        return [f.message for f in rule.findings(settings, Facts())]

    assert findings(4, 2, 4) == []  # each KV head on two ranks
    assert findings(4, 4, 2) == []
    assert findings(6, 3, 2) == ["tp_size 2 neither divides nor is a multiple of the model's 3 KV heads"]
    assert findings(4, 2, 8) == ["tp_size 8 does not divide the model's 4 attention heads"]


def test_tp_exceeds_gpus_through_the_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[model]\npath = "builtin:demo"\ndevice = "cuda"\ntp_size = 2\n')
    report = check_config(path, environ={}, facts=OneGpuFacts())
    found = [(v.rule, v.key, v.origin.line) for v in report.errors]
    assert found == [("model.tp-exceeds-gpus", "model.tp_size", 4)]


def test_blue_green_needs_a_cache_size_on_a_gpu_rule() -> None:
    rule = RULES_BY_ID["runtime.blue-green-needs-cache-size"]

    def settings(device: str, **changes: Any) -> DaemonSettings:
        return DaemonSettings(
            model={"path": "builtin:demo", "device": device},
            runtime={"model_reload": changes.pop("model_reload", "blue_green")},
            scheduler=changes,
        )

    message = "model_reload is blue_green on a GPU but scheduler.max_total_tokens is unset"
    assert [f.message for f in rule.findings(settings("cuda"), OneGpuFacts())] == [message]
    assert rule.findings(settings("cuda", max_total_tokens=65536), OneGpuFacts()) == []
    assert rule.findings(settings("cuda", model_reload="drain"), OneGpuFacts()) == []
    # not for auto: telling would import torch into the supervisor (its worker falls back to drain)
    assert rule.findings(settings("auto"), OneGpuFacts()) == []
    assert rule.findings(settings("cpu"), OneGpuFacts()) == []


class NonRootFacts(Facts):
    """This machine's facts, except that the user may not bind privileged ports."""

    @property
    def may_bind_privileged_ports(self) -> bool:
        return False


def test_privileged_port_rule(tmp_path: Path) -> None:
    """The privileged-port case above is skipped as root; here the rule is checked whoever runs it."""
    path = tmp_path / "server.toml"
    path.write_text('[model]\npath = "builtin:demo"\n[server]\nport = 80\n')
    report = check_config(path, environ={}, facts=NonRootFacts())
    assert [(v.rule, v.key, v.origin.line) for v in report.warnings] == [("server.privileged-port", "server.port", 4)]
    assert report.errors == [] and report.config is not None
    rule = RULES_BY_ID["server.privileged-port"]
    assert rule.findings(DaemonSettings(model={"path": "builtin:demo"}, server={"port": 1024}), NonRootFacts()) == []
    if IS_ROOT:
        assert check_config(path, environ={}).warnings == []


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [("server.workers", 300, 256), ("tokenizer.workers", 65, 64), ("model.tp_size", 2000, 1024)],
)
def test_upper_bound_fix_names_the_bound(tmp_path: Path, key: str, value: int, bound: int) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[model]\npath = "builtin:demo"\n')
    report = check_config(path, environ={}, sets=[f"{key}={value}"])
    [violation] = report.errors
    assert violation.key == key
    assert str(bound) in violation.fix, violation.to_line()


# --- the same mistakes through the real command line ---------------------------------------------

CLI_CASES = [
    "syntax-missing-value",
    "non-utf8-latin1",
    "missing-file",
    "env-port-not-integer",
    "env-single-underscore",
    "envfile-workers-zero",
    "set-unknown-key",
    "model-weights-truncated",
    "ports-conflict-nccl",
    "tls-cert-key-mismatch",
]
CASES_BY_ID = {c.id: c for c in CASES}


def _cli_args(path: Path, kwargs: dict[str, Any]) -> list[str]:
    args = ["check", "-c", str(path)]
    for assignment in kwargs["sets"]:
        args += ["--set", assignment]
    if "env_file" in kwargs:
        args += ["--env-file", str(kwargs["env_file"])]
    return args


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_cli_reports_invalid_config(case_id: str, tmp_path: Path, short_dir: Path) -> None:
    c = CASES_BY_ID[case_id]
    path, kwargs, files = _prepare(c, tmp_path, short_dir)
    result = run_daemon(*_cli_args(path, kwargs), env=kwargs["environ"])
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.stdout, result.stderr)

    # The command sees the same environment, so it must report what check_config reports.
    expected = check_config(path, **{**kwargs, "environ": clean_environ(**kwargs["environ"])})
    *lines, summary = result.stdout.splitlines()
    assert summary.startswith(f"{path}: INVALID ("), result.stdout
    assert len(lines) == len(expected.violations), result.stdout
    for line, violation in zip(lines, expected.violations, strict=True):
        assert line.startswith(f"{violation.severity.value}[{violation.rule}]"), line
        assert "; fix: " in line, line

    prefix = f"error[{c.rule}] {c.key} (" if c.key else f"error[{c.rule}] ("
    matching = [line for line in lines if line.startswith(prefix)]
    assert matching, f"no line starts with {prefix!r}:\n{result.stdout}"
    if c.line is not None:
        source = f"{path}:{c.line}"
    else:
        assert c.source is not None
        source = files.sub(c.source)
    assert f"({source})" in matching[0], matching[0]


def test_cli_json_lists_every_rule(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        Files(tmp_path).sub(
            M + '[server]\nport = 0\nworkers = 0\nhost = "0.0.0.0"\n[scheduler]\nchunked_prefill_size = 0\n'
        )
    )
    # The runtime directory's default comes from the environment: keep the test machine's out of it.
    result = run_daemon(
        "check", "-c", str(path), "--format", "json", env={"XDG_RUNTIME_DIR": "", "RUNTIME_DIRECTORY": ""}
    )
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["valid"] is False and data["hash"] is None and data["file"] == str(path)
    errors = {(e["rule"], e["key"], e["line"]) for e in data["errors"]}
    assert errors == {
        ("server.port-range", "server.port", 4),
        ("workers.min", "server.workers", 5),
        ("scheduler.chunked-prefill-size", "scheduler.chunked_prefill_size", 8),
    }
    assert [(w["rule"], w["key"]) for w in data["warnings"]] == [("server.public-without-api-key", "server.host")]
    for entry in data["errors"] + data["warnings"]:
        assert entry["source"] == f"{path}:{entry['line']}"
        assert entry["message"] and entry["fix"]


class ReadOnlyRuntimeFacts(Facts):
    """This machine's facts, except that no directory is writable (what a non-root user may see)."""

    def dir_problem(self, path: Path) -> tuple[bool, str] | None:
        return super().dir_problem(path) or (False, f"{path} is not writable by this user")


def test_runtime_dir_unwritable_rule(tmp_path: Path, short_tmp: Path) -> None:
    """The corpus case is skipped as root; here the warning is checked whoever runs it."""
    path = tmp_path / "server.toml"
    path.write_text(f'[model]\npath = "builtin:demo"\n[runtime]\ndir = "{short_tmp}/run"\n')
    report = check_config(path, environ={}, facts=ReadOnlyRuntimeFacts())
    assert [(v.rule, v.key) for v in report.warnings] == [("runtime.dir-unwritable", "runtime.dir")]
    assert report.errors == [] and report.config is not None


def test_data_parallel_replicas_count_against_the_gpus() -> None:
    """model.dp_size replicas each take tp_size GPUs of their own: the product must fit."""
    rule = RULES_BY_ID["model.tp-exceeds-gpus"]
    facts = OneGpuFacts()
    findings = rule.findings(_settings(device="cuda", dp_size=2), facts)
    assert [f.message for f in findings] == [
        "dp_size 2 replicas of tp_size 1 need 2 GPUs on this node but 1 are visible"
    ]
    assert rule.findings(_settings(device="cuda", dp_size=1), facts) == []
    assert rule.findings(_settings(device="cpu", dp_size=4), facts) == []  # on CPU they share the cores
