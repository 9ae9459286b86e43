"""The embedded quickstart: engine tasks in an in-process Celery worker, with no Redis.

Run it with ``python -m celery_taskengine demo`` (or ``make demo``). The broker is kombu's
in-memory transport and results go to Celery's in-memory cache backend, so the run records and
cached results live in this process, where the worker thread writes them. With a real broker
and result backend the code is the same; only the app's URLs change.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

from celery_taskengine import exponential_backoff, get_task_run, task
from celery_taskengine._tools.timeline import format_timeline
from celery_taskengine.cache_policies import INPUTS

__all__ = ["app", "exchange_rate", "fetch_invoice", "main", "render_report"]

app = Celery("demo", broker="memory://", backend="cache+memory://")
# One process holds the worker and the caller, so its memory may hold the engine's records.
app.conf.taskengine_store = "memory://"
# The in-memory broker is polled; polling often keeps the demo from waiting on it.
app.conf.broker_transport_options = {"polling_interval": 0.05}

_attempts: list[str] = []


@task(app=app, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=0.1))
def fetch_invoice(invoice_id: str) -> dict[str, Any]:
    """A flaky billing API: fails twice, then answers (retried after 0.1 s, then 0.2 s)."""
    _attempts.append(invoice_id)
    if _attempts.count(invoice_id) < 3:
        raise ConnectionError("billing API hiccup")
    return {"id": invoice_id, "total": 42}


@task(app=app, cache_policy=INPUTS)
def exchange_rate(currency: str) -> float:
    """A slow lookup, cached on its inputs: asked twice, it runs once."""
    time.sleep(0.2)
    return 1.08


@task(app=app, timeout_seconds=0.3)
def render_report(pages: int) -> str:
    """Too slow for its 0.3 s timeout: the engine stops it at the deadline."""
    for _ in range(pages):
        time.sleep(0.05)
    return f"{pages} pages"


def main() -> int:
    """Start a worker thread, send each task with ``.delay()``, print what every run went through.

    Returns the exit status (0); the worker is stopped before returning.
    """
    print("celery-taskengine demo: an in-process worker on an in-memory broker (no Redis)")
    # The timed-out task makes the worker log a traceback; the timeline below tells the story.
    logging.getLogger("celery").setLevel(logging.CRITICAL)
    with start_worker(app, pool="threads", perform_ping_check=False, loglevel="CRITICAL"):
        show("a retry with backoff", fetch_invoice.delay("inv-42"))
        show("a slow lookup", exchange_rate.delay("EUR"))
        show("the same lookup again: a cache hit", exchange_rate.delay("EUR"))
        show("a timeout", render_report.delay(100))
        print("\nstopping the worker ...")
    print("done")
    return 0


def show(title: str, result: AsyncResult) -> None:
    """Wait for ``result`` with ``.get()``, then print its run record as a timeline."""
    try:
        outcome = f"returned {result.get(timeout=30)!r}"
    except Exception as exc:
        outcome = f"raised {type(exc).__name__}"
    print(f"\n{title}")
    run = get_task_run(result.id, app)
    if run is None:
        print(f"  .get() {outcome}; no run record for {result.id}")
        return
    arguments = ", ".join(f"{name}={value!r}" for name, value in run.parameters.items())
    print(f"  {run.name}.delay({arguments}).get() {outcome}")
    print(f"  run {run.id}, {run.run_count} attempt(s), state history:")
    for line in format_timeline(run):
        print(f"  {line}")
