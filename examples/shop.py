"""The shop app from the README: an invoice fetcher with retries, a timeout, a cache and a pager.

Start a worker, then send work from another shell::

    celery -A examples.shop worker -l info -E
    python -m examples.shop

The first ``inv-42`` runs; the second is a cache hit (the same inputs), so the billing API is
asked once.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from typing import Any

from celery import Celery

from celery_taskengine import Task, TaskRun, get_task_run, task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.states import State

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("shop", broker=BROKER_URL, backend=BACKEND_URL)
logger = logging.getLogger(__name__)


def page_oncall(task: Task, task_run: TaskRun, state: State) -> None:
    """Runs once when ``fetch_invoice`` has failed for good (after its last retry)."""
    logger.error("PAGE on-call: run %s of %s failed: %s", task_run.id, task.name, state.message)


@task(
    app=app,
    retries=3,
    retry_delay_seconds=[1, 10, 60],
    timeout_seconds=30,
    cache_policy=INPUTS,
    on_failure=[page_oncall],
)
def fetch_invoice(invoice_id: str) -> dict[str, Any]:
    """Ask the (pretend) billing API for an invoice; slow, so worth caching."""
    time.sleep(0.2)
    return {"id": invoice_id, "total": zlib.crc32(invoice_id.encode()) % 1000}


def main() -> None:
    """Send three invoice fetches and print each result with its run's state history."""
    for invoice_id in ("inv-42", "inv-42", "inv-7"):
        result = fetch_invoice.delay(invoice_id)
        invoice = result.get(timeout=60)
        run = get_task_run(result.id, app)
        history = " -> ".join(run.history_names()) if run is not None else "(no run record)"
        print(f"{invoice_id}: {invoice}  [{history}]")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; the worker knows its tasks by the module's
    # real name (``examples.shop.fetch_invoice``), so send them from the module by that name.
    from examples.shop import main as send_work

    send_work()
