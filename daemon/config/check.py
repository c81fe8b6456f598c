"""The one pipeline that turns sources into a checked, effective configuration.

read sources -> merge -> validate against the schema -> derive defaults -> run the
rule catalogue. `daemon check`, `daemon -c` and (later) every reload run this
same code, so a file that passes `daemon check` is a file the daemon accepts.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.config.derive import derive_defaults
from daemon.config.errors import ConfigError, Origin, Severity, Violation
from daemon.config.facts import Facts, OfflineFacts
from daemon.config.rules import RULES, schema_rule_for
from daemon.config.schema import (
    SECTIONS,
    SETTINGS,
    DaemonSettings,
    SettingInfo,
    config_hash,
    toml_value,
)
from daemon.config.sources import (
    Layer,
    cli_layer,
    env_file_layer,
    merge_layers,
    origin_of,
    process_env_layer,
    read_config_file,
    suggest_key,
)


@dataclass(frozen=True)
class LoadedConfig:
    """A valid effective configuration and where each of its values came from."""

    settings: DaemonSettings
    origins: Mapping[str, Origin]
    path: Path
    warnings: tuple[Violation, ...] = ()
    file_values: Mapping[str, Any] = field(default_factory=dict)  # what the file alone says, by dotted key

    def origin(self, key: str) -> Origin:
        return origin_of(self.origins, key)

    @property
    def hash(self) -> str:
        """Fingerprint of the effective configuration: equal configs, equal hashes."""
        return config_hash(self.settings)


@dataclass
class Report:
    """Everything `daemon check` found: the config, if it could be built, and all violations."""

    path: Path
    config: LoadedConfig | None = None
    violations: list[Violation] = field(default_factory=list)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity is Severity.WARNING]

    def passed(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)


def check_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    sets: Iterable[str] = (),
    facts: Facts | None = None,
    offline: bool = False,
) -> Report:
    """Check a config file with its environment and `--set` overrides; never raises ConfigError."""
    report = Report(path)
    environ = os.environ if environ is None else environ
    readers = [lambda: read_config_file(path), lambda: process_env_layer(environ), lambda: cli_layer(sets)]
    if env_file is not None:
        readers.insert(2, lambda: env_file_layer(env_file))
    layers = []
    for read in readers:
        try:
            layers.append(read())
        except ConfigError as exc:  # read the other sources too: report all their problems at once
            report.violations += exc.violations
    if report.violations:
        return report
    merged = merge_layers(layers)
    settings, schema_violations, invalid_keys = _validate(merged)
    report.violations.extend(schema_violations)
    if settings is None:
        return report
    settings, origins = derive_defaults(settings, merged.origins, environ)
    facts = facts or (OfflineFacts() if offline else Facts())
    report.violations.extend(_run_rules(settings, origins, facts, skip_keys=invalid_keys))
    if not report.errors:
        file_values = dict(_flatten(layers[0].values))
        report.config = LoadedConfig(settings, origins, path, tuple(report.warnings), file_values)
    return report


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, value in values.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def load_config(path: Path, **kwargs: Any) -> LoadedConfig:
    """Like check_config, but raise ConfigError unless the configuration is usable."""
    report = check_config(path, **kwargs)
    if report.config is None:
        raise ConfigError(report.errors or report.violations)
    return report.config


# --- schema validation -------------------------------------------------------------------------


def _validate(merged: Layer) -> tuple[DaemonSettings | None, list[Violation], set[str]]:
    """Validate against the schema, reporting every schema error.

    After an error, the offending value is dropped and validation retried, so
    that the rules can still check the keys that are fine: one run shows all.
    """
    values = copy.deepcopy(merged.values)
    violations: list[Violation] = []
    invalid: set[str] = set()
    for _attempt in range(len(SETTINGS) + 2):
        try:
            return DaemonSettings(**values), violations, invalid
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        new = [(e, ".".join(str(p) for p in e["loc"])) for e in errors]
        new = [(e, key) for e, key in new if key not in invalid]
        for error, key in new:
            invalid.add(key)
            violations.append(_schema_violation(error, key, origin_of(merged.origins, key)))
        if not new or any(e["type"] == "missing" for e, _ in new):
            return None, violations, invalid
        for _error, key in new:
            _drop(values, key.split("."))
    return None, violations, invalid


def _drop(values: dict[str, Any], path: list[str]) -> None:
    node: Any = values
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_LENGTH_ERRORS = {"string_too_short", "string_too_long", "too_short", "too_long", "empty_path"}


def _schema_violation(error: Mapping[str, Any], key: str, origin: Origin) -> Violation:
    """A pydantic error as a Violation: the rule it breaks, the key, where the value came from, the fix."""
    kind, info = error["type"], SETTINGS.get(key)
    given = error.get("input")
    # Never echo a secret, nor a whole table (it may hold one): name its type instead.
    value = "<secret>" if info and info.is_secret else _show(given) if info else f"<{type(given).__name__}>"
    problem = f"{key} = {value}: {error['msg'][0].lower()}{error['msg'][1:]}"
    if kind == "extra_forbidden":
        return Violation("schema.unknown-key", Severity.ERROR, key, f"unknown key {key}", suggest_key(key), origin)
    if kind == "missing":
        if key in SECTIONS:  # a whole required table is absent: name its first required key
            key = next(k for k, i in SETTINGS.items() if k.startswith(key + ".") and i.required)
            info = SETTINGS[key]
        hint = f"set {key} in the file, with {info.env_var}, or with --set {key}=..." if info else f"set {key}"
        return Violation("schema.missing", Severity.ERROR, key, f"{key} is required", hint, origin)
    if info is None:  # a table given a value that is not a table
        return Violation("schema.type", Severity.ERROR, key, problem, f"make [{key}] a table of keys", origin)
    if catalogue := schema_rule_for(key, kind):
        return Violation(catalogue.id, Severity.ERROR, key, problem, catalogue.fix, origin)
    if kind in _BOUND_ERRORS:
        return Violation("schema.range", Severity.ERROR, key, problem, f"use a value {info.bounds}", origin)
    if kind in _LENGTH_ERRORS:
        fix = "give a non-empty value, or remove the key to use its default"
        return Violation("schema.range", Severity.ERROR, key, problem, fix, origin)
    if kind == "literal_error":
        return Violation("schema.choice", Severity.ERROR, key, problem, _choice_fix(info, given), origin)
    return Violation("schema.type", Severity.ERROR, key, problem, f"use a value of type {info.type_name}", origin)


def _choice_fix(info: SettingInfo, given: Any) -> str:
    choices = info.type_name
    names = [c.strip('"') for c in choices.split(" | ")]
    close = difflib.get_close_matches(str(given), names, n=1, cutoff=0.6)
    return f"use one of {choices}" + (f' (did you mean "{close[0]}"?)' if close else "")


def _show(value: Any) -> str:
    text = toml_value(value) if isinstance(value, str | int | float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- rules -------------------------------------------------------------------------------------


def _run_rules(
    settings: DaemonSettings, origins: Mapping[str, Origin], facts: Facts, skip_keys: set[str]
) -> list[Violation]:
    violations = []
    for rule in RULES:
        if rule.check is None or skip_keys.intersection(rule.keys):
            continue  # a key it reads is already invalid: its verdict would be noise
        # Blame the key an operator set over one left at its default: that is where the fix goes.
        blamed = next((k for k in rule.keys if k in origins), rule.keys[0])
        for finding in rule.findings(settings, facts):
            key = finding.key or blamed
            violations.append(
                Violation(rule.id, rule.severity, key, finding.message, rule.fix, origin_of(origins, key))
            )
    return violations
