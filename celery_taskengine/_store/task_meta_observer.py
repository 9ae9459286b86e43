"""Celery's task meta of a worker run: the engine states Celery has no name for, shown in the
result backend while the run is in them (see :mod:`~celery_taskengine._store.task_meta`).

When Celery keeps its meta on the store's own Redis, the meta rides in the state's batch with
the run record (no round trip of its own); on any other backend it goes through Celery's
``store_result``. AwaitingRetry is shown once Celery stored its RETRY (see worker_retries),
and ``ignore_result`` tasks show nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine._store.settings import configured_store_url
from celery_taskengine._store.task_meta import (
    SET_META_LUA,
    celery_status,
    encode_meta,
    keeps_meta_on_redis,
    px,
    state_info,
)

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._engine.task_run import TaskRun
    from celery_taskengine.states import State

__all__ = ["TaskMetaShown"]

logger = logging.getLogger(__name__)


class TaskMetaShown(RunObserver):
    """Shows a worker run's engine states in Celery's result backend."""

    def __init__(self, app: Celery, delivery: Any) -> None:
        self.app = app
        self.task_id: str = delivery.task_id
        self._shows = not delivery.ignores_result
        self._request = delivery.request
        #: The meta rides with the records when Celery keeps it on the store's own Redis.
        self._rides_along = keeps_meta_on_redis(app.backend) and configured_store_url(app) is None
        #: No backend meta can exist before a message's first delivery starts.
        self._is_new = not delivery.may_continue

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if not self._shows or batch.dropped or state.is_scheduled():
            return
        status = celery_status(state)
        if status is None:
            return
        if self._rides_along:
            batch.add(self._meta_command(run, state, status))
        else:
            self._store_through_celery(run, state, status)

    def _store_through_celery(self, run: TaskRun, state: State, status: str) -> None:
        """The engine state in a backend the records do not ride to (rpc://, a database)."""
        try:
            info = state_info(run, state)
            self.app.backend.store_result(self.task_id, info, status, request=self._request)
        except Exception:  # the run goes on: the backend's view is a courtesy
            logger.warning(
                "%s: could not show %s in the backend", self.task_id, status, exc_info=True
            )

    def _meta_command(self, run: TaskRun, state: State, status: str) -> tuple[Any, ...]:
        backend = self.app.backend
        encoded = encode_meta(backend, self.task_id, status, state_info(run, state))
        key = backend.get_key_for_task(self.task_id)
        ttl = px(backend.expires)
        if self._is_new:  # nothing to protect: a plain SET NX is enough (and cheaper)
            self._is_new = False
            if ttl == "0":
                return ("SET", key, encoded, "NX")
            return ("SET", key, encoded, "PX", ttl, "NX")
        return ("EVAL", SET_META_LUA, 1, key, encoded, ttl, "")
