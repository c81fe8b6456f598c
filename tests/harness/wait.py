"""Waiting on what can be observed: `until` a state is reached, `never` (for a while) a state that must not come.

A test never sleeps to let something happen: it polls for the state that shows it happened (a log
event, a metric, a PID gone, a notification received). The polling interval is the only sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

# What a predicate may raise while the state it polls is on its way (a file not yet written, a
# server not yet listening, a metric not yet exported): tried again, named if the wait fails.
RETRIED: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, httpx.HTTPError)


def until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    *,
    retry_on: tuple[type[Exception], ...] = RETRIED,
    detail: Callable[[], object] | None = None,
):
    """Poll `predicate` until it returns something truthy: that value. After `timeout` s, AssertionError naming
    `what`, the last error `predicate` raised (those of `retry_on` are tried again, others propagate) and
    `detail()` (a log tail, say)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if value := predicate():
                return value
        except retry_on as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    message = f"{what} not reached within {timeout} s"
    if last_error is not None:
        message += f" (last error: {last_error!r})"
    if detail is not None:
        message += f"\n{detail()}"
    raise AssertionError(message)


def never(predicate: Callable[[], object], seconds: float, what: str, interval: float = 0.1) -> None:
    """Watch `predicate` for `seconds`: AssertionError (naming `what` and the value) as soon as it returns something
    truthy. For what must not happen: the length of the window is the quantity under test, not a wait."""
    deadline = time.monotonic() + seconds
    while True:
        if value := predicate():
            raise AssertionError(f"{what}: {value!r}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(interval, remaining))
