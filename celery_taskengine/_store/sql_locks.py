"""The SQL store's SERIALIZABLE locks (a part of :class:`SqlStore`): rows taken by a plain
``INSERT`` (the primary key refuses a second holder) after deleting a lapsed one, so they work
the same on every database, and a holder that died loses its lock at ``expires_at``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy import exc as sa_exc

from celery_taskengine._store import sql_schema as schema
from celery_taskengine._store.sql_support import check_ttl, reconnecting

__all__ = ["SqlLocks"]


class SqlLocks:
    """Locks in the ``cte_locks`` table."""

    namespace: str
    _clock: Callable[[], float]
    _connection: Callable[..., AbstractContextManager[Connection]]
    _mine: Callable[[Any], Any]

    @reconnecting
    def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Delete a lapsed lock on ``key``, then ``INSERT`` ours: the primary key lets one
        holder in. Never blocks; not re-entrant."""
        check_ttl(ttl)
        c = schema.locks.c
        now = self._clock()
        try:
            with self._connection(write=True) as conn:
                conn.execute(
                    delete(schema.locks).where(self._mine(c), c.key == key, c.expires_at <= now)
                )
            with self._connection(write=True) as conn:
                conn.execute(
                    schema.locks.insert().values(
                        namespace=self.namespace, key=key, holder=holder, expires_at=now + ttl
                    )
                )
        except sa_exc.IntegrityError:
            # Someone holds it, or our own INSERT went through before a dropped connection
            # made us try again.
            return self.lock_holder(key) == holder
        return True

    @reconnecting
    def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        check_ttl(ttl)
        c = schema.locks.c
        now = self._clock()
        with self._connection(write=True) as conn:
            renewed = conn.execute(
                update(schema.locks)
                .where(self._mine(c), c.key == key, c.holder == holder, c.expires_at > now)
                .values(expires_at=now + ttl)
            )
        return bool(renewed.rowcount)

    @reconnecting
    def release_lock(self, key: str, holder: str) -> None:
        c = schema.locks.c
        with self._connection(write=True) as conn:
            conn.execute(
                delete(schema.locks).where(self._mine(c), c.key == key, c.holder == holder)
            )

    @reconnecting
    def lock_holder(self, key: str) -> str | None:
        c = schema.locks.c
        with self._connection() as conn:
            holder = conn.execute(
                select(c.holder).where(self._mine(c), c.key == key, c.expires_at > self._clock())
            ).scalar_one_or_none()
        return None if holder is None else str(holder)
