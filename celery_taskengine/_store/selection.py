"""Which store an app's engine tasks use: picked once per app and process."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.app.backends import by_url
from celery.backends.redis import RedisBackend
from kombu.utils.url import maybe_sanitize_url

from celery_taskengine._store import memory
from celery_taskengine._store.cache_codec import accept_for_app
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.settings import (
    DEFAULT_NAMESPACE,
    configured_store_url,
    run_expiry_seconds,
)
from celery_taskengine.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["store_for_app"]

logger = logging.getLogger(__name__)

#: URL schemes (before any ``+driver``) that name a SQL database for the SQL store.
_SQL_SCHEMES = frozenset({"postgresql", "postgres", "mysql", "mariadb", "sqlite"})


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
    setting = configured_store_url(app)
    if setting is not None:
        store = _store_from_url(app, setting)
    elif _redis_backend(app.backend_cls or app.conf.result_backend, app) is not None:
        store = RedisStore.for_app(app)
    elif (database_url := _database_backend_url(app)) is not None:
        store = _sql_store(app, database_url)
    else:
        store = memory.default_memory_store()
    app._taskengine_store = store
    return store


def _store_from_url(app: Celery, url: str) -> ResultStore:
    """The store ``taskengine_store`` names: ``memory://`` or any Redis URL Celery accepts."""
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        return memory.default_memory_store()
    if scheme.split("+", 1)[0] in _SQL_SCHEMES:
        return _sql_store(app, url)
    found = _redis_backend(url, app)
    if found is None:
        raise ConfigurationError(
            f"taskengine_store = {maybe_sanitize_url(url)!r} is not a store URL this version "
            f"knows: use redis://, rediss://, redis+socket://, sentinel://, a SQLAlchemy "
            f"database URL (postgresql://, mysql+pymysql://, sqlite:///...) or memory://"
        )
    # Celery parses the URL (socket paths, TLS and Sentinel options) as for a result backend:
    # the URL it hands the backend, as ``redis+socket://`` becomes ``socket://``.
    backend_class, backend_url = found
    return RedisStore.for_app(app, backend_class(app=app, url=backend_url))


def _redis_backend(spec: Any, app: Celery) -> tuple[type, str | None] | None:
    """The Redis backend class (of any flavour) Celery builds for ``spec``, if it does, and
    the URL Celery gives it.

    Asks for the backend's class only: building other backends may need packages that are
    not installed (SQLAlchemy, Django), which is no concern of the engine's.
    """
    if spec is None:
        return None
    try:
        backend_class, url = by_url(spec, app.loader)
    except (ImportError, ValueError) as exc:
        logger.debug("result backend %r is not a Redis backend: %s", spec, exc)
        return None
    if isinstance(backend_class, type) and issubclass(backend_class, RedisBackend):
        return backend_class, url
    return None


def _database_backend_url(app: Celery) -> str | None:
    """The SQLAlchemy URL of ``app``'s ``db+...`` result backend, if it has one."""
    spec: Any = app.backend_cls or app.conf.result_backend
    if not isinstance(spec, str) or not spec.startswith("db+"):
        return None
    url: str | None = app.conf.get("database_url") or spec[len("db+") :]
    return url


def _sql_store(app: Celery, url: str) -> ResultStore:
    """The SQL store on ``url``, with the app's ``database_engine_options`` (as Celery's own
    database backend uses them)."""
    try:
        from celery_taskengine._store.sql_store import SqlStore
    except ImportError as exc:
        raise ConfigurationError(
            f"the store at {maybe_sanitize_url(url)!r} needs SQLAlchemy: "
            f"pip install 'celery-taskengine[sql]' ({exc})"
        ) from exc
    return SqlStore.from_url(
        url,
        engine_options=app.conf.get("database_engine_options"),
        namespace=app.conf.get("taskengine_namespace") or DEFAULT_NAMESPACE,
        accept=accept_for_app(app),
        run_expires=run_expiry_seconds(app.conf.get("result_expires")),
    )
