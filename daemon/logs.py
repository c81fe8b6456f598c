"""One logging setup for every process of the daemon.

Each process calls `configure_logging` first thing in its entry point (spawned
children do not inherit it). structlog and the standard library (Granian,
libraries) share one handler, so every line has the same shape: JSON lines when
the output is not a terminal or format = json, readable text on a terminal.
Every line carries the process's role and PID (`role` and `pid` are reserved:
log another process's PID as `child_pid`), and the config generation it runs. Warnings and uncaught exceptions
become log lines too, so a JSON log stays JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_role = "daemon"
_generation: int | None = None


def set_generation(generation: int) -> None:
    """The config generation this process runs: on every line it logs from now on."""
    global _generation
    _generation = generation


def _add_process(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Reserved keys: they always describe the process writing the line (log a child's PID as
    # child_pid). The PID is read per line, so forked children log their own.
    event_dict["role"] = _role
    event_dict["pid"] = os.getpid()
    if _generation is not None:
        event_dict.setdefault("generation", _generation)
    return event_dict


_SHARED_PROCESSORS = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _add_process,
]


_LEADING_KEYS = ("timestamp", "level", "role", "pid", "logger", "event")


def _leading_keys_first(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the keys every line has first, so JSON lines read well in a terminal too."""
    leading = {k: event_dict.pop(k) for k in _LEADING_KEYS if k in event_dict}
    return {**leading, **event_dict}


def use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty and isatty())
    return fmt == "json"


def configure_logging(role: str, *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging of this process to `stream` (stderr by default).

    Safe to call again, e.g. when a reload changes logging.level or format.
    """
    global _role
    _role = role
    stream = stream or sys.stderr
    if use_json(fmt, stream):
        renderer: Any = structlog.processors.JSONRenderer()
        final = [structlog.processors.format_exc_info, _leading_keys_first, renderer]
    else:
        final = [structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn() lines become log lines too
    sys.excepthook = _log_uncaught
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reload may change the level, and cached loggers would keep the old one.
        cache_logger_on_first_use=False,
    )


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("daemon").critical("uncaught exception", exc_info=(kind, error, traceback))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
