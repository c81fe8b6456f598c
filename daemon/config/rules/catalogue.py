"""What a rule is, and the registry the catalogue modules add their rules to."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.schema import DaemonSettings


@dataclass(frozen=True)
class Finding:
    message: str
    key: str | None = None  # the key to blame, when it is not the rule's first key


CheckResult = str | Finding | Iterable[Finding] | None
Check = Callable[[DaemonSettings, Facts], CheckResult]


@dataclass(frozen=True)
class Rule:
    id: str
    keys: tuple[str, ...]
    severity: Severity
    summary: str  # what the rule requires
    fix: str  # how to fix a violation
    check: Check | None = None  # None: enforced by the schema's bounds on `keys`
    schema_errors: frozenset[str] = frozenset()  # for schema-enforced rules: the pydantic error types they cover

    def findings(self, config: DaemonSettings, facts: Facts) -> list[Finding]:
        assert self.check is not None
        result = self.check(config, facts)
        if not result:
            return []
        if isinstance(result, str):
            return [Finding(result)]
        if isinstance(result, Finding):
            return [result]
        return list(result)


@dataclass(frozen=True)
class LiftedLimit:
    """A combination SGLang refuses that daemon supports."""

    id: str
    keys: tuple[str, ...]
    sglang: str  # what SGLang does
    why: str  # why daemon can support it


RULES: list[Rule] = []


def rule(
    id: str, *, keys: Iterable[str], fix: str, severity: Severity = Severity.ERROR, summary: str | None = None
) -> Callable[[Check], Check]:
    """Register a check; its docstring is the rule's summary unless one is given."""

    def register(check: Check) -> Check:
        RULES.append(Rule(id, tuple(keys), severity, summary or inspect.getdoc(check) or "", fix, check))
        return check

    return register


LOWER = frozenset({"greater_than_equal", "greater_than"})
UPPER = frozenset({"less_than_equal", "less_than", "finite_number"})
CHOICE = frozenset({"literal_error"})


def schema_rule(id: str, *, keys: Iterable[str], summary: str, fix: str, errors: frozenset[str]) -> None:
    RULES.append(Rule(id, tuple(keys), Severity.ERROR, summary, fix, schema_errors=errors))
