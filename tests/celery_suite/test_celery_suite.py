"""Celery's own integration tests (tasks, canvas) pass with engine tasks as with plain tasks.

By default a bounded slice runs with engine tasks, on Redis as broker and backend and on
RabbitMQ + Redis. ``CELERY_SUITE=full`` (``make celery-suite``) runs both modules whole, with
engine tasks and with plain tasks (the baseline), and prints the counts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.bridge_workers import broker_url
from tests.celery_suite.harness import rabbitmq_vhost, run_suite

FULL = os.environ.get("CELERY_SUITE", "").lower() == "full"
#: Which tasks and brokers run (comma-separated), to run a part of the full suite.
MODES = os.environ.get("CELERY_SUITE_TASKS", "engine,plain" if FULL else "engine").split(",")
BROKERS = os.environ.get("CELERY_SUITE_BROKERS", "redis,amqp").split(",")

pytestmark = pytest.mark.timeout(7200 if FULL else 900)


@contextlib.contextmanager
def _broker(kind: str, redis_server: str) -> Iterator[str]:
    if kind == "redis":
        yield f"{redis_server}/0"
        return
    broker_url("amqp", redis_server)  # skips (fails in CI) without RabbitMQ
    with rabbitmq_vhost() as url:
        yield url


@pytest.mark.parametrize("tasks", MODES)
@pytest.mark.parametrize("broker", BROKERS)
def test_celerys_integration_suite_passes(
    tasks: str, broker: str, redis_server: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(f"{redis_server}/0")
    client.flushdb()  # Celery's tasks keep their side keys in database 0
    client.close()
    with _broker(broker, redis_server) as url:
        run = run_suite(
            tasks, broker, url, redis_server, full=FULL, report=tmp_path / "report.json"
        )
    print(run.summary())
    if tasks == "engine":
        # The substitution happened: the tasks the contract is about are engine tasks.
        for name in ("add", "add_ignore_result", "add_not_typed", "fail", "reject_without_requeue"):
            assert f"t.integration.tasks.{name}" in run.engine_tasks, run.plain_tasks
    assert run.outcomes, "no test ran"
    assert run.not_passed() == {}, run.summary()
