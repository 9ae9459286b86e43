"""Cache reads sent before the engine needs their answer, so the round trip overlaps its work.

A cache hit is one Redis round trip plus the engine's own work: recording Running, entering
states. The engine sends the hit's ``GET`` before that work (``RunCore._early_reader``)
and reads the answer after it, so the work is done while Redis answers instead of before.

The reads go on connections the store keeps (its :class:`~._store.connections.EnginePool`,
never Celery's backend pool, whose ``redis_max_connections`` they would exhaust): checking a
connection out of redis-py's pool and back in for every read costs about as much as the rest
of the hit. When every kept connection is busy the read is made as a plain one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery_taskengine._store.protocol import ResultRecord
from celery_taskengine._store.wire import DOWN, pack, send

if TYPE_CHECKING:
    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["EarlyRead", "EarlyReads"]


class EarlyReads:
    """A store's early reads, on connections of the store's engine pool (one per read in
    flight at once, shared by all threads)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def start(self, key: str) -> EarlyRead:
        """Send the ``GET`` of transaction key ``key`` now (see :class:`EarlyRead`)."""
        return EarlyRead(self, key)

    def take(self) -> Any:
        """A kept connection nobody is using; ``None`` if all are busy (the read is then
        made as a plain one)."""
        return self.store.connections.take()

    def give_back(self, connection: Any, *, broken: bool = False) -> None:
        # broken: an unread answer must never meet a later read
        self.store.connections.give_back(connection, broken=broken)


class EarlyRead:
    """A cache read whose ``GET`` is on its way; :meth:`result` waits for the answer.

    If sending or reading fails, the read is made again as :meth:`RedisStore.read` makes it
    (through the pool, with redis-py's retries, then StoreUnavailableError), so an early read
    never answers differently from a plain one. :meth:`discard` drops an unwanted answer.
    """

    __slots__ = ("_connection", "_key", "_reads")

    def __init__(self, reads: EarlyReads, key: str) -> None:
        self._reads, self._key = reads, key
        connection = reads.take()
        if connection is not None:
            try:
                get = ("GET", reads.store.key_for("cache", key))
                send(connection, pack(connection, [get]))
            except DOWN:
                reads.give_back(connection, broken=True)
                connection = None
            except BaseException:
                reads.give_back(connection, broken=True)
                raise
        self._connection: Any = connection

    def result(self) -> ResultRecord | None:
        """The committed record (as :meth:`RedisStore.read` gives it)."""
        connection, self._connection = self._connection, None
        store = self._reads.store
        if connection is None:
            return store.read(self._key)
        try:
            raw = connection.read_response()
        except DOWN:
            self._reads.give_back(connection, broken=True)
            return store.read(self._key)
        except BaseException:
            self._reads.give_back(connection, broken=True)
            raise
        self._reads.give_back(connection)
        return store.record_from(raw, self._key)

    def discard(self) -> None:
        """Drop the read unanswered (its connection is closed, so the answer is never read)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._reads.give_back(connection, broken=True)
