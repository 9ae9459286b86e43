"""Generator tasks' items, from the worker to the caller, as they are produced.

The worker appends each item to a Redis stream next to the run record
(``cte:<namespace>:items:<run id>``, encoded with the backend's result serializer, expiring
with the results), and an end marker once the run is final. :func:`stream` reads that stream
with blocking ``XREAD`` and yields each item; at the end it asks Celery for the result, so a
failed task raises exactly what ``.get()`` raises. A run retried with a delay keeps one stream:
items of every attempt arrive in order, as a local generator run would yield them, while
``.get()`` gives the items of the attempt that succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_taskengine._store.selection import store_for_app
from celery_taskengine.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["ItemChannel", "stream"]

#: Seconds one blocking read waits before checking whether the task is over anyway (a worker
#: killed mid-run never writes the end marker).
POLL_SECONDS = 1.0
_ITEM = b"i"
_END = b"e"
_BATCH = 100


class ItemChannel:
    """The worker's side: publish items of run ``run_id`` one round trip each."""

    def __init__(self, app: Celery, store: RedisStore, run_id: str) -> None:
        self.backend = app.backend
        self.client: Any = store.client  # redis-py's stream types are too narrow to help
        self.key = store.key_for("items", run_id)
        expires = self.backend.expires
        self.expires_ms = int(expires * 1000) if expires else None

    def publish(self, item: Any) -> None:
        """Append ``item``; raises kombu's ``EncodeError`` if the serializer cannot encode it."""
        self._add({_ITEM: self.backend.encode(item)})

    def close(self) -> None:
        """Mark the stream finished: readers stop and fetch the task's result."""
        self._add({_END: b"1"})

    def _add(self, fields: dict[bytes, Any]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, fields)
        if self.expires_ms:
            pipe.pexpire(self.key, self.expires_ms)
        pipe.execute()


def stream(async_result: AsyncResult, timeout: float | None = None) -> Iterator[Any]:
    """Yield a generator task's items as the worker yields them.

    Ends when the task is over; if it failed, raises its exception then, as ``.get()`` would.
    ``timeout`` bounds the whole iteration in seconds (``None``: no bound) and raises Celery's
    ``TimeoutError``. Works for any task id of an app with a Redis result backend; for a task
    that yields nothing (or is not a generator task) it yields nothing.
    """
    app = async_result.app
    store = _redis_store(app)
    client: Any = store.client
    key = store.key_for("items", async_result.id)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = "0-0"
    finished = False
    while not finished:
        remaining = _remaining(deadline)
        wait = POLL_SECONDS if remaining is None else min(POLL_SECONDS, remaining)
        batch = client.xread({key: last}, count=_BATCH, block=max(1, int(wait * 1000)))
        if not batch:
            # Nothing came: the task may be over without an end marker (a lost worker).
            finished = async_result.ready() and not client.xread({key: last}, count=1)
            continue
        for entry_id, fields in batch[0][1]:
            last = entry_id
            if _END in fields:
                finished = True
                break
            yield app.backend.decode(fields[_ITEM])
    async_result.get(timeout=_remaining(deadline), propagate=True)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise CeleryTimeoutError("The operation timed out.")
    return left


def _redis_store(app: Celery) -> RedisStore:
    from celery_taskengine._store.redis_store import RedisStore

    store = store_for_app(app)
    if not isinstance(store, RedisStore):
        raise ConfigurationError(
            "stream() needs an app with a Redis result backend, where workers publish items"
        )
    return store
