"""Which store an app's engine tasks use: picked once per app and process."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.app.backends import by_url
from celery.backends.redis import RedisBackend

from celery_taskengine._store import memory
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.redis_store import RedisStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["store_for_app"]

logger = logging.getLogger(__name__)


def store_for_app(app: Celery | None) -> ResultStore:
    """The store for tasks of ``app``: its Redis result backend, else the process's memory.

    The backend class Celery would build decides, not the URL's spelling, so ``sentinel://``,
    ``redis+socket://``, ``rediss://`` and a bare ``"redis"`` with ``redis_*`` settings all give
    the Redis store. The choice is cached on the app, so it is made once per app and process.
    """
    if app is None:
        return memory.default_memory_store()
    cached: ResultStore | None = getattr(app, "_taskengine_store", None)
    if cached is not None:
        return cached
    store: ResultStore
    if _has_redis_backend(app):
        store = RedisStore.for_app(app)
    else:
        store = memory.default_memory_store()
    app._taskengine_store = store
    return store


def _has_redis_backend(app: Celery) -> bool:
    """Whether Celery builds a Redis backend (of any flavour) for ``app``'s results.

    Asks for the backend's class only: building other backends may need packages that are
    not installed (SQLAlchemy, Django), which is no concern of the engine's.
    """
    spec: Any = app.backend_cls or app.conf.result_backend
    if spec is None:
        return False
    try:
        backend_class, _ = by_url(spec, app.loader)
    except (ImportError, ValueError) as exc:
        logger.debug("result backend %r is not a Redis backend: %s", spec, exc)
        return False
    return isinstance(backend_class, type) and issubclass(backend_class, RedisBackend)
