"""Celery's in-thread test worker, with the process-wide state it changes put back after."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery import _state as celery_state
from celery.contrib.testing.worker import TestWorkController, start_worker
from celery.worker import state as worker_state

#: How long a worker may take to serve, and to stop, under a loaded CI machine (seconds).
START_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0


class _BoundedStartWorkController(TestWorkController):
    """Celery's test worker, but a start that never comes is an error, not a hang: Celery's
    ``ensure_started`` waits without a bound, so a worker thread that died at start (or that
    stopped at once) would hold the test until its timeout, with nothing said about why."""

    def ensure_started(self) -> None:
        if not self._on_started.wait(START_TIMEOUT):
            raise RuntimeError(
                f"the in-thread worker did not start within {START_TIMEOUT:.0f} s "
                f"(should_terminate={worker_state.should_terminate!r}, "
                f"should_stop={worker_state.should_stop!r})"
            )


@contextlib.contextmanager
def embedded_worker(app: Celery, pool: str = "solo", concurrency: int = 1) -> Iterator[None]:
    """Celery's in-thread test worker, with the process-wide state it changes put back after.

    ``start_worker`` makes ``app`` the current and default app (later ``@task`` calls without
    ``app=`` would bind to it), sets the root logger to ERROR with a handler of its own (later
    tests would miss WARNING records) and exports ``CELERY_LOG_*``. When its thread does not
    stop in time it raises with ``celery.worker.state.should_terminate`` still set, which stops
    every later worker in the process at once: that flag is put back too.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_current, saved_default = celery_state._tls.current_app, celery_state.default_app
    saved_env = {k: os.environ.get(k) for k in ("CELERY_LOG_LEVEL", "CELERY_LOG_FILE")}
    controller: Any = _BoundedStartWorkController
    try:
        with start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            WorkController=controller,
        ):
            yield
    finally:
        worker_state.should_terminate = None
        worker_state.should_stop = None
        root.setLevel(saved_level)
        root.handlers[:] = saved_handlers
        celery_state._tls.current_app = saved_current
        celery_state.default_app = saved_default
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
