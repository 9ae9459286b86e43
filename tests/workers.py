"""Celery's in-thread test worker, with the process-wide state it changes put back after."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from celery import Celery
from celery import _state as celery_state
from celery.contrib.testing.worker import start_worker


@contextlib.contextmanager
def embedded_worker(app: Celery, pool: str = "solo", concurrency: int = 1) -> Iterator[None]:
    """Celery's in-thread test worker, with the process-wide state it changes put back after.

    ``start_worker`` makes ``app`` the current and default app (later ``@task`` calls without
    ``app=`` would bind to it), sets the root logger to ERROR with a handler of its own (later
    tests would miss WARNING records) and exports ``CELERY_LOG_*``.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_current, saved_default = celery_state._tls.current_app, celery_state.default_app
    saved_env = {k: os.environ.get(k) for k in ("CELERY_LOG_LEVEL", "CELERY_LOG_FILE")}
    try:
        with start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            shutdown_timeout=10,
        ):
            yield
    finally:
        root.setLevel(saved_level)
        root.handlers[:] = saved_handlers
        celery_state._tls.current_app = saved_current
        celery_state.default_app = saved_default
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
