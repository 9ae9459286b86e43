"""A chord whose header tasks retry: the callback waits for the retried results.

Pricing each order line calls a flaky tax service that refuses every line's first attempt.
Each line retries after 0.5 s (through the broker, keeping its task id), and ``order_total``
runs once all lines are priced::

    celery -A examples.chord worker --pool=solo
    python -m examples.chord
"""

from __future__ import annotations

import os
from collections import Counter

from celery import Celery, chord

from celery_taskengine import get_task_run, task

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("chord", broker=BROKER_URL, backend=BACKEND_URL)

#: Attempts per line in this worker process (the pretend tax service refuses the first).
_attempts: Counter[str] = Counter()


@task(app=app, retries=2, retry_delay_seconds=0.5)
def price_line(sku: str, quantity: int, unit_price: float) -> float:
    """A line's price with tax; the tax service refuses the first attempt."""
    _attempts[sku] += 1
    if _attempts[sku] == 1:
        raise ConnectionError("tax service busy")
    return round(quantity * unit_price * 1.2, 2)


@task(app=app)
def order_total(prices: list[float]) -> float:
    return round(sum(prices), 2)


def main() -> None:
    """Price three lines in a chord; print the total and each line's state history."""
    lines = [("mug", 2, 8.0), ("shirt", 1, 20.0), ("poster", 3, 5.0)]
    header = [price_line.s(*line) for line in lines]
    result = chord(header)(order_total.s())
    print(f"order total: {result.get(timeout=60)}")
    for line_result in result.parent.results:
        run = get_task_run(line_result.id, app)
        history = " -> ".join(run.history_names()) if run is not None else "(no run record)"
        print(f"{run.parameters['sku'] if run else '?'}: {history}")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.chord import main as send_work

    send_work()
