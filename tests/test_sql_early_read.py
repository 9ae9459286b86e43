"""Cache reads sent early on PostgreSQL (see sql_early_read): the same answers as a plain read,
whatever happens to the connection in between, and the engine's hits use them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS
from tests.test_store_contract import POSTGRES_URL, _sql_store

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> Iterator[Any]:
    from celery_taskengine._store.sql_store import SqlStore

    _sql_store(POSTGRES_URL, "probe").close()  # reachable (fails in CI if not), tables made
    made = SqlStore.from_url(POSTGRES_URL, namespace=f"e{uuid.uuid4().hex[:12]}", clock=Clock())
    yield made
    from celery_taskengine._store import sql_schema

    with made.engine.begin() as conn:
        for table in sql_schema.METADATA.sorted_tables:
            conn.execute(table.delete().where(table.c.namespace == made.namespace))
    made.close()


def test_an_early_read_answers_as_a_plain_read(store: Any) -> None:
    store.write("k", {"v": 1}, serializer="json", expires_in=10)
    early = store.start_read("k")
    record, plain = early.result(), store.read("k")
    assert record is not None and plain is not None
    assert (record.value, record.serializer) == (plain.value, plain.serializer)
    assert (record.value, record.serializer) == ({"v": 1}, "json")
    assert store.start_read("missing").result() is None
    store._clock.now += 20  # expired: the query's own clock says so
    assert store.start_read("k").result() is None


def test_a_discarded_read_never_answers_a_later_one(store: Any) -> None:
    for i in range(10):
        store.write(f"k{i}", i, serializer="json", expires_in=None)
    for i in range(10):
        store.start_read(f"k{i}").discard()
        record = store.start_read(f"k{(i + 1) % 10}").result()
        assert record is not None and record.value == (i + 1) % 10
        plain = store.read(f"k{i}")
        assert plain is not None and plain.value == i


def test_a_read_whose_connection_died_is_made_again(store: Any) -> None:
    store.write("k", "kept", serializer="json", expires_in=None)
    early = store.start_read("k")
    pid = early._connection.driver_connection.pgconn.backend_pid
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    record = early.result()
    assert record is not None and record.value == "kept"


def test_the_engines_cache_hits_send_their_read_early(store: Any) -> None:
    app = Celery(f"early-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(taskengine_store=POSTGRES_URL, taskengine_namespace=store.namespace)
    from celery_taskengine._store.selection import store_for_app

    used: Any = store_for_app(app)
    sent: list[str] = []
    start_read = used.start_read

    def spy(key: str) -> Any:
        sent.append(key)
        return start_read(key)

    used.start_read = spy
    calls: list[int] = []

    @task(app=app, name=f"{app.main}.square", cache_policy=INPUTS)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(3) == 9
    assert square(3) == 9  # a hit, read early
    assert calls == [3]
    assert len(sent) == 2
