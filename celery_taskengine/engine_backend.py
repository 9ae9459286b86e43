"""The result backend as engine tasks see it: Celery's, minus one redundant read.

Before storing a task's outcome, Celery's key-value backends read the task's stored state, so
that a duplicate delivery finishing late cannot overwrite a SUCCESS. For an engine task's first
delivery the engine already rules that out: a message handed out twice is claimed (see
:mod:`~celery_taskengine._store.claims`), and a delivery that finds its run finished never
executes it again. So such a delivery marks its request :data:`FRESH` and its outcome is
written without the read: one Redis round trip less per task, about a third of a worker
process's backend traffic. Every other store (retries, redeliveries, plain tasks) is Celery's.

Engine tasks get the app's backend object itself under a subclass (the two share one
``__dict__``: same client, same connections, same result consumer), so nothing else changes.
``bench/bridge_throughput.py`` measures what the skipped read is worth against an engine task
whose outcome Celery stores as usual.

The alias lives in the backend's own ``__dict__`` and nowhere else: Celery builds a backend per
thread (per greenlet under gevent), and a module-level cache of aliases kept every one of them,
with its connections, alive for ever. Kept on the backend, alias and backend are one cycle that
the garbage collector frees together when the thread is gone.
"""

from __future__ import annotations

from typing import Any

from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import BackendStoreError

__all__ = ["FRESH", "for_engine_tasks"]

#: The request attribute a worker sets on a first delivery whose claim it holds.
FRESH = "taskengine_fresh_delivery"


class _FreshDeliveryStore:
    """Mixed into a key-value backend's class: skips the read before a fresh delivery's store."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not getattr(request, FRESH, False):
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request=request, **kwargs
            )
        backend: Any = self
        meta = backend._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        try:
            backend._set_with_state(backend.get_key_for_task(task_id), backend.encode(meta), state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result


#: Backend class -> its alias class: one per class of backend, never per backend.
_classes: dict[type, type] = {}
#: The backend attribute holding its alias (see the module docstring for why there).
_ALIAS = "_taskengine_alias"


def for_engine_tasks(backend: Any) -> Any:
    """``backend`` as engine tasks use it (itself, when it is not a key-value backend)."""
    state = getattr(backend, "__dict__", None)
    alias = state.get(_ALIAS) if state is not None else None
    if alias is not None and alias.__dict__ is state:  # not a copied backend's stale alias
        return alias
    if state is None or not isinstance(backend, BaseKeyValueStoreBackend):
        return backend
    cls = type(backend)
    alias_cls = _classes.get(cls)
    if alias_cls is None:
        alias_cls = type(cls.__name__, (_FreshDeliveryStore, cls), {"__module__": cls.__module__})
        _classes[cls] = alias_cls
    alias = object.__new__(alias_cls)
    alias.__dict__ = state  # one state: an alias, not a copy
    state[_ALIAS] = alias
    return alias
