"""``async def`` tasks in a Celery worker, which Celery alone cannot run.

Each worker process keeps one event loop for all its async tasks, so async clients and
connection pools survive from one task to the next::

    celery -A examples.async_tasks worker --pool=solo
    python -m examples.async_tasks
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery, group

from celery_taskengine import task

BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0")
BACKEND_URL = os.environ.get("SHOP_BACKEND_URL", "redis://localhost:6379/1")

app = Celery("async_tasks", broker=BROKER_URL, backend=BACKEND_URL)


@task(app=app, timeout_seconds=5)
async def check_stock(sku: str) -> dict[str, object]:
    """Ask the (pretend) warehouse API, asynchronously."""
    await asyncio.sleep(0.1)
    loop_id = id(asyncio.get_running_loop())
    return {"sku": sku, "in_stock": len(sku) % 2 == 0, "loop": loop_id}


def main() -> None:
    """Check three SKUs in a group; print each answer and how many event loops served them."""
    answers = group(check_stock.s(sku) for sku in ("mug", "shirt", "poster")).apply_async()
    stock = answers.get(timeout=60)
    for item in stock:
        print(f"{item['sku']}: in stock = {item['in_stock']}")
    print(f"event loops used: {len({item['loop'] for item in stock})}")


if __name__ == "__main__":
    # Run as a script this module is ``__main__``; send the tasks by their registered names.
    from examples.async_tasks import main as send_work

    send_work()
