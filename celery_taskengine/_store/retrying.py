"""Waiting out a Redis outage: how long, how often, and what is logged.

A restart, a failover or a dropped connection makes Redis unreachable for seconds. Celery's
Redis backend retries its own writes through such an outage (its ``retry_policy``, by default
20 retries at most 1 s apart); every store operation the engine makes waits as long, so an
outage Celery rides out never turns an engine run into a failure that a plain task would not
have. The waits back off exponentially up to the policy's ``interval_max``, and each retry runs
on a fresh connection: redis-py drops a connection that failed, so the pool connects anew.

Connection trouble is retried (``ConnectionError``, ``TimeoutError``, and so Redis' ``LOADING``
reply after a restart), and so are the refusals a server gives while it is being worked on:
OOM (full under ``noeviction`` until memory is freed), READONLY (demoted in a failover until
promoted again or the client finds the new master) and NOPERM (an ACL being changed): a plain
Celery task's outcome would be lost to them, an engine run's is kept until they pass, within the
same policy. Any other answer (a wrong type, a script error) is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

__all__ = [
    "OUTAGE_ERRORS",
    "REFUSAL_ERRORS",
    "WAITED_OUT",
    "Patience",
    "is_refusal",
    "patience_from_policy",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The errors that mean Redis could not be reached (``BusyLoadingError`` is a ConnectionError).
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
#: The refusals a server gives while a failover, a full memory or an ACL change lasts.
REFUSAL_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoPermissionError,
)
#: Everything an operation waits out (see the module docstring).
WAITED_OUT: tuple[type[Exception], ...] = (*OUTAGE_ERRORS, *REFUSAL_ERRORS)
#: Seconds of the first wait; each next one doubles, up to the policy's ``interval_max``.
FIRST_WAIT_SECONDS = 0.05
#: What Celery's Redis backend uses when the app gives no ``retry_policy``.
CELERY_DEFAULT_POLICY: Mapping[str, Any] = {"max_retries": 20, "interval_max": 1}


@dataclass(frozen=True, slots=True)
class Patience:
    """How long to keep retrying an operation while Redis is unreachable.

    ``seconds``: the whole wait, from the first failure (0: fail at once); ``longest_wait``:
    the cap on one wait between tries, in seconds; ``errors``: what is waited out.
    """

    seconds: float = 0.0
    longest_wait: float = 1.0
    errors: tuple[type[Exception], ...] = WAITED_OUT

    def call(self, operation: Callable[[], T], *, what: str, run_id: str = "") -> T:
        """``operation()``, tried again while Redis is unreachable or refuses it for a while
        (:attr:`errors`), for up to ``seconds``.

        Raises the last such error once the patience is spent. The first failure is logged
        once, with ``run_id`` (else the id of the run this thread is in) and ``what``; the
        end of the wait is logged too.
        """
        try:
            return operation()
        except self.errors as exc:
            if self.seconds <= 0:
                raise
            first = exc
        deadline = time.monotonic() + self.seconds
        run_id = run_id or _current_run_id()
        logger.warning(
            "%s: Redis %s (%s) for %s; retrying for up to %g s",
            run_id,
            "refuses" if is_refusal(first) else "is unreachable",
            f"{type(first).__name__}: {first}",
            what,
            self.seconds,
        )
        wait, tries = FIRST_WAIT_SECONDS, 1
        while True:
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
            tries += 1
            try:
                result = operation()
            except self.errors:
                if time.monotonic() >= deadline:
                    raise
                wait = min(wait * 2, self.longest_wait)
                continue
            logger.info("%s: Redis answered again for %s (try %d)", run_id, what, tries)
            return result


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal that passes (OOM, READONLY, NOPERM), not an outage."""
    return isinstance(exc, REFUSAL_ERRORS)


def _current_run_id() -> str:
    """The id of the run this thread is in, to name it in outage logs (``-`` outside runs)."""
    from celery_taskengine._engine.run_scope import (
        current_task_run,  # the store is below the engine
    )

    run = current_task_run()
    return run.id if run is not None else "-"


def patience_from_policy(policy: Mapping[str, Any] | None) -> Patience:
    """The patience of a Celery backend ``retry_policy`` (``max_retries`` waits of at most
    ``interval_max`` s: the time Celery itself waits for Redis before giving up on a write).

    ``max_retries`` ``None`` means Celery retries forever; the engine then waits as long as
    Celery's default policy would, so a delivery is handed back to the broker rather than
    held for ever.
    """
    merged = {**CELERY_DEFAULT_POLICY, **(policy or {})}
    longest = float(merged.get("interval_max") or 0.0) or FIRST_WAIT_SECONDS
    retries = merged.get("max_retries")
    if retries is None:
        retries = CELERY_DEFAULT_POLICY["max_retries"]
    return Patience(seconds=max(0.0, float(retries) * longest), longest_wait=longest)
