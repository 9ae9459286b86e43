"""The SQL store's one-value reads through the driver's cursor (see sql_raw_read): a pooled
connection the server dropped is discarded and the read made again, other failures come out as
SQLAlchemy's errors, and no ``rollback()`` follows a read (pymysql sends one as a round trip)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from celery_taskengine.errors import StoreUnavailableError
from tests.test_store_contract import MARIADB_URL, POSTGRES_URL, _sql_store

pytestmark = pytest.mark.timeout(60)

#: The server-side id of a connection, and how another connection ends it.
SERVERS = {
    "postgresql": (POSTGRES_URL, "SELECT pg_backend_pid()", "SELECT pg_terminate_backend({})"),
    "mariadb": (MARIADB_URL, "SELECT CONNECTION_ID()", "KILL {}"),
}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str, str]]:
    from celery_taskengine._store import sql_schema
    from celery_taskengine._store.sql_store import SqlStore

    url, whoami, kill = SERVERS[request.param]
    _sql_store(url, "probe").close()  # reachable (fails in CI if not), tables made
    store = SqlStore.from_url(url, namespace=f"r{uuid.uuid4().hex[:12]}")
    yield store, whoami, kill
    with store.engine.begin() as conn:
        for table in sql_schema.METADATA.sorted_tables:
            conn.execute(table.delete().where(table.c.namespace == store.namespace))
    store.close()


def _pooled_reader_id(store: Any, whoami: str) -> int:
    """The server-side id of the one connection in the reads' pool (left there)."""
    connection = store._reader.raw_connection()
    cursor = connection.cursor()
    cursor.execute(whoami)
    (ident,) = cursor.fetchone()
    cursor.close()
    connection.close()
    return int(ident)


def test_a_read_on_a_connection_the_server_dropped_is_made_again(
    server: tuple[Any, str, str],
) -> None:
    store, whoami, kill = server
    store.write("k", "kept", serializer="json", expires_in=None)
    assert store.read("k").value == "kept"
    with store.engine.begin() as conn:
        conn.execute(text(kill.format(_pooled_reader_id(store, whoami))))
    record = store.read("k")  # the dead connection fails, is discarded; the read again
    assert record is not None and record.value == "kept"
    assert store.read("missing") is None


def test_a_failed_read_surfaces_as_sqlalchemys_error(server: tuple[Any, str, str]) -> None:
    store, *_ = server
    from celery_taskengine._store import sql_support

    broken = sql_support.READ_RECORD.where(text("no_such_column = 1"))
    params = {"namespace": store.namespace, "key": "k", "now": 0.0}
    # pymysql calls an unknown column an OperationalError: the store says unavailable
    with pytest.raises((sa_exc.DBAPIError, StoreUnavailableError)):
        store._fetch_one(broken, params)
    assert store.read("k") is None  # the store reads on


def test_a_read_sends_no_rollback(server: tuple[Any, str, str]) -> None:
    store, *_ = server
    store.write("k", "kept", serializer="json", expires_in=None)
    store.read("k")  # a connection in the pool
    connection = store._reader.raw_connection()
    dbapi_connection = connection.dbapi_connection
    connection.close()
    rollbacks: list[int] = []
    original = type(dbapi_connection).rollback

    def counted(self: Any) -> None:
        rollbacks.append(1)
        original(self)

    type(dbapi_connection).rollback = counted  # type: ignore[method-assign]
    try:
        for _ in range(5):
            assert store.read("k").value == "kept"
    finally:
        type(dbapi_connection).rollback = original  # type: ignore[method-assign]
    assert rollbacks == []
