"""Recording a worker run's states on a SQL store, for about the commits a plain task costs.

A plain Celery task costs its worker one committed transaction: its result. What a database
worker waits for is commits, so an engine delivery waits for no more than that where it can:

- an attempt's Running record, with the claim it takes and the backend's ``RUNNING`` (one
  transaction when Celery's results are in the same database), is written a moment later by
  the process's writer thread (see deferred_writes), not waited for; an attempt shorter than
  that moment never writes it (its outcome's record says all). Not so for an ``acks_late``
  task: a redelivery after a crash must find the record, so it is written before the body
  runs (a message acknowledged early is never delivered again);
- the outcome's record, the claim's done marker and, when Celery's database backend keeps its
  results in the same database, Celery's result commit in one transaction when Celery stores
  the result (see sql_celery_results and ``engine_backend``), fenced by the claim: a delivery
  that lost its claim writes none of them. Otherwise (another backend, ``acks_late``, an
  ignored result) the outcome is written when the engine returns, before Celery stores it;
- AwaitingRetry and a crash are written at once, waited for (a retry's delivery reads them).

A delivery's writes commit in the order they were made: each one settles the deferred one
before it (dropped if not started, else waited for). Every record write is fenced by the
delivery's claim on its message (see sql_claims): the first one takes it, AwaitingRetry and
the outcome settle it, and once a write is refused the attempt writes nothing more. The
backend's task state shows the engine's states Celery has no name for (``RUNNING``; and
``AWAITING_RETRY`` once Celery stored its RETRY, see worker_retries), through Celery's
``store_result`` where it is another database. A refused write drops the state's batch: the
delivery's other observers show nothing more of the attempt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import states as celery_states

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine._store.deferred_writes import DeferredWrite, deferred_writes
from celery_taskengine._store.task_meta import celery_status, state_info

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Connection

    from celery_taskengine._engine.task_run import TaskRun
    from celery_taskengine._store.sql_store import SqlStore
    from celery_taskengine.states import State

__all__ = [
    "SqlRunRecords",
    "sql_delivery_observers",
    "store_result_with_outcome",
    "write_left_outcome",
]

logger = logging.getLogger(__name__)


class SqlRunRecords(RunObserver):
    """The run record of a worker run on a SQL store, with the backend's view of its states
    (see the module docstring)."""

    def __init__(self, app: Celery, store: SqlStore, delivery: Any) -> None:
        from celery_taskengine._store.sql_celery_results import shares_database

        self.app = app
        self.store = store
        self.delivery = delivery
        self._shows_meta = not delivery.ignores_result
        #: Celery's task rows commit with the run's records (the same database).
        self._with_rows = shares_database(store, app.backend)
        self._final: TaskRun | None = None
        self._deferred: DeferredWrite | None = None

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if state.name == "Pending" and len(run.state_history) == 1:
            return  # the first Running says as much
        claim = self.delivery.claim
        if claim is not None and claim.lost:
            batch.drop()  # another delivery has the run: nothing of this attempt is written
            return
        if state.is_final() and not state.is_crashed():
            self._final = run  # written by on_end, once the transaction is over
            return
        if state.is_scheduled() or state.is_crashed():
            self._settle()
            if not self._save(run, settle=state.is_scheduled()):
                batch.drop()
            elif state.is_crashed() and self._shows_meta:
                # AWAITING_RETRY is shown once Celery stored its RETRY (see worker_retries).
                status = celery_status(state)
                if status is not None:
                    self._show_through_celery(status, state_info(run, state))
            return
        self._settle()  # a later state of the attempt supersedes a start not written yet
        self._write_or_defer(run, state)

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
        """The outcome, once the engine has returned: handed to Celery's result (one
        transaction, see the module docstring) where it can be, else written now."""
        self._settle()
        final, self._final = self._final, None
        if final is None:
            return
        delivery = self.delivery
        if delivery.claim is not None and delivery.result_follows and self._with_rows:
            _outcomes[delivery.task_id] = _Outcome(self.store, final, delivery.claim)
        else:
            self._save(final, settle=True)

    def _write_or_defer(self, run: TaskRun, state: State) -> None:
        """An attempt's state (Running): written now for ``acks_late`` (a redelivery after a
        crash must find it), else by the writer thread a moment later."""
        status = celery_status(state) if self._shows_meta else None
        values = self.store._run_values(run)  # the record as it is now, not when written
        info = state_info(run, state) if status is not None else None
        if self.delivery.acks_late:
            self._write_state(run, values, status, info)
            return
        self._deferred = deferred_writes().submit(
            self.delivery.task_id, lambda: self._write_state(run, values, status, info)
        )

    def _settle(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred_writes().settle(deferred)

    def _save(self, run: TaskRun, *, settle: bool) -> bool:
        """Save ``run`` now; fenced by the delivery's claim if it has one (``False``: lost)."""
        claim = self.delivery.claim
        if claim is None:
            self.store.save_run(run)
            return True
        return self.store.save_run_fenced(run, claim, settle=settle)

    def _write_state(
        self, run: TaskRun, values: dict[str, Any], status: str | None, info: Any
    ) -> None:
        """The write of an attempt's state, with the backend's view of it (deferred: in the
        writer thread)."""
        also = None
        if status is not None and self._with_rows:
            backend = self.app.backend
            row = _row(backend, self.delivery.task_id, info, status)
            also = _writing_row(backend, row)
        claim = self.delivery.claim
        if claim is None:
            self.store.save_run(run)
        elif not self.store.save_run_fenced(run, claim, settle=False, values=values, also=also):
            return
        if status is not None and also is None:
            self._show_through_celery(status, info)

    def _show_through_celery(self, status: str, info: Any) -> None:
        """The engine state in the backend, written by Celery (a courtesy: never raises)."""
        try:
            request = self.delivery.request  # rpc:// routes by it (this may be another thread)
            self.app.backend.store_result(self.delivery.task_id, info, status, request=request)
        except Exception:
            logger.warning(
                "%s: could not show %s in the result backend",
                self.delivery.task_id,
                status,
                exc_info=True,
            )


