"""A worker refuses, at its start, to serve engine tasks it cannot serve correctly.

Engine tasks keep cached results, locks, run records and delivery claims in the app's store.
A store only one process sees (the memory store) would make each worker process cache on its
own, lock nothing across processes and lose run records between a retry's deliveries, all
without an error. So a worker whose engine tasks would get such a store stops at
``worker_init`` with a :class:`~celery_taskengine.errors.ConfigurationError` that names the
result backend and the setting to use, unless ``taskengine_store = "memory://"`` chose it;
and one whose Redis user may not touch the engine's keys stops there too, naming them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init
from kombu.utils.url import maybe_sanitize_url

from celery_taskengine._store.selection import store_for_app
from celery_taskengine._store.settings import configured_store_url
from celery_taskengine.errors import ConfigurationError, StoreUnavailableError

__all__ = ["check_worker_store"]

logger = logging.getLogger(__name__)


def check_worker_store(app: Celery) -> None:
    """Raise :class:`ConfigurationError` if ``app``'s engine tasks would get a store that
    only one process sees, and nobody chose that with ``taskengine_store = "memory://"``."""
    if not any(getattr(t, "engine_options", None) is not None for t in app.tasks.values()):
        return
    store = store_for_app(app)
    setting = configured_store_url(app)
    if store.shared:
        check = getattr(store, "check_access", None)
        if check is not None:
            check()  # StorePermissionError (a ConfigurationError) names what is missing
        return
    if setting is not None and setting.startswith("memory://"):
        return
    backend = app.conf.result_backend
    shown = backend
    if isinstance(backend, str) and "@" in backend:  # may hold a password
        shown = maybe_sanitize_url(backend)
    raise ConfigurationError(
        f"engine tasks need a store every worker process shares, and the result backend "
        f"{shown!r} cannot be one: set taskengine_store (CELERY_TASKENGINE_STORE with Django) "
        f"to a Redis URL such as 'redis://localhost:6379/0' or a database URL such as "
        f"'postgresql://host/db', or to 'memory://' to keep records in each process on purpose"
    )


def _refuse_bad_store(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        check_worker_store(app)
    except StoreUnavailableError:
        return  # down at start: deliveries wait it out, or go back to the broker
    except ConfigurationError as exc:
        logger.critical("celery-taskengine: %s", exc)
        # Celery logs and ignores an Exception raised by a signal handler; SystemExit stops
        # the worker before it takes a message.
        raise SystemExit(f"ConfigurationError: {exc}") from exc


worker_init.connect(
    _refuse_bad_store,
    weak=False,
    dispatch_uid="celery_taskengine._celery.worker_checks.worker_init",
)
