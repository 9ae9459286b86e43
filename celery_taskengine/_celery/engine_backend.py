"""The result backend as engine tasks see it: Celery's, with the outcome fenced by the claim.

Before storing a task's outcome, Celery's key-value backends read the task's stored state, so
that a duplicate delivery finishing late cannot overwrite a SUCCESS. An engine task's delivery
holds a claim on its message instead (see :mod:`~celery_taskengine._store.claims`): its outcome
is stored by one script that writes only while the claim is the delivery's (or settled by it),
and publishes it as Celery does. That is both safer (a delivery that lost its claim stores no
SUCCESS, nor a FAILURE, over the holder's) and one Redis round trip less per task. On Celery's
database backend, the outcome commits in one transaction with the run's final record and the
claim's done marker, when the engine's SQL store is on the same database. Every other store
(plain tasks, deliveries without a claim) is Celery's.

Engine tasks get the app's backend object itself under a subclass (the two share one
``__dict__``: same client, same connections, same result consumer), so nothing else changes.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import BackendStoreError

from celery_taskengine._store.claims import Claim, store_result_fenced
from celery_taskengine._store.replicas import ReplicaAcks, replica_acks_setting

__all__ = ["CLAIM", "for_engine_tasks"]

#: The request attribute holding the :class:`Claim` of the delivery Celery is running.
CLAIM = "taskengine_claim"
_MAX = float("inf")


class _FreshDeliveryStore:
    """Mixed into a key-value backend's class: stores a claimed delivery's outcome fenced."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        claim: Claim | None = getattr(request, CLAIM, None)
        backend: Any = self
        if claim is None or not claim.fences_results_of(backend):
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request=request, **kwargs
            )
        meta = backend._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        encoded = backend.encode(meta)
        if isinstance(encoded, str) and len(encoded) > getattr(
            backend, "_MAX_STR_VALUE_SIZE", _MAX
        ):
            message = "value too large for Redis backend"
            raise BackendStoreError(message, state=state, task_id=task_id)
        key = backend.get_key_for_task(task_id)
        expires = _expires_ms(backend, state)
        store_result_fenced(backend, claim, key, encoded, expires, wait=_replica_wait(backend))
        return result


class _OutcomeWithResult:
    """Mixed into Celery's database backend's class: a claimed delivery's result commits in
    one transaction with the run's outcome record, when the store is on the same database
    (see :mod:`~celery_taskengine._store.sql_worker_records`)."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        from celery_taskengine._store.sql_worker_records import store_result_with_outcome

        if not store_result_with_outcome(self, str(task_id), result, state, traceback, request):
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request=request, **kwargs
            )
        return result


def _replica_wait(backend: Any) -> tuple[Any, ...] | None:
    """The ``WAIT`` that follows Celery's result (see replicas); the setting is read once per
    backend, in the backend's own ``__dict__``."""
    acks: ReplicaAcks | None = backend.__dict__.get(_REPLICAS)
    if acks is None:
        acks = ReplicaAcks.of(backend.client, replica_acks_setting(backend.app.conf))
        backend.__dict__[_REPLICAS] = acks
    return acks.wait_command()


def _expires_ms(backend: Any, state: str) -> int | None:
    """How long Celery keeps a result in ``state`` (failures may have their own), in ms."""
    expires = backend.expires
    if state == states.FAILURE:
        expires = getattr(backend, "failure_expires", expires)
    return int(float(expires) * 1000) if expires else None


_classes: dict[type, type] = {}
#: Where a backend keeps the ReplicaAcks of its client (see _replica_wait).
_REPLICAS = "_taskengine_replica_acks"
#: Where a backend keeps its alias: in its own ``__dict__`` (which the alias shares), so the
#: alias lives and dies with its backend (Celery makes one per thread); no module-level map
#: keeps either alive.
_ALIAS = "_taskengine_alias"


def for_engine_tasks(backend: Any) -> Any:
    """``backend`` as engine tasks use it (itself, when it is not a key-value backend)."""
    state = getattr(backend, "__dict__", None)
    alias = state.get(_ALIAS) if state is not None else None
    if alias is not None and alias.__dict__ is state:  # not a copied backend's stale alias
        return alias
    if state is None:
        return backend
    if isinstance(backend, BaseKeyValueStoreBackend):
        mixin: type = _FreshDeliveryStore
    elif _is_database_backend(backend):
        mixin = _OutcomeWithResult
    else:
        return backend
    cls = type(backend)
    alias_cls = _classes.get(cls)
    if alias_cls is None:
        alias_cls = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
        _classes[cls] = alias_cls
    alias = object.__new__(alias_cls)
    alias.__dict__ = state  # one state: an alias, not a copy
    state[_ALIAS] = alias
    return alias


def _is_database_backend(backend: Any) -> bool:
    """Celery's SQLAlchemy backend (looked up only once its module is loaded: SQLAlchemy is
    an optional dependency)."""
    module = sys.modules.get("celery.backends.database")
    return module is not None and isinstance(backend, module.DatabaseBackend)
