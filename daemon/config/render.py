"""Human-facing views of the configuration: effective TOML, the reference, the rule catalogue."""

from __future__ import annotations

import json
from typing import Any

from daemon.config.check import LoadedConfig
from daemon.config.rules import LIFTED, RULES
from daemon.config.schema import RELOAD_EFFECTS, SECTIONS, SETTINGS, DaemonSettings, flat_values, toml_value


def render_toml(config: LoadedConfig, *, sources: bool = False) -> str:
    """The effective configuration as TOML, secrets masked; with `sources`, each value's origin."""
    values = flat_values(config.settings)
    lines = [f"# Effective configuration from {config.path} (secrets masked)", f"# hash {config.hash}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key in (k for k in SETTINGS if k.rpartition(".")[0] == section):
            name, value, origin = key.rpartition(".")[2], values[key], config.origin(key)
            text = f"# {name} is unset" if value is None else f"{name} = {toml_value(value)}"
            if sources:
                text = f"{text:<48} # {origin}"
            lines.append(text)
    return "\n".join(lines) + "\n"


def _default_text(key: str) -> str:
    field = SETTINGS[key].field
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    return "unset" if default is None else f"`{toml_value(default)}`"


def reference_markdown() -> str:
    """The configuration reference: every key, its type, default, reload scope and variable."""
    out = []
    for section in SECTIONS:
        out += [f"#### `[{section}]`", "", _section_doc(section), ""]
        out += ["| key | type | default | reload | description |", "|---|---|---|---|---|"]
        for key, info in SETTINGS.items():
            if key.rpartition(".")[0] != section:
                continue
            doc = (info.field.description or "").replace("|", "\\|")
            out.append(
                f"| `{key.rpartition('.')[2]}` | {info.type_name.replace('|', 'or')} | {_default_text(key)} "
                f"| {info.reload.value} | {doc} Env: `{info.env_var}`. |"
            )
        out.append("")
    return "\n".join(out)


def reload_scopes_markdown() -> str:
    """Every key by what a reload does when it changes."""
    out = ["| scope | when one of these keys changes | keys |", "|---|---|---|"]
    for scope, effect in RELOAD_EFFECTS.items():
        keys = ", ".join(f"`{key}`" for key, info in SETTINGS.items() if info.reload is scope) or "(none)"
        out.append(f"| `{scope.value}` | {effect} | {keys} |")
    return "\n".join(out) + "\n"


def _section_doc(section: str) -> str:
    parent, _, name = section.rpartition(".")
    model = SECTIONS[parent] if parent else DaemonSettings
    return model.model_fields[name].description or ""


def rules_markdown() -> str:
    out = ["| rule | severity | keys | requires | fix |", "|---|---|---|---|---|"]
    for rule in RULES:
        enforced = " (schema bound)" if rule.check is None else ""
        keys = ", ".join(f"`{k}`" for k in rule.keys)
        out.append(f"| `{rule.id}` | {rule.severity.value} | {keys} | {rule.summary}{enforced} | {rule.fix} |")
    out += ["", "Limits SGLang has that daemon lifts:", "", "| entry | keys | SGLang | daemon |", "|---|---|---|---|"]
    for lifted in LIFTED:
        keys = ", ".join(f"`{k}`" for k in lifted.keys)
        out.append(f"| `{lifted.id}` | {keys} | {lifted.sglang} | {lifted.why} |")
    return "\n".join(out) + "\n"


def rules_text() -> str:
    lines = [f"{r.id:40} {r.severity.value:8} {r.summary}" for r in RULES]
    lines += [f"{lifted.id:40} {'lifted':8} {lifted.why}" for lifted in LIFTED]
    return "\n".join(lines) + "\n"


def rules_json() -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "severity": r.severity.value,
            "keys": list(r.keys),
            "summary": r.summary,
            "fix": r.fix,
            "enforced_by": "rule" if r.check else "schema",
        }
        for r in RULES
    ] + [
        {
            "id": lifted.id,
            "severity": "lifted",
            "keys": list(lifted.keys),
            "summary": lifted.why,
            "sglang": lifted.sglang,
        }
        for lifted in LIFTED
    ]


def render_rules(fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rules_json(), indent=2) + "\n"
    return rules_markdown() if fmt == "markdown" else rules_text()
