"""Configuration: the schema, its sources, the rule catalogue and the checking pipeline.

Pure data and rules: nothing here starts or talks to a process.
"""

from daemon.config.check import LoadedConfig, Report, check_config, load_config
from daemon.config.errors import ConfigError, Origin, OriginKind, Severity, Violation
from daemon.config.schema import SETTINGS, DaemonSettings, Reload

__all__ = [
    "SETTINGS",
    "ConfigError",
    "DaemonSettings",
    "LoadedConfig",
    "Origin",
    "OriginKind",
    "Reload",
    "Report",
    "Severity",
    "Violation",
    "check_config",
    "load_config",
]
