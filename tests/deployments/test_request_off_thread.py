"""``self.request``, task lineage and backend states in every thread a worker run uses.

Celery keeps the current task and its request in thread-locals. An engine attempt may run in
another thread: a helper thread that bounds it in time (``timeout_seconds`` outside a main
thread: the threads and gevent pools) or the worker's event loop (``async def`` tasks, in every
pool). There ``self.request`` must still be the delivery's, a task sent from the run must
still name it as parent, and an ``rpc://`` backend must still be able to route the run's
states (it once logged "could not show RUNNING" with a traceback per task).
"""

from __future__ import annotations

import pytest
from celery.result import AsyncResult

from tests.bridge_workers import broker_url
from tests.deployments.workers import _output, deployment_worker

pytestmark = [pytest.mark.timeout(180)]


@pytest.mark.parametrize("pool", ["threads", "gevent", "prefork"])
def test_self_request_and_lineage_are_the_deliverys_in_every_thread(
    redis_url: str, pool: str
) -> None:
    with deployment_worker(redis_url, redis_url, redis_url, pool=pool) as (app, tasks, proc):
        for fn in (tasks.whoami, tasks.awhoami):
            result = fn.delay(True)
            seen = result.get(timeout=60)
            child_id = seen.pop("child")
            assert seen["id"] == result.id, fn.name
            assert seen["called_directly"] is False, fn.name
            assert seen["routing_key"] == app.conf.task_default_queue, fn.name
            assert seen["hostname"].startswith(f"{app.conf.task_default_queue}@"), fn.name
            assert seen["root_id"] == result.id, fn.name
            child = AsyncResult(child_id, app=app).get(timeout=60)
            assert child["parent_id"] == result.id, fn.name
            assert child["root_id"] == result.id, fn.name
        assert "Traceback" not in _output(proc)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_an_rpc_backend_shows_the_states_of_runs_in_other_threads(
    redis_url: str, pool: str
) -> None:
    broker = broker_url("amqp", redis_url)
    with deployment_worker(broker, "rpc://", redis_url, store=redis_url, pool=pool) as (
        _app,
        tasks,
        proc,
    ):
        for fn in (tasks.whoami, tasks.awhoami):
            assert fn.delay(None).get(timeout=60)["called_directly"] is False
        output = _output(proc)
    assert "could not show" not in output
    assert "Traceback" not in output
