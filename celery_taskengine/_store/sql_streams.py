"""The SQL store's revoke markers and generator item streams (a part of :class:`SqlStore`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, select

from celery_taskengine._store import sql_schema as schema
from celery_taskengine._store.protocol import ItemBatch
from celery_taskengine._store.settings import DEFAULT_RUN_EXPIRES
from celery_taskengine._store.sql_support import reconnecting

__all__ = ["SqlStreams"]

#: How often a blocking :meth:`SqlStreams.read_items` asks again.
ITEM_POLL_SECONDS = 0.05


class SqlStreams:
    """Revoke markers and item streams, in tables next to the run records."""

    namespace: str
    run_expires: float | None
    _clock: Callable[[], float]
    _connection: Callable[..., AbstractContextManager[Connection]]
    _mine: Callable[[Any], Any]
    _unexpired: Callable[[Any], Any]
    _upsert: Callable[..., None]

    @reconnecting
    def mark_revoked(self, run_id: str) -> None:
        expires = self._clock() + (self.run_expires or DEFAULT_RUN_EXPIRES)
        with self._connection(write=True) as conn:
            self._upsert(conn, schema.revoked, {"run_id": run_id}, {"expires_at": expires})

    @reconnecting
    def is_revoked(self, run_id: str) -> bool:
        c = schema.revoked.c
        with self._connection() as conn:
            found = conn.execute(
                select(c.run_id).where(self._mine(c), c.run_id == run_id, self._unexpired(c))
            ).first()
        return found is not None

    @reconnecting
    def append_item(self, run_id: str, item: bytes) -> None:
        self._add_entry(run_id, item)

    @reconnecting
    def end_items(self, run_id: str) -> None:
        self._add_entry(run_id, None)

    def read_items(self, run_id: str, after: str, *, count: int, block: float) -> ItemBatch:
        """Entries after id ``after`` (``"<row id>-0"``), polled while ``block`` lasts."""
        c = schema.items.c
        start = int(after.split("-")[0])
        query = (
            select(c.id, c.item)
            .where(self._mine(c), c.run_id == run_id, c.id > start)
            .order_by(c.id)
            .limit(count)
        )
        deadline = time.monotonic() + max(block, 0.0)
        while True:
            with self._connection() as conn:
                rows = conn.execute(query).all()
            if rows or time.monotonic() >= deadline:
                return [
                    (f"{row_id}-0", None if item is None else bytes(item)) for row_id, item in rows
                ]
            time.sleep(min(ITEM_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def _add_entry(self, run_id: str, item: bytes | None) -> None:
        expires = None if self.run_expires is None else self._clock() + self.run_expires
        row = {"namespace": self.namespace, "run_id": run_id, "item": item, "expires_at": expires}
        with self._connection(write=True) as conn:
            conn.execute(schema.items.insert().values(**row))
