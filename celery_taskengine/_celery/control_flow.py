"""Celery's control-flow exceptions raised in an engine task's body, as engine states.

In a worker, ``Reject`` and ``Ignore`` raised by the function are instructions to Celery, not
failures: they are never retried, and the bridge hands them on to Celery unchanged, so the
message is requeued, dead-lettered or dropped exactly as for a plain task. The run record
says what happened:

- ``Reject(requeue=False)``: **Failed**, with the ``Reject`` as its exception (Celery stores
  FAILURE and drops or dead-letters the message). ``on_failure`` hooks run.
- ``Reject(requeue=True)``: **Requeued** (a CRASHED state: the delivery ended without an
  outcome). The message goes back to the broker; its next delivery continues the run as
  Retrying, as after a worker's death.
- ``Ignore``: **Ignored** (CRASHED too), and nothing is stored in Celery's backend, as Celery
  stores nothing. A later message under the same task id (Celery's ``replace`` gives the
  replacement the replaced task's id) continues the run.

Both CRASHED states free the delivery's claim on its message (see
:mod:`~celery_taskengine._store.claims`), so the next delivery need not wait for it to lapse.
"""

from __future__ import annotations

from celery.exceptions import Ignore, Reject

from celery_taskengine.states import State, StateType

__all__ = ["HANDED_BACK", "celery_control_state"]

#: Names of the states in which a delivery hands its message back without an outcome.
HANDED_BACK = frozenset({"Requeued", "Ignored"})


def celery_control_state(exc: Exception) -> State | None:
    """The state that ends an attempt whose function raised ``exc``; ``None`` for an
    ordinary exception (a failure, maybe retried)."""
    if isinstance(exc, Reject):
        if exc.requeue:
            message = "Celery's Reject(requeue=True): the message goes back to the broker"
            return State(StateType.CRASHED, "Requeued", message, data=exc)
        message = f"Task run encountered an exception Reject: {exc}"
        return State(StateType.FAILED, "Failed", message, data=exc)
    if isinstance(exc, Ignore):
        message = "Celery's Ignore: the delivery ends with nothing stored"
        return State(StateType.CRASHED, "Ignored", message, data=exc)
    return None
