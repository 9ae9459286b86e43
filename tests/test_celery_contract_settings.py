"""Celery's contract under an app-wide setting, with no other worker in this process.

Kept apart from tests/test_celery_contract.py: Celery's in-thread test workers share
process-wide worker state (``celery.worker.state``, the event loop), so a second one started
while that module's worker fixture lives is not what a deployment runs, and was seen to miss
its messages or to hang on shutdown.
"""

from __future__ import annotations

import pytest

from tests.contract_app import contract_worker, history, key, side, watch_for_meta

pytestmark = pytest.mark.timeout(120)


def test_the_apps_task_ignore_result_setting_stores_no_task_meta(redis_server: str) -> None:
    backend = f"{redis_server}/0"
    with contract_worker(backend, backend, task_ignore_result=True) as running:
        counter, gate = key("counter"), key("gate")
        side(running.app).set(gate, 1)
        result = running.tasks.gated.delay(counter, gate, 0)

        assert watch_for_meta(running.app, result.id) == []
        assert history(running.app, result.id) == ["Pending", "Running", "Completed"]
