"""What the SQL store needs of SQLAlchemy beyond plain statements: upserts in each database's
spelling, operations made again after a dropped connection or a deadlock, SQLite's write-ahead
log, and connections a forked child must not share."""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, bindparam, or_, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite

from celery_taskengine._store import sql_schema as schema
from celery_taskengine.errors import ConfigurationError, StoreUnavailableError

__all__ = [
    "LOAD_RUN",
    "READ_RECORD",
    "TryAgain",
    "check_ttl",
    "engines",
    "insert_if_new",
    "insert_statement",
    "like_escape",
    "may_succeed_again",
    "reconnecting",
    "sqlite_wal",
    "upsert_many",
    "utc",
]

logger = logging.getLogger(__name__)


def _live_row(table: Any, key_column: Any, *columns: Any) -> Any:
    """``SELECT columns`` of the unexpired row under bound ``namespace`` and ``key``, built
    once (statements built per call cost more than the query's round trip)."""
    c = table.c
    return select(*columns).where(
        c.namespace == bindparam("namespace"),
        key_column == bindparam("key"),
        or_(c.expires_at.is_(None), c.expires_at > bindparam("now")),
    )


READ_RECORD = _live_row(schema.cache, schema.cache.c.key, schema.cache.c.value)
LOAD_RUN = _live_row(schema.runs, schema.runs.c.run_id, schema.runs.c.document)


class TryAgain(StoreUnavailableError):
    """The operation may succeed if made again: the database closed a pooled connection (a
    restart, an idle timeout), or chose this transaction as a deadlock's victim."""


_Method = TypeVar("_Method", bound=Callable[..., Any])
#: How often an operation is made in all when the database says to try again.
_TRIES = 3


def reconnecting(method: _Method) -> _Method:
    """Make ``method`` again (up to :data:`_TRIES` times in all) when the database says so."""

    @functools.wraps(method)
    def again_if_told(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, _TRIES + 1):
            try:
                return method(*args, **kwargs)
            except TryAgain as exc:
                if attempt == _TRIES:
                    raise
                logger.info("%s: making it again: %s", method.__name__, exc)
        raise AssertionError("unreachable")

    return cast(_Method, again_if_told)


#: What a database says when it cut a connection (also while it was being made, which
#: SQLAlchemy does not count as an invalidated one), chose a deadlock's victim or timed out
#: a lock wait.
_PASSING = (
    "deadlock",
    "lock wait timeout",
    "database is locked",
    "terminating connection",  # PostgreSQL: pg_terminate_backend, a shutdown
    "server closed the connection",
    "lost connection",  # MySQL 2013
    "gone away",  # MySQL 2006
    "connection reset",
)


def may_succeed_again(exc: sa_exc.DBAPIError) -> bool:
    """A dropped connection, a deadlock victim or a lock wait that timed out."""
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    return any(sign in text for sign in _PASSING)


#: MySQL's and MariaDB's error number for a duplicate key.
_DUPLICATE_KEY = 1062


def insert_if_new(conn: Connection, statement: Any, row: dict[str, Any]) -> bool:
    """Insert ``row`` with ``statement`` (the dialect's: see ``insert_statement``) unless its
    key is taken; whether it did.

    PostgreSQL's says so with ``RETURNING`` (psycopg gives no row count for it), SQLite's by
    its row count. MySQL's is a plain ``INSERT`` whose duplicate-key error alone is passed
    over (InnoDB undoes the statement, not the transaction): ``INSERT IGNORE`` would pass
    over every error, storing a value too long for its column cut short, without a word.
    """
    name = conn.dialect.name
    if name in ("mysql", "mariadb"):
        try:
            conn.execute(statement, row)
        except sa_exc.IntegrityError as exc:
            if getattr(exc.orig, "args", (None,))[0] == _DUPLICATE_KEY:
                return False
            raise
        return True
    inserted = conn.execute(statement, row)
    return inserted.first() is not None if name == "postgresql" else bool(inserted.rowcount)


def insert_statement(table: Any, name: str, key: Any) -> Any:
    """The statement :func:`insert_if_new` runs on ``table`` for dialect ``name``; ``key``
    is a column of the table's key (PostgreSQL returns it for an inserted row)."""
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing().returning(key)
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return table.insert()


def upsert_many(
    conn: Connection, table: Any, namespace: str, key_names: list[str], rows: list[dict[str, Any]]
) -> None:
    """``INSERT ... ON CONFLICT UPDATE`` of ``rows`` in the database's own spelling, one
    statement for the whole batch, built once per table and columns: building and compiling a
    statement for each batch costs far more than sending it."""
    rows = [{"namespace": namespace, **row} for row in rows]
    updated = tuple(name for name in rows[0] if name not in ("namespace", *key_names))
    name = conn.dialect.name
    shape = (table.name, name, tuple(key_names), updated)
    statement = _upserts.get(shape)
    if statement is None:
        statement = _upserts[shape] = _upsert_statement(table, name, key_names, updated)
    conn.execute(statement, rows)


#: Upsert statements by (table, dialect, key columns, updated columns).
_upserts: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}


def _upsert_statement(table: Any, name: str, key_names: list[str], updated: tuple[str, ...]) -> Any:
    if name in ("mysql", "mariadb"):
        my = mysql.insert(table)
        return my.on_duplicate_key_update({col: my.inserted[col] for col in updated})
    if name not in ("postgresql", "sqlite"):
        raise ConfigurationError(f"the SQL store does not support {name!r} databases")
    insert = (postgresql if name == "postgresql" else sqlite).insert(table)
    return insert.on_conflict_do_update(
        index_elements=["namespace", *key_names],
        set_={col: insert.excluded[col] for col in updated},
    )


#: Every SQL store's engine in this process (forgotten with its store).
engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_parent_connections() -> None:
    """In a forked child: new connections, leaving the parent's sockets to the parent."""
    for engine in list(engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    """Readers never wait for a writer's commit (write-ahead log), and commits wait for no
    disk flush but at checkpoints: safe against a crashed process, not a lost machine."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"lock ttl must be a positive number of seconds, got {ttl!r}")


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
