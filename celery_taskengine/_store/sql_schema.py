"""The SQL store's tables, and their DDL for each database.

Every table is keyed by ``namespace`` first (the app setting ``taskengine_namespace``), so two
apps can share one database without sharing caches, as on Redis. Times are UNIX seconds as
floats from the engine's clock (``expires_at`` ``NULL``: never), so no column depends on the
database's time zone handling. ``celery-taskengine store init`` creates the tables;
``celery-taskengine store ddl --dialect postgresql`` prints the statements, for databases
whose schema is changed by migrations only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.schema import CreateIndex, CreateTable

__all__ = [
    "DIALECTS",
    "METADATA",
    "cache",
    "claims",
    "create_missing",
    "ddl",
    "items",
    "locks",
    "revoked",
    "runs",
]

METADATA = MetaData()
#: Long enough for every transaction key the engine makes and for indexed keys on MySQL.
_KEY = 191
_BLOB = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

cache = Table(
    "cte_cache",
    METADATA,
    Column("namespace", String(64), primary_key=True),
    Column("key", String(_KEY), primary_key=True),
    Column("value", _BLOB, nullable=False),
    Column("expires_at", Double, nullable=True),
)

locks = Table(
    "cte_locks",
    METADATA,
    Column("namespace", String(64), primary_key=True),
    Column("key", String(_KEY), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", Double, nullable=False),
)

#: Delivery claims (see sql_claims): ``key`` is ``<run id>:<Celery retries>``; ``holder`` a
#: delivery's token, or ``done:<token>`` once it wrote its outcome (``expires_at`` ``NULL``:
#: a done marker kept as long as run records that never expire).
claims = Table(
    "cte_claims",
    METADATA,
    Column("namespace", String(64), primary_key=True),
    Column("key", String(_KEY), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", Double, nullable=True),
)

runs = Table(
    "cte_runs",
    METADATA,
    Column("namespace", String(64), primary_key=True),
    Column("run_id", String(_KEY), primary_key=True),
    Column("task_name", String(255), nullable=False),
    Column("task_short", String(255), nullable=False),  # the last dotted part
    Column("state_type", String(32), nullable=False),  # squashed: "failed"
    Column("state_name", String(64), nullable=False),  # squashed: "timedout"
    Column("updated_at", Double, nullable=False),
    Column("expires_at", Double, nullable=True),
    Column("document", _TEXT, nullable=False),
    # ``runs ls`` reads the newest runs, of one task and one state at most: an index range
    # of ``limit`` rows, however many runs there are (see run_filters for the keys).
    Index("cte_runs_recent", "namespace", "updated_at"),
    Index("cte_runs_by_task", "namespace", "task_name", "updated_at"),
    Index("cte_runs_by_task_short", "namespace", "task_short", "updated_at"),
    Index("cte_runs_by_state_type", "namespace", "state_type", "updated_at"),
    Index("cte_runs_by_state_name", "namespace", "state_name", "updated_at"),
)

items = Table(
    "cte_items",
    METADATA,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("namespace", String(64), nullable=False),
    Column("run_id", String(_KEY), nullable=False),
    Column("item", _BLOB, nullable=True),  # NULL: the end of the stream
    Column("expires_at", Double, nullable=True),
    Index("cte_items_by_run", "namespace", "run_id", "id"),
)

revoked = Table(
    "cte_revoked",
    METADATA,
    Column("namespace", String(64), primary_key=True),
    Column("run_id", String(_KEY), primary_key=True),
    Column("expires_at", Double, nullable=False),
)

#: The databases the store is tested on, by the names ``store ddl --dialect`` takes.
DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),
    "sqlite": sqlite.dialect(),
}


def ddl(dialect: str) -> str:
    """The ``CREATE TABLE`` and ``CREATE INDEX`` statements for ``dialect``, as SQL text."""
    try:
        target = DIALECTS[dialect]
    except KeyError:
        raise ValueError(
            f"unknown dialect {dialect!r}: use one of {', '.join(sorted(DIALECTS))}"
        ) from None
    statements: list[str] = []
    for table in METADATA.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=target)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index).compile(dialect=target)).strip() + ";")
    return "\n\n".join(statements) + "\n"


#: How many times the tables are looked for and made while other processes make them too.
_CREATE_TRIES = 6


def create_missing(engine: Engine, may_pass: Callable[[sa_exc.DBAPIError], bool]) -> None:
    """Create the tables and indexes that are missing, as other processes may be doing at the
    same moment: processes starting together on a new database race, and the loser's
    ``CREATE`` fails (the table exists now, PostgreSQL's catalog refuses a duplicate row type,
    SQLite's file is locked) or finds one table made and the next not yet (MySQL commits each
    ``CREATE`` by itself). So it looks again and makes what is still missing, also after an
    error ``may_pass`` says may pass (a lock, a deadlock, a dropped connection). Raises the
    database's error when it is neither, or after the last try.
    """
    for attempt in range(1, _CREATE_TRIES + 1):
        try:
            METADATA.create_all(engine, checkfirst=True)
            return
        except sa_exc.DBAPIError as exc:
            if attempt == _CREATE_TRIES or not (_created_meanwhile(exc) or may_pass(exc)):
                raise
            time.sleep(0.05 * attempt)


def _created_meanwhile(exc: Exception) -> bool:
    """Whether a failed ``CREATE`` met what another process made meanwhile (a lock it held,
    a deadlock or a cut connection is ``may_pass``'s to judge)."""
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text
