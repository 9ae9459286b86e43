"""Which store an app's engine tasks use: picked once per app and process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_taskengine._store import memory
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.redis_store import RedisStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["store_for_app"]


def store_for_app(app: Celery | None) -> ResultStore:
    """The store for tasks of ``app``: its Redis result backend, else the process's memory.

    The choice is cached on the app, so it is made once per app and process.
    """
    if app is None:
        return memory.default_memory_store()
    cached: ResultStore | None = getattr(app, "_taskengine_store", None)
    if cached is not None:
        return cached
    backend_url = app.conf.result_backend
    store: ResultStore
    if isinstance(backend_url, str) and backend_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        store = RedisStore.for_app(app)
    else:
        store = memory.default_memory_store()
    app._taskengine_store = store
    return store
