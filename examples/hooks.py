"""Hooks post to an audit log: they run in the worker, once per state they are for.

``ship_order`` has ``on_running``, ``on_completion`` and ``on_failure`` hooks that append a
line to a Redis list, the shop's audit log. A retried attempt triggers ``on_running`` again
but ``on_failure`` only fires when no retry is left::

    celery -A examples.hooks worker --pool=solo
    python -m examples.hooks
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from celery_taskengine import Task, TaskRun, task
from celery_taskengine.states import State

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")
AUDIT_LOG = "examples:hooks:audit"

app = Celery("hooks", broker=BROKER_URL, backend=BACKEND_URL)


def audit(line: str) -> None:
    with redis.Redis.from_url(BACKEND_URL) as client:
        client.rpush(AUDIT_LOG, line)


def on_running(task: Task, task_run: TaskRun, state: State) -> None:
    audit(f"{task_run.parameters['order_id']}: {state.name} (attempt {task_run.run_count})")


def on_completion(task: Task, task_run: TaskRun, state: State) -> None:
    audit(f"{task_run.parameters['order_id']}: shipped")


def on_failure(task: Task, task_run: TaskRun, state: State) -> None:
    audit(f"{task_run.parameters['order_id']}: FAILED, {state.message}")


@task(
    app=app,
    retries=1,
    on_running=[on_running],
    on_completion=[on_completion],
    on_failure=[on_failure],
)
def ship_order(order_id: str, address: str) -> str:
    """Book a courier; an order without an address cannot ship, however often we retry."""
    if not address:
        raise ValueError(f"order {order_id} has no address")
    return f"{order_id} -> {address}"


def main() -> None:
    """Ship one good and one bad order, then print the audit log the hooks wrote."""
    with redis.Redis.from_url(BACKEND_URL) as client:
        client.delete(AUDIT_LOG)
    print(ship_order.delay("order-1", "1 Main St").get(timeout=60))
    try:
        ship_order.delay("order-2", "").get(timeout=60)
    except ValueError as exc:
        print(f"order-2 raised ValueError: {exc}")
    with redis.Redis.from_url(BACKEND_URL) as client:
        lines = [line.decode() for line in client.lrange(AUDIT_LOG, 0, -1)]
    print("audit log:")
    for line in lines:
        print(f"  {line}")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.hooks import main as send_work

    send_work()
