"""What follows an attempt: success, failure, timeout, crash, and whether to retry.

The retry decision is made here once: the retry budget, the task's ``retry_condition_fn`` (a
``RunHook`` step: user code), the delay for this retry with its jitter (from the run's seeded
generator), and AwaitingRetry with its scheduled time or an immediate Retrying.
"""

from __future__ import annotations

import logging
from typing import Any

from celery_taskengine._engine.core_states import StateEntry, describe, returned_state
from celery_taskengine._engine.retry_policy import (
    delay_for_retry,
    full_jitter,
    jittered,
    retry_time,
)
from celery_taskengine._engine.steps import RunHook, Steps
from celery_taskengine.errors import RetryRequested, TaskRunTimeoutError
from celery_taskengine.states import State, StateType
from celery_taskengine.transactions import Transaction

__all__ = ["Outcomes"]

logger = logging.getLogger("celery_taskengine.task_runs")

_NOT_AN_ENDING = frozenset({StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED})


class Outcomes(StateEntry):
    """The state an attempt's outcome leads to."""

    def handle_success(self, result: Any, txn: Transaction) -> Steps[None]:
        returned = returned_state(result)
        if returned is not None and returned.type in _NOT_AN_ENDING:
            # Entered as is, Pending is an illegal transition and Running/Scheduled call the
            # function again forever: a task returning one is a mistake, so the run fails.
            message = (
                f"Task run returned the non-final state {returned}; a task may return only "
                "a final state (Completed, Failed, Cancelled, Crashed) or Paused."
            )
            returned = self._new(StateType.FAILED, "Failed", message)
        if returned is None:
            txn.stage(result, self.options.on_commit, self.options.on_rollback)
            yield self.enter_state(self._new(StateType.COMPLETED, "Completed", data=result))
            return
        if returned.is_completed():
            txn.stage(returned.data, self.options.on_commit, self.options.on_rollback)
            yield self.enter_state(returned)
            return
        txn.on_rollback_hooks.extend(self.options.on_rollback)
        yield from txn.rollback_steps()
        if returned.is_failed() and (yield from self.handle_retry(returned)):
            return
        yield self.enter_state(returned)

    def handle_exception(self, exc: Exception) -> Steps[None]:
        control = self.env.ends_attempt(exc) if self.env.ends_attempt is not None else None
        if control is not None:
            yield self.enter_state(control)
            return
        if (yield from self.handle_retry(exc)):
            return
        if isinstance(exc, RetryRequested) and isinstance(exc.exc, Exception):
            exc = exc.exc  # a retry asked for past the limit fails as Celery's does: with exc
        yield from self._fail(exc)

    def _fail(self, exc: Exception) -> Steps[None]:
        message = f"Task run encountered an exception {type(exc).__name__}: {exc}"
        yield self.enter_state(self._new(StateType.FAILED, "Failed", message, data=exc))

    def handle_timeout(self, exc: TimeoutError) -> Steps[None]:
        if (yield from self.handle_retry(exc)):
            return
        if isinstance(exc, TaskRunTimeoutError):
            message = f"Task run exceeded timeout of {exc.timeout_seconds} second(s)"
        else:
            message = f"Task run failed due to timeout: {exc!r}"
        yield self.enter_state(self._new(StateType.FAILED, "TimedOut", message, data=exc))

    def handle_crash(self, exc: BaseException) -> Steps[None]:
        message = _crash_message(exc)
        logger.error("%s: crashed: %s", self.run.id, message)
        yield self.enter_state(self._new(StateType.CRASHED, "Crashed", message, data=exc))

    def handle_retry(self, exc_or_state: BaseException | State) -> Steps[bool]:
        """Schedule the next attempt if retries remain and the condition allows it."""
        if not (yield from self.can_retry(exc_or_state)):
            return False
        retries_done = self.run.run_count - 1
        delay = self._retry_delay(exc_or_state, retries_done)
        logger.info(
            "%s: attempt %d failed (%s); retry %d/%d in %.3gs",
            self.run.id,
            self.run.run_count,
            describe(exc_or_state),
            retries_done + 1,
            self.options.retries,
            delay,
        )
        if delay > 0:
            yield self.enter_state(self._awaiting_retry(exc_or_state, delay))
        else:
            yield from self.enter_running(retrying=True)
        return True

    def _awaiting_retry(self, exc_or_state: BaseException | State, delay: float) -> State:
        """AwaitingRetry ``delay`` seconds from now; its data is why (an exception, or none):
        Celery's retry carries it to ``on_retry``."""
        now = self.env.clock()
        reason = exc_or_state.data if isinstance(exc_or_state, State) else exc_or_state
        return State(
            StateType.SCHEDULED,
            "AwaitingRetry",
            None,
            now,
            scheduled_time=retry_time(now, delay),
            data=reason if isinstance(reason, BaseException) else None,
        )

    def _retry_delay(self, exc_or_state: BaseException | State, retries_done: int) -> float:
        """Seconds before the next attempt: the one ``self.retry()`` asked for, else the
        task's delay for this retry with its jitter."""
        if isinstance(exc_or_state, RetryRequested) and exc_or_state.delay is not None:
            return max(0.0, exc_or_state.delay)
        options = self.options
        delay = delay_for_retry(options.retry_delays, retries_done)
        if options.retry_full_jitter:
            return full_jitter(delay, self.env.rng)
        return jittered(delay, options.retry_jitter_factor, self.env.rng)

    def can_retry(self, exc_or_state: BaseException | State) -> Steps[bool]:
        limit = self.options.retries
        if isinstance(exc_or_state, RetryRequested) and exc_or_state.limit is not None:
            limit = exc_or_state.limit  # self.retry()'s own limit (Celery's max_retries)
        if self.run.run_count > limit:
            return False
        condition = self.options.retry_condition_fn
        if condition is None or isinstance(exc_or_state, RetryRequested):
            return True  # self.retry() is the task's own decision: no condition applies
        if isinstance(exc_or_state, State):
            seen = exc_or_state
        else:
            message = f"Task run encountered unexpected exception: {exc_or_state!r}"
            seen = self._new(StateType.FAILED, "Failed", message, data=exc_or_state)
        try:
            return bool(
                (yield RunHook(condition, (self.task, self.run, seen), "retry_condition_fn"))
            )
        except Exception:
            logger.exception("%s: retry_condition_fn raised; not retrying", self.run.id)
            return False


def _crash_message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "Execution was aborted by an interrupt signal."
    if isinstance(exc, SystemExit):
        return "Execution was aborted by Python system exit call."
    if type(exc).__name__ == "CancelledError":
        return "Execution was cancelled by the runtime environment."
    return f"Execution was interrupted by an unexpected exception: {type(exc).__name__}: {exc}"
