"""What went wrong in a configuration, and where the offending value came from."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


class OriginKind(enum.StrEnum):
    DEFAULT = "default"
    FILE = "file"
    ENV = "env"
    ENV_FILE = "env-file"
    CLI = "cli"
    DERIVED = "derived"


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a file line, an environment variable, `--set`, ..."""

    kind: OriginKind
    name: str | None = None  # file path, variable name, `--set` argument, or the key derived from
    line: int | None = None
    file: Path | None = None  # the env file, for ENV_FILE

    def __str__(self) -> str:
        match self.kind:
            case OriginKind.DEFAULT:
                return "default"
            case OriginKind.FILE:
                return f"{self.name}:{self.line}" if self.line else str(self.name)
            case OriginKind.ENV:
                return f"environment variable {self.name}"
            case OriginKind.ENV_FILE:
                return f"{self.name} in env file {self.file}"
            case OriginKind.CLI:
                return f"--set {self.name}"
            case OriginKind.DERIVED:
                return f"derived from {self.name}"
        return self.kind.value


DEFAULT_ORIGIN = Origin(OriginKind.DEFAULT)


@dataclass(frozen=True)
class Violation:
    """One problem found in a configuration, by the schema or by a catalogue rule."""

    rule: str  # rule id, e.g. "tls.key-without-cert", or "schema.type" for schema errors
    severity: Severity
    key: str | None  # the dotted key it is about; None for file-level problems
    message: str  # what is wrong
    fix: str  # how to fix it
    origin: Origin | None = None  # where the key's value came from

    def to_line(self) -> str:
        """The violation on one line, whatever characters the offending key or value holds."""
        where = f" {self.key}" if self.key else ""
        origin = f" ({self.origin})" if self.origin and self.origin.kind is not OriginKind.DEFAULT else ""
        fix = f"; fix: {self.fix}" if self.fix else ""
        return _one_line(f"{self.severity.value}[{self.rule}]{where}{origin}: {self.message}{fix}")

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "key": self.key,
            "source": str(self.origin) if self.origin else None,
            "line": self.origin.line if self.origin else None,
            "message": self.message,
            "fix": self.fix,
        }


def _one_line(text: str) -> str:
    """Escape line breaks and other control characters (as Python would in a repr)."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
        for ch in text
    )


@dataclass
class ConfigError(Exception):
    """The one error type config loading raises: the configuration cannot be used."""

    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(v.to_line() for v in self.violations)
