"""Engine tasks a reusable library defines without an app (Celery's ``@shared_task`` pattern).

Imported before any Celery app exists (see project.py): every app registers these tasks when
it is finalized, and each name resolves to the current app's task when used.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

import celery_taskengine
from celery_taskengine import Task, task


@task(name="idioms.library.add")
def add(x: int, y: int) -> int:
    return x + y


@celery_taskengine.shared_task(name="idioms.library.whoami", bind=True)
def whoami(self: Any) -> str:
    return str(self.request.id)


@shared_task(base=Task, name="idioms.library.mul")
def mul(x: int, y: int) -> int:
    return x * y
