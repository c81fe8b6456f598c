"""The `daemon` command line: a thin layer over the config pipeline, the supervisor and its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import msgspec

from daemon import __version__
from daemon.config import ConfigError, check_config, load_config
from daemon.config.render import reference_markdown, reload_scopes_markdown, render_rules, render_toml
from daemon.config.schema import json_schema
from daemon.worker.nodes import describe_plan, node_plan

EXIT_OK = 0
EXIT_FAILED = 1  # the daemon could not start or crash-looped
EXIT_INVALID = 2  # invalid configuration or usage, like argparse's own usage errors


def _config_options() -> argparse.ArgumentParser:
    # SUPPRESS defaults let "daemon -c F check" and "daemon check -c F" both work.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the TOML config file (server.toml)",
    )
    options.add_argument(
        "--set",
        action="append",
        dest="sets",
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help="override one setting, e.g. --set server.port=9000 (repeatable; beats the environment)",
    )
    options.add_argument(
        "--env-file",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read DAEMON_* overrides from a KEY=value file too (as systemd's EnvironmentFile)",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    options = _config_options()
    parser = argparse.ArgumentParser(
        prog="daemon",
        parents=[options],
        description="Config-driven LLM serving daemon. `daemon -c FILE` runs it; the commands below inspect configs.",
    )
    parser.add_argument("--version", action="version", version=f"daemon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        parents=[options],
        help="validate a config: every violation at once",
        description="Exit 0 when valid, 2 when not. Warnings fail only with --strict.",
    )
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.add_argument(
        "--offline",
        action="store_true",
        help="skip checks of this host (files, model directory, GPUs): for a config meant for another machine",
    )
    check.add_argument("--format", choices=["text", "json"], default="text")

    commands.add_parser("schema", help="print the JSON Schema of the config file")

    config = commands.add_parser("config", help="show the effective config, or the reference of every key")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = config_commands.add_parser("show", parents=[options], help="effective config as TOML, secrets masked")
    show.add_argument("--sources", action="store_true", help="add where each value came from")
    config_commands.add_parser("reference", help="Markdown reference of every key (as in the README)")
    config_commands.add_parser("scopes", help="Markdown table of the keys by what a reload does when they change")

    api = commands.add_parser("api", help="describe the HTTP API: request fields, OpenAPI document")
    api_commands = api.add_subparsers(dest="api_command", metavar="SUBCOMMAND", required=True)
    api_commands.add_parser("fields", help="Markdown table of every request field and what the server does with it")
    api_commands.add_parser("openapi", help="the OpenAPI document the server serves at /openapi.json")

    commands.add_parser("models", help="Markdown table of the model architectures and options the engine serves")

    rules = commands.add_parser("rules", help="list the rule catalogue")
    rules.add_argument("--format", choices=["text", "json", "markdown"], default="text")

    finding = argparse.ArgumentParser(add_help=False)
    finding.add_argument(
        "--runtime-dir", type=Path, metavar="DIR", help="where the daemon's sockets are (default: its runtime.dir)"
    )
    finding.add_argument("--pid", type=int, help="the daemon's PID, when several share the runtime.dir")
    finding.add_argument("--format", choices=["text", "json"], default="text")
    reload = commands.add_parser(
        "reload",
        parents=[options, finding],
        help="reload the running daemon's config and print the outcome",
        description="Exit 0 when the reload was applied or changed nothing, 1 when it was rejected or rolled back.",
    )
    reload.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the outcome")
    commands.add_parser(
        "status", parents=[options, finding], help="the running daemon's tiers, PIDs, generation and last reload"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path or value that is not valid UTF-8 must not crash output
        stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        match args.command, getattr(args, "config_command", None) or getattr(args, "api_command", None):
            case None, _:
                return run(parser, args)
            case "check", _:
                return check(parser, args)
            case "schema", _:
                print(json.dumps(json_schema(), indent=2))
            case "config", "show":
                return show(parser, args)
            case "config", "reference":
                print(reference_markdown(), end="")
            case "config", "scopes":
                print(reload_scopes_markdown(), end="")
            case "rules", _:
                print(render_rules(args.format), end="")
            case "models", _:
                from daemon.engine.models.registry import models_markdown

                print(models_markdown(), end="")
            case "api", "fields":
                from daemon.frontend.api_docs import fields_markdown

                print(fields_markdown(), end="")
            case "api", "openapi":
                from daemon.frontend.api_docs import API_ROUTES, openapi

                print(json.dumps(openapi(API_ROUTES), indent=2))
            case "reload", _:
                return reload(parser, args)
            case "status", _:
                return status(parser, args)
    except BrokenPipeError:  # `daemon schema | head`: the reader left, nothing is wrong
        sys.stderr.close()
    return EXIT_OK


def _config_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    path = getattr(args, "config", None)
    if path is None:
        parser.error("the config file is required: -c FILE")
    return path


def _load_kwargs(args: argparse.Namespace) -> dict:
    return {"env_file": getattr(args, "env_file", None), "sets": getattr(args, "sets", [])}


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    path = _config_path(parser, args)
    report = check_config(path, offline=args.offline, **_load_kwargs(args))
    passed = report.passed(strict=args.strict)
    # Over several nodes: what this one will run, and the hash the others' must equal
    settings = report.config.settings if report.config else None
    plan = node_plan(settings) if settings and settings.distributed.nnodes > 1 else None
    if args.format == "json":
        print(
            json.dumps(
                {
                    "file": str(path),
                    "valid": passed,
                    "hash": report.config.hash if report.config else None,
                    "errors": [v.to_dict() for v in report.errors],
                    "warnings": [v.to_dict() for v in report.warnings],
                    **({"node": plan} if plan else {}),
                },
                indent=2,
            )
        )
    else:
        for violation in report.violations:
            print(violation.to_line())
        verdict = "valid" if passed else "INVALID"
        print(f"{path}: {verdict} ({_count(report.errors, 'error')}, {_count(report.warnings, 'warning')})")
        if plan:
            print(describe_plan(plan))
    return EXIT_OK if passed else EXIT_INVALID


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def show(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = load_config(_config_path(parser, args), **_load_kwargs(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    print(render_toml(config, sources=args.sources), end="")
    return EXIT_OK


def _socket_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    from daemon.control import find_daemon, runtime_dir_for

    runtime_dir = args.runtime_dir
    if runtime_dir is None:
        if getattr(args, "config", None) is None:
            parser.error("say which daemon: -c FILE (its config) or --runtime-dir DIR")
        runtime_dir = runtime_dir_for(args.config, **_load_kwargs(args))
    return find_daemon(runtime_dir, args.pid)


def reload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from daemon.control import ControlError, describe_reload, request_reload

    try:
        report = request_reload(_socket_dir(parser, args), args.timeout)
    except ControlError as exc:
        print(f"daemon reload: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(msgspec.to_builtins(report), indent=2) if args.format == "json" else describe_reload(report))
    return EXIT_OK if report.result in ("applied", "unchanged") else EXIT_FAILED


def status(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from daemon.control import ControlError, describe_status, read_status

    try:
        current = read_status(_socket_dir(parser, args))
    except ControlError as exc:
        print(f"daemon status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(msgspec.to_builtins(current), indent=2) if args.format == "json" else describe_status(current))
    return EXIT_OK


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    for early in caught:
        warnings.showwarning(early.message, early.category, early.filename, early.lineno)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    path = _config_path(parser, args)
    # The config says how to log, so logging is set up after loading it: warnings raised while
    # loading wait, and then become log lines like any other.
    with warnings.catch_warnings(record=True) as early_warnings:
        try:
            config, error = load_config(path, **_load_kwargs(args)), None
        except ConfigError as exc:
            config, error = None, exc
    if config is None:
        _show_warnings(early_warnings)
        print(error, file=sys.stderr)
        return EXIT_INVALID
    from daemon.logs import configure_logging, get_logger, set_generation

    configure_logging("supervisor", level=config.settings.logging.level, fmt=config.settings.logging.format)
    set_generation(1)
    _show_warnings(early_warnings)
    import asyncio

    from daemon.supervisor.runtime_dir import RuntimeDirError
    from daemon.supervisor.supervisor import Supervisor

    log = get_logger("daemon.cli")
    for warning in config.warnings:
        log.warning("config.warning", rule=warning.rule, key=warning.key, message=warning.message, fix=warning.fix)
    log.info("config.loaded", path=str(path), hash=config.hash)
    try:
        supervisor = Supervisor(config, _load_kwargs(args))
    except RuntimeDirError as exc:
        log.error("daemon.failed", reason=str(exc))
        return EXIT_FAILED
    return asyncio.run(supervisor.run())


if __name__ == "__main__":
    raise SystemExit(main())
