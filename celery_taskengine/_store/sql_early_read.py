"""Cache reads on PostgreSQL sent before the engine needs their answer (as early_read on Redis).

A cache hit is one query round trip plus the engine's own work. The engine sends the hit's
``SELECT`` before that work (``RunCore._early_reader``) and reads the answer after it, so the
work is done while the database answers. SQLAlchemy has no way to send a statement without
waiting for its answer, so the read goes through psycopg's libpq connection (``send`` now,
``get_result`` later) on a connection checked out of the store's autocommitting pool and
kept for the read alone. Any failure makes the read again as :meth:`SqlStore.read` makes it,
so an early read never answers differently from a plain one; a connection whose answer was
not read is discarded, never given back.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Any

from celery_taskengine._store.protocol import ResultRecord

if TYPE_CHECKING:
    from celery_taskengine._store.sql_store import SqlStore

__all__ = ["SqlEarlyRead", "sends_early"]

#: The cache hit's read (sql_support.READ_RECORD), in libpq's parameter spelling.
_READ = (
    b"SELECT value FROM cte_cache WHERE namespace = $1 AND key = $2"
    b" AND (expires_at IS NULL OR expires_at > $3)"
)
_BINARY = 1
#: libpq's PQTRANS_IDLE and PGRES_TUPLES_OK (psycopg is imported only where it is installed).
_IDLE = 0
_TUPLES_OK = 2


def sends_early(store: SqlStore) -> bool:
    """Whether ``store``'s reads can be sent early: PostgreSQL through psycopg 3."""
    engine = store._reader
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


class SqlEarlyRead:
    """A cache read whose ``SELECT`` is on its way; :meth:`result` waits for the answer."""

    __slots__ = ("_connection", "_key", "_store")

    def __init__(self, store: SqlStore, key: str) -> None:
        self._store, self._key = store, key
        self._connection: Any = None
        try:
            connection = store._reader.raw_connection()
        except Exception:
            return  # result() reads as read() does, with its errors
        try:
            driver: Any = connection.driver_connection
            pgconn = driver.pgconn
            if pgconn.transaction_status != _IDLE:  # inside something: leave it be
                connection.close()
                return
            now = str(store._clock()).encode()
            params = [store.namespace.encode(), key.encode(), now]
            pgconn.send_query_params(_READ, params, result_format=_BINARY)
            while pgconn.flush():
                select.select([], [pgconn.socket], [])
        except Exception:
            connection.invalidate()
            return
        self._connection = connection

    def result(self) -> ResultRecord | None:
        """The committed record (as :meth:`SqlStore.read` gives it)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return self._store.read(self._key)
        try:
            raw = _answer(connection.driver_connection.pgconn)
        except Exception:
            connection.invalidate()
            return self._store.read(self._key)
        connection.close()  # back to the pool, idle
        return self._store.record_from(raw, self._key)

    def discard(self) -> None:
        """Drop the read unanswered (its connection is discarded, its answer never read)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.invalidate()


def _answer(pgconn: Any) -> bytes | None:
    """The value the read selected (``None``: no live row); waits on the socket, without
    holding the interpreter, until the whole answer is in."""
    pgconn.consume_input()
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()
    result, value = pgconn.get_result(), None
    while pgconn.get_result() is not None:  # the end of the answer: the connection is idle
        pass
    if result is None or result.status != _TUPLES_OK:  # an error: read again, plainly
        raise RuntimeError(f"early read failed: {getattr(result, 'error_message', b'')!r}")
    if result.ntuples:
        value = result.get_value(0, 0)
    return None if value is None else bytes(value)
