"""Generator tasks' items, from the worker to the caller, as they are produced.

The worker appends each item to the run's item stream in the app's store (encoded with the
backend's result serializer, expiring with run records), and an end marker once the run is
final. :func:`stream` reads that stream, waiting for each item, and yields it; at the end it
asks Celery for the result, so a failed task raises exactly what ``.get()`` raises. A run
retried with a delay keeps one stream: items of every attempt arrive in order, as a local
generator run would yield them, while ``.get()`` gives the items of the attempt that succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["ItemChannel", "stream"]

#: Seconds one blocking read waits before checking whether the task is over anyway (a worker
#: killed mid-run never writes the end marker).
POLL_SECONDS = 1.0
_BATCH = 100


class ItemChannel:
    """The worker's side: publish items of run ``run_id`` one store call each."""

    def __init__(self, app: Celery, store: ResultStore, run_id: str) -> None:
        self.backend = app.backend
        self.store = store
        self.run_id = run_id

    def publish(self, item: Any) -> None:
        """Append ``item``; raises kombu's ``EncodeError`` if the serializer cannot encode it."""
        encoded = self.backend.encode(item)
        data = encoded.encode() if isinstance(encoded, str) else encoded
        self.store.append_item(self.run_id, data)

    def close(self) -> None:
        """Mark the stream finished: readers stop and fetch the task's result."""
        self.store.end_items(self.run_id)


def stream(async_result: AsyncResult, timeout: float | None = None) -> Iterator[Any]:
    """Yield a generator task's items as the worker yields them.

    Ends when the task is over; if it failed, raises its exception then, as ``.get()`` would.
    ``timeout`` bounds the whole iteration in seconds (``None``: no bound) and raises Celery's
    ``TimeoutError``. Works for any task id of an app whose store workers share; for a task
    that yields nothing (or is not a generator task) it yields nothing.
    """
    app = async_result.app
    store = _shared_store(app)
    run_id = str(async_result.id)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = "0-0"
    finished = False
    while not finished:
        remaining = _remaining(deadline)
        wait = POLL_SECONDS if remaining is None else min(POLL_SECONDS, remaining)
        batch = store.read_items(run_id, last, count=_BATCH, block=wait)
        if not batch:
            # Nothing came: the task may be over without an end marker (a lost worker).
            finished = async_result.ready() and not store.read_items(run_id, last, count=1, block=0)
            continue
        for entry_id, item in batch:
            last = entry_id
            if item is None:
                finished = True
                break
            yield app.backend.decode(item)
    async_result.get(timeout=_remaining(deadline), propagate=True)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise CeleryTimeoutError("The operation timed out.")
    return left


def _shared_store(app: Celery) -> ResultStore:
    store = store_for_app(app)
    if not store.shared:
        raise ConfigurationError(
            "stream() needs an app with a Redis result backend, where workers publish items"
        )
    return store
