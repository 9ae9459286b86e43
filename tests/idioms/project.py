"""A project's Celery app, created after the library's tasks were defined.

``celery -A tests.idioms.project worker`` serves it; the broker, backend and queue come from
``IDIOMS_BROKER_URL``, ``IDIOMS_BACKEND_URL`` and ``IDIOMS_QUEUE``.
"""

from __future__ import annotations

import os

from tests.idioms import library  # noqa: F401  (the library first: no app exists yet)

from celery import Celery  # isort: skip

app = Celery("idioms-project")
app.conf.update(
    broker_url=os.environ["IDIOMS_BROKER_URL"],
    result_backend=os.environ["IDIOMS_BACKEND_URL"],
    task_default_queue=os.environ["IDIOMS_QUEUE"],
    broker_connection_retry_on_startup=True,
)
