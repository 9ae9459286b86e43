"""Recording a worker run's states on a shared store reached only through its operations (SQL).

The Redis store has a channel of its own for worker records (see ``worker_records``); any other
shared store is written with its plain operations, each answered, so a refused write raises
in the delivery instead of passing unseen:

- Running is saved when an attempt starts, so a redelivery after a crash continues the run;
- AwaitingRetry is saved before the retry's message is sent, so the retry finds it;
- the final state is saved when the engine returns (``on_end``), after the
  run's transaction committed, and before Celery stores the task's result.

A delivery holding a claim on its message (see claims) writes every record fenced by it, in
one transaction with the claim: the first one takes it, AwaitingRetry and the final state
settle it; once a write is refused, the attempt writes nothing more.

The backend's task state shows the engine's states that Celery has no name for, written with
Celery's own ``store_result``, so any result backend shows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.task_meta_observer import TaskMetaShown
from celery_taskengine.observers import RunObserver, StateWrites

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine.states import State
    from celery_taskengine.task_run import TaskRun

__all__ = ["PlainRunRecords", "plain_delivery_observers"]


class PlainRunRecords(RunObserver):
    """The run record of a worker run on a shared store without a Redis channel."""

    def __init__(self, store: ResultStore, delivery: Any) -> None:
        self.store = store
        self.delivery = delivery
        self._final: TaskRun | None = None

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if state.name == "Pending" and len(run.state_history) == 1:
            return  # the first Running says as much
        if state.is_final() and not state.is_crashed():
            self._final = run  # written by on_end, once the transaction is over
        elif not self._save(run, settle=state.is_scheduled()):
            batch.drop()  # the claim is lost: nothing more of this attempt is shown

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
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


def plain_delivery_observers(app: Celery, store: ResultStore, delivery: Any) -> list[RunObserver]:
    """How a worker delivery's run is recorded on such a store: the record, then the meta."""
    return [PlainRunRecords(store, delivery), TaskMetaShown(app, delivery)]
