"""Recording a worker run's states on a shared store reached only through its operations (SQL).

The Redis store has a channel of its own for worker records (see ``worker_records``); any other
shared store is written with its plain operations, each answered, so a refused write raises
in the delivery instead of passing unseen:

- Running is saved when an attempt starts, so a redelivery after a crash continues the run;
- AwaitingRetry is saved before the retry's message is sent, so the retry finds it;
- the final state is saved when the engine returns (:meth:`StoreRecorder.flush`), after the
  run's transaction committed, and before Celery stores the task's result.

A delivery holding a claim on its message (see claims) writes every record fenced by it, in
one transaction with the claim: the first one takes it, AwaitingRetry and the final state
settle it; once a write is refused, the attempt writes nothing more.

The backend's task state shows the engine's states that Celery has no name for, written with
Celery's own ``store_result``, so any result backend shows them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.task_meta import celery_status, state_info
from celery_taskengine.states import State

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._engine.task_run import TaskRun

__all__ = ["StoreRecorder"]

logger = logging.getLogger(__name__)


class StoreRecorder:
    """The ``record`` callback of a worker run on a shared store without a Redis channel."""

    def __init__(
        self,
        app: Celery,
        store: ResultStore,
        delivery: Any,
    ) -> None:
        self.app = app
        self.store = store
        self.delivery = delivery
        #: Whether Celery keeps this task's results (``ignore_result`` tasks show nothing).
        self._shows_meta = not delivery.ignores_result
        self._final: TaskRun | None = None

    def __call__(self, run: TaskRun, state: State) -> None:
        if state.name == "Pending" and len(run.state_history) == 1:
            return  # the first Running says as much
        if state.is_final() and not state.is_crashed():
            self._final = run  # written by flush(), once the transaction is over
        elif not self._save(run, settle=state.is_scheduled()):
            return
        status = celery_status(state)
        if status is not None and self._shows_meta:
            self._show_in_backend(run, state, status)

    def flush(self) -> None:
        """Save the final state, once the engine has returned."""
        final, self._final = self._final, None
        if final is not None:
            self._save(final, settle=True)

    def _save(self, run: TaskRun, *, settle: bool) -> bool:
        """Save ``run``; fenced by the delivery's claim if it has one (``False``: lost)."""
        claim = self.delivery.claim
        if claim is None:
            self.store.save_run(run)
            return True
        fenced: Any = self.store  # a store with claims (see sql_claims)
        return bool(fenced.save_run_fenced(run, claim, settle=settle))

    def _show_in_backend(self, run: TaskRun, state: State, status: str) -> None:
        try:
            self.app.backend.store_result(self.delivery.task_id, state_info(run, state), status)
        except Exception:  # the run goes on: the backend's view is a courtesy
            logger.warning(
                "%s: could not show %s in the result backend",
                self.delivery.task_id,
                status,
                exc_info=True,
            )
