"""What a new configuration changes against the running one, and what applying it costs.

The reload planner's input: every effective setting that differs (secrets
compared in the clear, shown masked), each with the reload scope its schema
field declares; and every setting the file changed in vain, because the
environment or `--set` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon.config.check import LoadedConfig
from daemon.config.errors import Origin, OriginKind
from daemon.config.schema import SETTINGS, Reload, flat_values

OVERRIDING = (OriginKind.ENV, OriginKind.ENV_FILE, OriginKind.CLI)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any  # as shown: secrets masked
    new: Any
    scope: Reload


@dataclass(frozen=True)
class Shadowed:
    """A key the file changed whose effective value comes from elsewhere."""

    key: str
    file_old: Any
    file_new: Any
    source: Origin

    def message(self) -> str:
        return f"{self.key} changed in the file, but {self.source} overrides it: nothing changes"


@dataclass
class ConfigDiff:
    changes: list[Change] = field(default_factory=list)
    shadowed: list[Shadowed] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def scopes(self) -> set[Reload]:
        return {c.scope for c in self.changes}

    @property
    def needs_full_restart(self) -> list[Change]:
        return [c for c in self.changes if c.scope is Reload.SUPERVISOR]

    def as_log(self) -> dict[str, dict[str, Any]]:
        return {c.key: {"old": c.old, "new": c.new, "scope": c.scope.value} for c in self.changes}


def diff_configs(running: LoadedConfig, new: LoadedConfig) -> ConfigDiff:
    old_values = flat_values(running.settings, reveal_secrets=True)
    new_values = flat_values(new.settings, reveal_secrets=True)
    old_shown, new_shown = flat_values(running.settings), flat_values(new.settings)
    diff = ConfigDiff()
    for key, info in SETTINGS.items():
        if old_values[key] != new_values[key]:
            diff.changes.append(Change(key, old_shown[key], new_shown[key], info.reload))
            continue
        file_old, file_new = running.file_values.get(key), new.file_values.get(key)
        origin = new.origin(key)
        if file_old != file_new and origin.kind in OVERRIDING:
            if info.is_secret:
                file_old, file_new = old_shown[key], new_shown[key]
            diff.shadowed.append(Shadowed(key, file_old, file_new, origin))
    return diff
