"""A result too large for Celery's database backend fails as it does for a plain Celery task.

Celery's ``celery_taskmeta.result`` is a BLOB on MySQL/MariaDB (64 KiB): a plain task's larger
result is refused ("Data too long"), logged, and stored as a FAILURE with
``BackendStoreError``. The engine's fenced outcome transaction once wrote Celery's row with
``INSERT IGNORE``, which turned that refusal into a warning and stored the result cut short:
``.get()`` then raised a ``DecodeError`` and nothing was logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.exceptions import BackendStoreError

from tests.deployments.workers import _output, deployment_worker
from tests.test_store_contract import MARIADB_URL, _sql_store

pytestmark = [pytest.mark.timeout(180)]


def test_a_result_too_large_for_mariadb_fails_as_a_plain_tasks_does(
    redis_url: str, tmp_path: Path
) -> None:
    _sql_store(MARIADB_URL, "probe").close()  # reachable (fails in CI if not), tables made
    backend = f"db+{MARIADB_URL}"
    with deployment_worker(redis_url, backend, redis_url, pool="threads") as (_, tasks, proc):
        small = tasks.big.delay(1000).get(timeout=60)
        for fn in (tasks.plain_big, tasks.big):
            with pytest.raises(BackendStoreError):  # not a DecodeError of a cut value
                fn.delay(100_000).get(timeout=60)
        output = _output(proc)
    assert small == "x" * 1000
    assert output.count("Data too long") >= 2  # said for both, not passed over
