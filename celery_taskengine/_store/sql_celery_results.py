"""Celery's task row, written in the SQL store's own transaction.

When Celery's database backend (``celery.backends.database``, a ``db+...`` result backend)
keeps its results in the store's database, a delivery's final run record, its claim's done
marker and Celery's result commit together, fenced by the claim: one commit for the worker to
wait for, as a plain task's result is, and no moment where one is stored without the others.
An attempt's start shows Celery's ``RUNNING`` the same way, with its Running record.

Celery computes the row (its backend's ``_update_result``, which knows the extended-result
columns and the table names of ``database_table_names``); only the write is the store's: an
insert, or else an update that, as Celery's own, never replaces a ``SUCCESS``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from celery import states
from sqlalchemy import Connection, bindparam, update
from sqlalchemy.engine import make_url

from celery_taskengine._store.sql_support import insert_if_new, insert_statement

__all__ = ["shares_database", "task_row", "write_task_row"]

#: Where a backend remembers whether it shares the store's database (in its own ``__dict__``,
#: so the answer lives and dies with the backend object).
_SHARES = "_taskengine_shares_database"


def shares_database(store: Any, backend: Any) -> bool:
    """Whether ``backend`` is Celery's database backend on the database of ``store``."""
    state = getattr(backend, "__dict__", None)
    if state is None:
        return False
    known = state.get(_SHARES)
    if known is not None and known[0] == store.url:
        return bool(known[1])
    shares = _is_database_backend(backend) and _same_url(backend.url, store.engine.url)
    if shares:
        backend.ResultSession().close()  # Celery creates its tables with its first session
    state[_SHARES] = (store.url, shares)
    return shares


def _is_database_backend(backend: Any) -> bool:
    from celery.backends.database import DatabaseBackend

    return isinstance(backend, DatabaseBackend)


def _same_url(url: Any, other: Any) -> bool:
    try:
        mine = make_url(url).render_as_string(hide_password=False)
    except Exception:  # not a URL SQLAlchemy reads: not the store's database
        return False
    return mine == make_url(other).render_as_string(hide_password=False)


def task_row(
    backend: Any,
    task_id: str,
    result: Any,
    status: str,
    traceback: Any = None,
    request: Any = None,
) -> dict[str, Any]:
    """The values of Celery's task row for ``result`` in ``status``, as Celery computes them
    (``result`` as ``store_result`` hands it on: already through ``encode_result``)."""
    row_object = backend.task_cls(task_id)
    backend._update_result(row_object, result, status, traceback=traceback, request=request)
    table = backend.task_cls.__table__
    row = {column.name: getattr(row_object, column.key, None) for column in table.columns}
    row.pop("id", None)
    row["task_id"] = task_id
    if row.get("date_done") is None:  # what the column's default and onupdate would set
        row["date_done"] = datetime.now(timezone.utc)
    return row


def write_task_row(conn: Connection, backend: Any, row: dict[str, Any]) -> None:
    """Insert Celery's task row, or update it unless it says ``SUCCESS`` already (a result
    Celery never writes over)."""
    table = backend.task_cls.__table__
    name = conn.dialect.name
    statements = _statements.get((table, name))
    if statements is None:
        statements = _statements[(table, name)] = _build(table, name)
    insert_new, update_unless_done = statements
    if insert_if_new(conn, insert_new, row):
        return
    values = {k: v for k, v in row.items() if k != "task_id"}
    conn.execute(update_unless_done, {"b_task_id": row["task_id"], **values})


#: (insert unless present, update unless SUCCESS) by (table, dialect name).
_statements: dict[tuple[Any, str], tuple[Any, Any]] = {}


def _build(table: Any, name: str) -> tuple[Any, Any]:
    c = table.c
    update_unless_done = update(table).where(
        c.task_id == bindparam("b_task_id"), c.status != states.SUCCESS
    )
    return insert_statement(table, name, c.task_id), update_unless_done
