"""Never a silent per-process store: a worker whose engine tasks would keep their records in
each process's memory refuses to start, naming the backend and the setting to use."""

from __future__ import annotations

import pytest

from celery_taskengine.errors import ConfigurationError
from tests.bridge_workers import broker_url
from tests.deployments.workers import deployment_worker, worker_output

pytestmark = pytest.mark.timeout(120)


def test_a_worker_on_rpc_results_without_a_store_setting_refuses_to_start(
    redis_url: str,
) -> None:
    broker = broker_url("amqp", redis_url)

    with deployment_worker(broker, "rpc://", redis_url, wait=False) as (_, _, proc):
        output = worker_output(proc, timeout=60)

    assert proc.returncode != 0
    assert "ConfigurationError" in output
    assert "'rpc://'" in output
    assert "taskengine_store" in output


def test_a_worker_whose_store_is_memory_on_purpose_starts_and_runs_engine_tasks(
    redis_url: str,
) -> None:
    broker = broker_url("amqp", redis_url)

    with deployment_worker(broker, "rpc://", redis_url, store="memory://") as (_, tasks, _):
        assert tasks.cached.delay(2, "c").get(timeout=30) == 20


def test_serializable_in_a_worker_on_the_per_process_store_is_a_configuration_error(
    redis_url: str,
) -> None:
    broker = broker_url("amqp", redis_url)

    with deployment_worker(broker, "rpc://", redis_url, store="memory://") as (_, tasks, _):
        result = tasks.serial.delay(1, "c")

        with pytest.raises(ConfigurationError, match="SERIALIZABLE"):
            result.get(timeout=30)
