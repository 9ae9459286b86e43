"""Caching across workers: SERIALIZABLE isolation runs a function once for one key, cluster-wide.

Four identical ``build_report`` calls race on two workers. The transaction key (the inputs)
is locked on Redis: one run executes, the others wait for its commit and come back ``Cached``
with the same value::

    celery -A examples.caching worker -n one@%h --pool=threads -c 2
    celery -A examples.caching worker -n two@%h --pool=threads -c 2
    python -m examples.caching
"""

from __future__ import annotations

import os
import time
from collections import Counter

from celery import Celery, group

from celery_taskengine import get_task_run, task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.transactions import IsolationLevel

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("caching", broker=BROKER_URL, backend=BACKEND_URL)


@task(
    app=app,
    cache_policy=INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE),
    cache_expiration=3600,
)
def build_report(month: str) -> dict[str, object]:
    """An expensive monthly report: worth building once, whoever asks first."""
    time.sleep(1.0)
    return {"month": month, "orders": 1234, "built_by_pid": os.getpid()}


def main() -> None:
    """Race four identical calls; print the values and how each run ended."""
    results = group(build_report.s("2024-05") for _ in range(4)).apply_async()
    reports = results.get(timeout=60)
    print(f"identical values: {all(report == reports[0] for report in reports)}")
    endings: Counter[str] = Counter()
    for result in results.results:
        run = get_task_run(result.id, app)
        endings[run.state_name if run is not None and run.state_name else "unknown"] += 1
    print(f"runs: {dict(sorted(endings.items()))}")
    print(f"executed: {endings['Completed']} time(s)")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.caching import main as send_work

    send_work()
