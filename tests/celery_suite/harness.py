"""Running Celery's integration suite (from its sdist, see sdist.py) in a pytest subprocess.

Celery's conftest starts its session worker with ``celery.contrib.testing`` (a prefork pool)
on ``TEST_BROKER``/``TEST_BACKEND``; its tasks reach Redis through ``REDIS_HOST``/``REDIS_PORT``.
Here the backend and those keys live on the test session's private redis-server, and a
RabbitMQ broker gets a virtual host of its own for the run (Celery's tests insist on the queue
named ``celery``, which must not be shared with anything else on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.celery_suite import sdist
from tests.conftest import _die_with_parent

__all__ = ["SLICE", "SuiteRun", "rabbitmq_vhost", "run_suite"]

#: The bounded slice CI runs (``CELERY_SUITE=full`` runs both modules whole): the contract
#: for results and control flow, and a sample of canvas.
SLICE = (
    "t/integration/test_tasks.py::test_tasks::test_ignore_result",
    "t/integration/test_tasks.py::test_tasks::test_send_task_without_ignore_result_uses_task_ignore_result",
    "t/integration/test_tasks.py::test_tasks::test_send_task_without_ignore_result_stores_result",
    "t/integration/test_tasks.py::test_tasks::test_reject_without_requeue_stores_failure",
    "t/integration/test_tasks.py::test_tasks::test_reject_with_requeue_redelivers_and_succeeds",
    "t/integration/test_tasks.py::test_tasks::test_wrong_arguments",
    "t/integration/test_tasks.py::test_tasks::test_task_accepted",
    "t/integration/test_tasks.py::test_tasks::test_task_retried_once",
    "t/integration/test_canvas.py::test_chain::test_simple_chain",
    "t/integration/test_canvas.py::test_chain::test_chain_error_handler_with_eta",
    "t/integration/test_canvas.py::test_group::test_parent_ids",
    "t/integration/test_canvas.py::test_chord::test_chord_on_error",
    "t/integration/test_canvas.py::test_chord::test_simple_chord_with_a_delay_in_group_save",
    "t/integration/test_canvas.py::test_link_error::test_link_error_eager",
)  # fmt: skip
#: Seconds one whole inner run may take.
RUN_TIMEOUT = 3600.0
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"


@dataclass(frozen=True)
class SuiteRun:
    """What an inner run reported (see plugin.py)."""

    tasks: str
    broker: str
    engine_tasks: list[str]
    plain_tasks: dict[str, str]
    outcomes: dict[str, str]
    returncode: int

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.outcomes.values() if value == outcome)

    def not_passed(self) -> dict[str, str]:
        """Tests that neither passed nor were skipped (by Celery's conditions or ours)."""
        return {k: v for k, v in self.outcomes.items() if v not in ("passed", "skipped")}

    def summary(self) -> str:
        return (
            f"Celery {sdist.celery_version()} suite, {self.tasks} tasks, {self.broker} broker: "
            f"{self.count('passed')} passed, {len(self.not_passed())} failed, "
            f"{self.count('skipped')} skipped or left out "
            f"({len(self.engine_tasks)} engine tasks, {len(self.plain_tasks)} kept plain)"
        )


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh RabbitMQ virtual host for guest, deleted afterwards; its broker URL."""
    vhost = f"cte-celery-suite-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{RABBITMQ_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def run_suite(
    tasks: str, broker_name: str, broker: str, redis_server: str, *, full: bool, report: Path
) -> SuiteRun:
    """Run Celery's suite (whole or the slice) with ``tasks`` (``engine`` or ``plain``)."""
    work = sdist.prepare()
    where = urlsplit(redis_server)
    env = {
        **os.environ,
        "TEST_BROKER": broker,
        "TEST_BACKEND": f"{redis_server}/0",
        "REDIS_HOST": where.hostname or "127.0.0.1",
        "REDIS_PORT": str(where.port or 6379),
        "CTE_CELERY_SUITE_TASKS": tasks,
        "CTE_CELERY_SUITE_BROKER": broker_name,
        "CTE_CELERY_SUITE_REPORT": str(report),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(work), str(sdist.ROOT)])),
    }
    targets = ["t/integration/test_tasks.py", "t/integration/test_canvas.py"]
    command = [
        sys.executable, "-m", "pytest", "-p", "celery.contrib.pytest",
        "-p", "tests.celery_suite.plugin", "-p", "no:cacheprovider", "-q", "-rfEs",
        "--timeout=300", *(targets if full else SLICE),
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=work, env=env, timeout=RUN_TIMEOUT, check=False, preexec_fn=_die_with_parent
    )
    document = json.loads(report.read_text())
    return SuiteRun(
        tasks=document["tasks"],
        broker=document["broker"],
        engine_tasks=document["engine_tasks"],
        plain_tasks=document["plain_tasks"],
        outcomes=document["outcomes"],
        returncode=completed.returncode,
    )
