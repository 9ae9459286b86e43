"""The store contract, written once and run over every store: memory, Redis, and the SQL store
on SQLite, PostgreSQL and MariaDB (real servers: 127.0.0.1:5432 and :3306).

Each test gets a namespace of its own, so the SQL tables and the Redis database are shared
without tests seeing each other's rows.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.memory import MemoryStore
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine.states import Completed, Pending, Running, TimedOut
from tests.conftest import skip_or_fail

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
STORES = ["memory", "redis", "sqlite", "postgresql", "mariadb"]
#: Seconds a short-lived record, lock or marker lives in the expiry tests.
SHORT = 1.0


def _sql_store(url: str, namespace: str) -> Any:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from celery_taskengine._store.sql_store import SqlStore

    store = SqlStore.from_url(url, namespace=namespace)
    try:
        store.create_tables()
    except Exception as exc:  # the server is not there: a gap in CI, a skip on a laptop
        store.close()
        skip_or_fail(f"cannot reach {store.url}: {type(exc).__name__}: {exc}")
    assert isinstance(sqlalchemy.__version__, str)
    return store


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    kind = request.param
    namespace = f"t{uuid.uuid4().hex[:12]}"
    made: Any
    if kind == "memory":
        made = MemoryStore()
    elif kind == "redis":
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        made = RedisStore(client, namespace=namespace)
    elif kind == "sqlite":
        made = _sql_store(f"sqlite:///{tmp_path / 'store.db'}", namespace)
    else:
        made = _sql_store(POSTGRES_URL if kind == "postgresql" else MARIADB_URL, namespace)
    try:
        yield made
    finally:
        if kind == "redis":
            made.client.close()
        elif kind not in ("memory",):
            made.close()


def _run(name: str = "t") -> TaskRun:
    """A finished run whose states are stamped now."""
    history = [Pending(), Running(), Completed(data=5)]
    return TaskRun(
        id=uuid.uuid4().hex,
        name=f"{name}-run",
        task_name=name,
        run_count=1,
        state=history[-1],
        state_history=history,
    )


# -- cached records --------------------------------------------------------------------------


def test_a_written_record_reads_back_with_its_value_and_task(store: ResultStore) -> None:
    store.write("k1", {"a": [1, 2]}, serializer="json", expires_in=None, task_name="t")

    record = store.read("k1")

    assert record is not None
    assert (record.value, record.task_name, record.serializer) == ({"a": [1, 2]}, "t", "json")
    assert store.exists("k1")
    assert store.read("missing") is None


def test_a_record_written_again_is_replaced(store: ResultStore) -> None:
    store.write("k", 1, serializer="json", expires_in=None)
    store.write("k", 2, serializer="json", expires_in=60)

    record = store.read("k")

    assert record is not None and record.value == 2


def test_an_expired_record_is_a_miss(store: ResultStore) -> None:
    store.write("short", "v", serializer="json", expires_in=SHORT)
    assert store.read("short") is not None

    time.sleep(SHORT + 0.2)

    assert store.read("short") is None
    assert "short" not in store.iter_keys()


def test_delete_says_whether_a_record_was_there(store: ResultStore) -> None:
    store.write("gone", 1, serializer="json", expires_in=None)

    assert store.delete("gone") is True
    assert store.delete("gone") is False
    assert store.read("gone") is None


def test_keys_are_listed_by_literal_prefix(store: ResultStore) -> None:
    for key in ("a%1", "a_2", "ab", "b"):
        store.write(key, key, serializer="json", expires_in=None)

    assert store.iter_keys("a%") == ["a%1"]
    assert store.iter_keys("a_") == ["a_2"]
    assert store.iter_keys() == ["a%1", "a_2", "ab", "b"]


# -- locks -----------------------------------------------------------------------------------


def test_a_lock_has_one_holder_until_it_is_released(store: ResultStore) -> None:
    assert store.acquire_lock("L", "h1", ttl=30)
    assert not store.acquire_lock("L", "h2", ttl=30)
    assert store.lock_holder("L") == "h1"

    store.release_lock("L", "h2")  # not the holder: nothing happens
    assert store.lock_holder("L") == "h1"
    store.release_lock("L", "h1")

    assert store.lock_holder("L") is None
    assert store.acquire_lock("L", "h2", ttl=30)


def test_only_the_holder_renews_a_lock(store: ResultStore) -> None:
    store.acquire_lock("R", "h1", ttl=30)

    assert store.renew_lock("R", "h1", ttl=30)
    assert not store.renew_lock("R", "h2", ttl=30)


def test_a_lock_whose_holder_stopped_renewing_lapses(store: ResultStore) -> None:
    assert store.acquire_lock("X", "dead", ttl=SHORT)

    time.sleep(SHORT + 0.2)

    assert store.lock_holder("X") is None
    assert not store.renew_lock("X", "dead", ttl=30)
    assert store.acquire_lock("X", "alive", ttl=30)


# -- run records -----------------------------------------------------------------------------


def test_a_saved_run_loads_back_with_its_history(store: ResultStore) -> None:
    run = _run()
    store.save_run(run)

    loaded = store.load_run(run.id)

    assert loaded is not None
    assert loaded.history_names() == ["Pending", "Running", "Completed"]
    assert store.load_run("unknown") is None


def test_runs_are_listed_newest_first_up_to_the_limit(store: ResultStore) -> None:
    runs = []
    for i in range(4):
        runs.append(_run(f"task{i}"))
        store.save_run(runs[-1])
        time.sleep(0.01)

    listed = store.iter_runs(3)

    assert [run.id for run in listed] == [run.id for run in reversed(runs)][:3]


def test_runs_are_listed_by_task_and_state_names_or_types(store: ResultStore) -> None:
    runs = []
    for name in ("shop.tasks.fetch", "shop.tasks.other", "shop.tasks.fetch"):
        runs.append(_run(name))  # each a little later than the one before
        time.sleep(0.01)
    fetch, other, failed = runs
    failed.state = TimedOut(message="too slow")
    failed.state_history.append(failed.state)
    for run in runs:
        store.save_run(run)

    def ids(**filters: Any) -> list[str]:
        return [run.id for run in store.list_runs(10, **filters)]

    assert ids(task="fetch") == [failed.id, fetch.id]
    assert ids(task="shop.tasks.fetch", state="failed") == [failed.id]
    assert ids(state="timed-out") == [failed.id]
    assert ids(state="COMPLETED") == [other.id, fetch.id]
    assert ids(task="nothing") == []
    assert len(store.list_runs(1)) == 1


# -- revokes and items -----------------------------------------------------------------------


def test_a_revoke_marker_is_seen(store: ResultStore) -> None:
    assert not store.is_revoked("r1")

    store.mark_revoked("r1")

    assert store.is_revoked("r1")


def test_items_are_read_in_order_up_to_the_end_marker(store: ResultStore) -> None:
    store.append_item("g", b"one")
    store.append_item("g", b"two")
    store.end_items("g")

    first = store.read_items("g", "0-0", count=1, block=0)
    rest = store.read_items("g", first[-1][0], count=10, block=0)

    assert [item for _, item in first + rest] == [b"one", b"two", None]
    assert store.read_items("g", rest[-1][0], count=10, block=0.1) == []


# -- capabilities ----------------------------------------------------------------------------


def test_capabilities_say_whether_other_processes_see_the_store(store: ResultStore) -> None:
    assert store.shared is not isinstance(store, MemoryStore)
    assert store.supports_locking
    assert (store.local_recorder() is None) is isinstance(store, MemoryStore)


# -- SQL only --------------------------------------------------------------------------------


def _take_lock(url: str, namespace: str, holder: str, started: Any, results: Any) -> None:
    from celery_taskengine._store.sql_store import SqlStore

    store = SqlStore.from_url(url, namespace=namespace)
    started.wait()
    results.put((holder, store.acquire_lock("shared", holder, ttl=30)))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mariadb"])
def test_processes_racing_for_a_sql_lock_get_one_holder(kind: str, tmp_path: Path) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'race.db'}",
        "postgresql": POSTGRES_URL,
        "mariadb": MARIADB_URL,
    }[kind]
    namespace = f"t{uuid.uuid4().hex[:12]}"
    _sql_store(url, namespace).close()  # tables exist before the race
    context = multiprocessing.get_context("spawn")
    started, results = context.Event(), context.Queue()
    procs = [
        context.Process(target=_take_lock, args=(url, namespace, f"p{i}", started, results))
        for i in range(4)
    ]
    for proc in procs:
        proc.start()
    started.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)

    assert sum(taken for _, taken in outcomes) == 1


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_the_ddl_creates_every_table_of_the_store(dialect: str) -> None:
    pytest.importorskip("sqlalchemy")
    from celery_taskengine._store.sql_schema import ddl

    text = ddl(dialect)

    for table in ("cte_cache", "cte_locks", "cte_runs", "cte_items", "cte_revoked"):
        assert f"CREATE TABLE {table}" in text
    assert "CREATE INDEX cte_runs_by_task" in text
