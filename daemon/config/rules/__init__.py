"""The rule catalogue: every cross-field and host check a configuration must pass.

Adapted from the checks SGLang's server arguments enforce, plus the ones it
lacks. Each rule is data: a stable id (used in output, docs and tests), the
keys it reads, a severity, what it requires and how to fix a violation. A rule
whose `check` is None is enforced by the bounds of its keys in the schema; it is
listed so that the catalogue is complete and schema errors on those keys carry
its id and fix. `LIFTED` lists limits SGLang has that daemon does not.

One module per area; importing them, in this order, registers their rules.
"""

from __future__ import annotations

# Importing the areas registers their rules, in this order: the catalogue's order in docs and output.
# isort: off
from daemon.config.rules import tls, server, model, scheduler, distributed, runtime  # noqa: F401

# isort: on
from daemon.config.rules.catalogue import RULES, Finding, LiftedLimit, Rule
from daemon.config.rules.lifted import LIFTED

RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}


def schema_rule_for(key: str, error_type: str) -> Rule | None:
    """The catalogue rule that a schema error of this type on `key` enforces, if any."""
    return next((r for r in RULES if key in r.keys and error_type in r.schema_errors), None)


__all__ = ["LIFTED", "RULES", "RULES_BY_ID", "Finding", "LiftedLimit", "Rule", "schema_rule_for"]
