"""One-value reads (a cache hit's ``SELECT``) through the driver's cursor, compiled once.

A cache hit is one query plus the engine's work, and SQLAlchemy's execution around the query
(a ``Connection``, the compiled-statement cache look-up, parameter and result processing) cost
the hit's caller about as much CPU as the engine's work. And closing a ``Connection`` sends the
driver's ``rollback()``, which is free on psycopg but one more round trip on pymysql, even in
autocommit mode. So these reads take a pooled connection of the store's autocommitting engine
(SQLite's: its driver begins no transaction for a ``SELECT``), run the statement compiled once
for the engine's dialect on its cursor, and give the connection back as it is. The driver's
errors come out as SQLAlchemy's (``DBAPIError`` and its kinds), a connection that failed is
discarded, so the store handles them as on its other operations.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

__all__ = ["RawReads"]


class RawReads:
    """Statements of one engine, compiled on first use; :meth:`fetch_one` runs one."""

    __slots__ = ("_compiled", "_engine", "_error")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._error: type[Exception] = engine.dialect.loaded_dbapi.Error
        #: By the statement's id, with the statement (so that its id is never reused).
        self._compiled: dict[int, tuple[str, Any, tuple[str, ...] | None, Any, Any]] = {}

    def fetch_one(self, statement: Any, params: dict[str, Any]) -> Any:
        """The first column of the first row ``statement`` selects (``None``: no row)."""
        sql, processors, order, result, _ = self._compiled.get(id(statement)) or self._compile(
            statement
        )
        for name, process in processors:
            params[name] = process(params[name])
        bound = params if order is None else tuple(params[name] for name in order)
        connection = self._engine.raw_connection()  # SQLAlchemy's errors already
        try:
            cursor = connection.cursor()
            cursor.execute(sql, bound)
            row = cursor.fetchone()
            cursor.close()
        except self._error as exc:
            raise self._failed(connection, exc, sql, bound) from exc
        except BaseException:
            connection.invalidate()
            raise
        connection.close()  # back to the pool as it is: nothing to end on an autocommit one
        if row is None or row[0] is None:
            return None
        return row[0] if result is None else result(row[0])

    def _compile(self, statement: Any) -> tuple[str, Any, tuple[str, ...] | None, Any, Any]:
        dialect = self._engine.dialect
        compiled = statement.compile(dialect=dialect)
        processors = tuple(compiled._bind_processors.items())
        order = tuple(compiled.positiontup) if compiled.positional else None
        column_type = compiled._result_columns[0].type
        result = column_type._cached_result_processor(dialect, None)
        entry = (compiled.string, processors, order, result, statement)
        self._compiled[id(statement)] = entry
        return entry

    def _failed(self, connection: Any, exc: Any, sql: str, params: Any) -> sa_exc.DBAPIError:
        """``exc`` as SQLAlchemy raises it; the connection discarded (a reset is not worth it)."""
        dialect = self._engine.dialect
        lost = dialect.is_disconnect(exc, connection.dbapi_connection, None)
        connection.invalidate(exc)
        error: sa_exc.DBAPIError = sa_exc.DBAPIError.instance(
            sql, params, exc, self._error, connection_invalidated=lost, dialect=dialect
        )
        return error
