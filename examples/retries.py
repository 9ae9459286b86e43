"""Retries leave the worker: a delayed retry goes back to the broker instead of sleeping.

``charge_card`` fails on its first attempt and retries 2 s later. The run waits in
``AwaitingRetry`` on the broker, so even a single ``--pool=solo`` worker is free meanwhile:
``send_receipt``, sent after it, finishes before the retry starts::

    celery -A examples.retries worker --pool=solo
    python -m examples.retries
"""

from __future__ import annotations

import os
from collections import Counter

from celery import Celery

from celery_taskengine import get_task_run, task

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("retries", broker=BROKER_URL, backend=BACKEND_URL)

#: Attempts per order in this worker process (the pretend gateway is down for the first).
_attempts: Counter[str] = Counter()


@task(app=app, retries=2, retry_delay_seconds=2)
def charge_card(order_id: str) -> str:
    """Charge an order; the gateway refuses the first attempt."""
    _attempts[order_id] += 1
    if _attempts[order_id] == 1:
        raise ConnectionError("payment gateway unavailable")
    return f"charged {order_id}"


@task(app=app)
def send_receipt(order_id: str) -> str:
    return f"receipt for {order_id}"


def main() -> None:
    """Send a charge that needs a retry, then a receipt; show the worker ran both meanwhile."""
    charge = charge_card.delay("order-1")
    receipt = send_receipt.delay("order-1")
    print(f"receipt: {receipt.get(timeout=60)}")
    print(f"charge: {charge.get(timeout=60)}")
    charge_run = get_task_run(charge.id, app)
    receipt_run = get_task_run(receipt.id, app)
    assert charge_run is not None and receipt_run is not None
    print("charge history: " + " -> ".join(charge_run.history_names()))
    retrying = next(s for s in charge_run.state_history if s.name == "Retrying")
    finished = receipt_run.state_history[-1]
    lead = (retrying.timestamp - finished.timestamp).total_seconds()
    verdict = "was free" if lead > 0 else "was NOT free"
    print(f"the worker {verdict} during the wait (receipt done {lead:.1f} s before the retry)")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.retries import main as send_work

    send_work()
