"""A generator task streamed to the caller: each item arrives as the worker yields it.

``stream(async_result)`` yields items while the task still runs; ``.get()`` would give the
whole list at the end::

    celery -A examples.streaming worker --pool=solo
    python -m examples.streaming
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from celery import Celery

from celery_taskengine import stream, task

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("streaming", broker=BROKER_URL, backend=BACKEND_URL)


@task(app=app)
def export_orders(count: int) -> Iterator[dict[str, object]]:
    """Export orders one by one, slowly, as a database cursor would."""
    for number in range(1, count + 1):
        time.sleep(0.3)
        yield {"order": number, "total": number * 10}


def main() -> None:
    """Print each exported order with the time it arrived."""
    started = time.monotonic()
    result = export_orders.delay(5)
    for row in stream(result, timeout=60):
        print(f"{time.monotonic() - started:5.2f} s  got order {row['order']}")
    print(f"all rows: {len(result.get(timeout=60))}")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.streaming import main as send_work

    send_work()