def sql_delivery_observers(app: Celery, store: SqlStore, delivery: Any) -> list[RunObserver]:
    """How a worker delivery's run is recorded on a SQL store: one observer, which shows the
    backend's task state too (it commits with the record where it can)."""
    return [SqlRunRecords(app, store, delivery)]


class _Outcome:
    """A delivery's final record waiting for Celery's result, to commit with it."""

    __slots__ = ("claim", "run", "store")

    def __init__(self, store: SqlStore, run: TaskRun, claim: Any) -> None:
        self.store = store
        self.run = run
        self.claim = claim

    def write(self, also: Any = None) -> bool:
        return self.store.save_run_fenced(self.run, self.claim, settle=True, also=also)


#: Outcomes waiting for Celery's result, by task id (see SqlRunRecords.on_end).
_outcomes: dict[str, _Outcome] = {}


def store_result_with_outcome(
    backend: Any,
    task_id: str,
    result: Any,
    status: str,
    traceback: Any = None,
    request: Any = None,
) -> bool:
    """Store Celery's result for ``task_id`` in one transaction with the delivery's waiting
    outcome, fenced by its claim; ``False`` when no outcome waits (Celery stores it itself).

    A refused claim stores neither (logged by the claim: the holder stores its own).
    """
    from celery_taskengine._store.sql_celery_results import shares_database

    outcome = _outcomes.get(task_id)
    if outcome is None:
        return False
    if status not in celery_states.READY_STATES or not shares_database(outcome.store, backend):
        write_left_outcome(task_id)  # first, so that Celery's write follows the record's
        return False
    row = _row(backend, task_id, result, status, traceback, request)
    outcome.write(_writing_row(backend, row))  # raises: kept for Celery's next try
    _outcomes.pop(task_id, None)
    return True


def write_left_outcome(task_id: str) -> None:
    """Write the outcome of ``task_id`` alone if Celery did not store a result to commit it
    with (after the delivery: ``task_postrun``). Errors are logged with the run id."""
    outcome = _outcomes.pop(task_id, None)
    if outcome is None:
        return
    try:
        outcome.write()
    except Exception as exc:
        logger.error("%s: the run's outcome was not written: %r", task_id, exc)


def _row(
    backend: Any, task_id: str, result: Any, status: str, traceback: Any = None, request: Any = None
) -> dict[str, Any]:
    from celery_taskengine._store.sql_celery_results import task_row

    return task_row(backend, task_id, result, status, traceback, request)


def _writing_row(backend: Any, row: dict[str, Any]) -> Any:
    from celery_taskengine._store.sql_celery_results import write_task_row

    def write(conn: Connection) -> None:
        write_task_row(conn, backend, row)

    return write
