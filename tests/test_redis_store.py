"""The Redis store on a Celery app's result backend, against a real redis-server."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import encode_record
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine.errors import ConfigurationError, SerializationError, StoreUnavailableError
from celery_taskengine.states import Completed, Pending, Running

LOGGER = "celery_taskengine._store.redis_store"


@pytest.fixture
def store(redis_app: Any) -> RedisStore:
    return RedisStore.for_app(redis_app)


def raw_keys(client: Any) -> list[str]:
    return sorted(k.decode() for k in client.keys("*"))


def make_run(run_id: str = "run-1", *, at: datetime | None = None) -> TaskRun:
    history = [Pending(), Running(), Completed(data={"answer": 42})]
    if at is not None:
        history = [dataclasses.replace(s, timestamp=at) for s in history]
    return TaskRun(
        id=run_id,
        name=f"add-{run_id}",
        task_name="tests.add",
        parameters={"x": 1, "y": [2, 3]},
        tags=frozenset({"math"}),
        run_count=1,
        start_time=history[1].timestamp,
        end_time=history[2].timestamp,
        state=history[-1],
        state_history=history,
    )


# -- cached results ------------------------------------------------------------------------


def test_redis_store_satisfies_the_result_store_protocol(store: RedisStore) -> None:
    assert isinstance(store, ResultStore)
    assert store.supports_locking is True


def test_a_written_value_reads_back_equal_but_as_a_fresh_copy(store: RedisStore) -> None:
    value = {"items": [1, 2, 3], "when": datetime(2024, 1, 2, tzinfo=timezone.utc)}
    store.write("k", value, serializer="json", expires_in=None, task_name="tests.add")

    first, second = store.read("k"), store.read("k")

    assert first is not None and second is not None
    assert first.value == value
    assert first.value is not second.value
    assert first.key == "k"
    assert first.task_name == "tests.add"
    assert first.serializer == "json"
    assert first.expires_at is None
    assert store.exists("k")


def test_a_missing_key_reads_as_none(store: RedisStore) -> None:
    assert store.read("nothing") is None
    assert store.exists("nothing") is False


def test_a_record_expires_after_its_lifetime(store: RedisStore) -> None:
    store.write("k", 1, serializer="json", expires_in=0.2)
    record = store.read("k")
    assert record is not None and record.expires_at is not None
    assert record.expires_at - record.created_at == timedelta(seconds=0.2)

    time.sleep(0.3)

    assert store.read("k") is None
    assert store.exists("k") is False


def test_a_record_past_its_envelope_expiry_is_a_miss_even_if_redis_still_has_it(
    store: RedisStore, redis_client: Any
) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=10)
    raw = encode_record(
        "k", 1, serializer="json", accept={"json"}, created_at=past, expires_at=past
    )
    redis_client.set(store.key_for("cache", "k"), raw)  # no Redis-side expiry

    assert store.read("k") is None


def test_a_record_without_expiry_has_no_redis_ttl(store: RedisStore, redis_client: Any) -> None:
    store.write("k", "v", serializer="json", expires_in=None)
    assert redis_client.pttl(store.key_for("cache", "k")) == -1
    record = store.read("k")
    assert record is not None and record.value == "v"


def test_a_record_lifetime_becomes_a_millisecond_redis_ttl(
    store: RedisStore, redis_client: Any
) -> None:
    store.write("k", "v", serializer="json", expires_in=30.5)
    assert 29_000 < redis_client.pttl(store.key_for("cache", "k")) <= 30_500


def test_a_zero_lifetime_write_clears_the_key(store: RedisStore) -> None:
    store.write("k", "old", serializer="json", expires_in=None)
    store.write("k", "new", serializer="json", expires_in=0)
    assert store.read("k") is None


def test_delete_removes_the_record_and_says_whether_one_was_there(store: RedisStore) -> None:
    store.write("k", 1, serializer="json", expires_in=None)
    assert store.delete("k") is True
    assert store.read("k") is None
    assert store.delete("k") is False


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (object(), "object")],
    ids=["set", "object"],
)
def test_an_unserialisable_value_raises_naming_its_type_and_writes_nothing(
    store: RedisStore, redis_client: Any, value: object, type_name: str
) -> None:
    with pytest.raises(SerializationError) as caught:
        store.write("k", value, serializer="json", expires_in=None, task_name="tests.bad")

    message = str(caught.value)
    assert "'tests.bad'" in message
    assert "'k'" in message
    assert f"'{type_name}'" in message
    assert "'json'" in message
    assert raw_keys(redis_client) == []


def test_pickle_is_refused_when_the_app_does_not_accept_it(
    store: RedisStore, redis_client: Any
) -> None:
    with pytest.raises(SerializationError, match="does not accept 'pickle'"):
        store.write("k", {1, 2}, serializer="pickle", expires_in=None)
    assert raw_keys(redis_client) == []


def test_pickle_is_used_when_the_app_accepts_it(redis_app_factory: Callable[..., Any]) -> None:
    app = redis_app_factory(result_accept_content=["json", "application/x-python-serialize"])
    store = RedisStore.for_app(app)
    store.write("k", {1, 2}, serializer="pickle", expires_in=None)
    record = store.read("k")
    assert record is not None and record.value == {1, 2}


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04 not a record",
        b'{"status": "SUCCESS", "result": 1}',
        b'{"cte": 1, "key": "k"}',
    ],
    ids=["garbage", "foreign-json", "truncated-envelope"],
)
def test_a_corrupt_or_foreign_record_reads_as_a_miss_with_a_warning(
    store: RedisStore, redis_client: Any, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(store.key_for("cache", "k"), raw)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.read("k") is None
    assert any("'k'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_pickled_record_is_a_miss_for_an_app_that_does_not_accept_pickle(
    store: RedisStore, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    raw = encode_record(
        "k",
        {1, 2},
        serializer="pickle",
        accept={"json", "pickle"},
        created_at=datetime.now(timezone.utc),
    )
    redis_client.set(store.key_for("cache", "k"), raw)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.read("k") is None
    assert "not accepted" in caplog.text


def test_iter_keys_lists_stored_keys_by_prefix(store: RedisStore) -> None:
    for key in ("a:1", "a:2", "b:1", "a*[x]"):
        store.write(key, 1, serializer="json", expires_in=None)
    assert store.iter_keys("a:") == ["a:1", "a:2"]
    assert store.iter_keys("a*") == ["a*[x]"]
    assert store.iter_keys() == ["a*[x]", "a:1", "a:2", "b:1"]


# -- key layout ----------------------------------------------------------------------------


def test_keys_live_in_the_default_namespace_away_from_celerys(
    store: RedisStore, redis_client: Any
) -> None:
    store.write("k", 1, serializer="json", expires_in=None)
    store.acquire_lock("k", "alice", ttl=30)
    store.save_run(make_run("r1"))

    assert raw_keys(redis_client) == [
        "cte:default:cache:k",
        "cte:default:index:all",  # the run index (see run_index)
        "cte:default:index:state:completed",
        "cte:default:index:task:tests.add",
        "cte:default:index:tasks",
        "cte:default:lock:k",
        "cte:default:run:r1",
    ]


def test_two_apps_with_different_namespaces_do_not_share_records(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    first = RedisStore.for_app(redis_app_factory(taskengine_namespace="billing"))
    second = RedisStore.for_app(redis_app_factory(taskengine_namespace="reports"))

    first.write("k", "billing", serializer="json", expires_in=None)
    second.write("k", "reports", serializer="json", expires_in=None)

    assert raw_keys(redis_client) == ["cte:billing:cache:k", "cte:reports:cache:k"]
    first_record, second_record = first.read("k"), second.read("k")
    assert first_record is not None and first_record.value == "billing"
    assert second_record is not None and second_record.value == "reports"


def test_the_backends_global_keyprefix_comes_first(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    app = redis_app_factory(result_backend_transport_options={"global_keyprefix": "tenant1"})
    store = RedisStore.for_app(app)
    store.write("k", 1, serializer="json", expires_in=None)

    assert app.backend.get_key_for_task("id") == b"tenant1_celery-task-meta-id"
    assert raw_keys(redis_client) == ["tenant1_cte:default:cache:k"]


def test_a_namespace_with_a_colon_is_a_configuration_error(
    redis_app_factory: Callable[..., Any],
) -> None:
    app = redis_app_factory(taskengine_namespace="a:cache")
    with pytest.raises(ConfigurationError, match="taskengine_namespace"):
        RedisStore.for_app(app)


# -- locks ---------------------------------------------------------------------------------


def test_a_free_lock_is_acquired_and_a_second_holder_is_refused(store: RedisStore) -> None:
    assert store.acquire_lock("k", "alice", ttl=30) is True
    assert store.acquire_lock("k", "bob", ttl=30) is False
    assert store.acquire_lock("k", "alice", ttl=30) is False
    assert store.lock_holder("k") == "alice"


def test_release_by_the_holder_frees_the_lock(store: RedisStore) -> None:
    store.acquire_lock("k", "alice", ttl=30)
    store.release_lock("k", "alice")
    assert store.lock_holder("k") is None
    assert store.acquire_lock("k", "bob", ttl=30) is True


def test_release_by_another_holder_does_nothing(store: RedisStore) -> None:
    store.acquire_lock("k", "alice", ttl=30)
    store.release_lock("k", "bob")
    assert store.lock_holder("k") == "alice"


def test_a_dead_holders_lock_expires_after_its_ttl(store: RedisStore) -> None:
    store.acquire_lock("k", "dead-worker", ttl=0.2)
    assert store.acquire_lock("k", "bob", ttl=30) is False

    time.sleep(0.3)

    assert store.lock_holder("k") is None
    assert store.acquire_lock("k", "bob", ttl=30) is True


def test_renewing_extends_the_lock(store: RedisStore, redis_client: Any) -> None:
    store.acquire_lock("k", "alice", ttl=0.2)
    assert store.renew_lock("k", "alice", ttl=30) is True
    assert redis_client.pttl(store.key_for("lock", "k")) > 1_000

    time.sleep(0.3)

    assert store.lock_holder("k") == "alice"


def test_renewing_a_lost_or_foreign_lock_fails(store: RedisStore, redis_client: Any) -> None:
    store.acquire_lock("k", "alice", ttl=30)
    assert store.renew_lock("k", "bob", ttl=60) is False
    assert redis_client.pttl(store.key_for("lock", "k")) <= 30_000
    assert store.renew_lock("never-locked", "alice", ttl=60) is False


def test_exactly_one_of_many_contending_threads_gets_the_lock(store: RedisStore) -> None:
    start = threading.Barrier(16)
    winners: list[str] = []
    errors: list[BaseException] = []

    def contend(holder: str) -> None:
        start.wait()
        try:
            if store.acquire_lock("k", holder, ttl=30):
                winners.append(holder)
        except BaseException as exc:  # surfaced below; a thread can't fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"t{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(winners) == 1
    assert store.lock_holder("k") == winners[0]


# -- run records ---------------------------------------------------------------------------


def test_a_saved_run_loads_back_with_its_state_history(store: RedisStore) -> None:
    run = make_run()
    store.save_run(run)

    loaded = store.load_run("run-1")

    assert loaded is not None and loaded is not run
    assert loaded.history_names() == ["Pending", "Running", "Completed"]
    assert [s.timestamp for s in loaded.state_history] == [s.timestamp for s in run.state_history]
    assert loaded.state is not None and loaded.state.data == {"answer": 42}
    assert loaded.parameters == {"x": 1, "y": [2, 3]}
    assert loaded.tags == frozenset({"math"})
    assert (loaded.run_count, loaded.start_time, loaded.end_time) == (
        1,
        run.start_time,
        run.end_time,
    )


def test_an_unknown_run_id_loads_as_none(store: RedisStore) -> None:
    assert store.load_run("nope") is None


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"v": 1, "id": "r"}', b'"a string"'],
    ids=["not-json", "missing-fields", "not-a-document"],
)
def test_a_malformed_run_record_loads_as_none_with_a_warning(
    store: RedisStore, redis_client: Any, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(store.key_for("run", "r"), raw)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_run("r") is None
    assert "'r'" in caplog.text


def test_run_records_live_as_long_as_celery_results(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    store = RedisStore.for_app(redis_app_factory(result_expires=timedelta(hours=1)))
    store.save_run(make_run("r1"))
    assert 3_500_000 < redis_client.pttl(store.key_for("run", "r1")) <= 3_600_000


def test_run_records_never_expire_when_celery_results_do_not(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    store = RedisStore.for_app(redis_app_factory(result_expires=None))
    store.save_run(make_run("r1"))
    assert redis_client.pttl(store.key_for("run", "r1")) == -1


def test_the_run_index_outlives_its_runs_refreshed_once_per_half_lifetime_per_process(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    store = RedisStore.for_app(redis_app_factory(result_expires=timedelta(seconds=2)))
    index_all, tasks = store.key_for("index", "all"), store.key_for("index", "tasks")
    store.save_run(make_run("r1"))
    # Given: the first write gave the index twice a run record's lifetime, and named the task;
    # then the index's keys and the set of task names are lost (a server's data lost).
    assert 2_000 < redis_client.pttl(index_all) <= 4_000
    assert redis_client.smembers(tasks) == {b"tests.add"}
    redis_client.delete(index_all, tasks)

    # When: the same task's run in the same state is written again at once, then after half
    # a record's lifetime.
    store.save_run(make_run("r2"))
    # Then: the first write adds its entries and names its task, without a lifetime (not due
    # yet); listings by task find it; the later write gives the keys their lifetime again.
    assert redis_client.pttl(index_all) == -1
    assert redis_client.smembers(tasks) == {b"tests.add"}
    assert [r.id for r in store.list_runs(10, task="add")] == ["r2", "r1"]
    time.sleep(1.05)
    store.save_run(make_run("r3"))
    assert 3_000 < redis_client.pttl(index_all) <= 4_000


def test_iter_runs_lists_the_most_recently_active_first(store: RedisStore) -> None:
    base = datetime.now(timezone.utc) - timedelta(hours=1)  # within a run record's life
    for run_id, minutes in [("old", 0), ("newest", 20), ("middle", 10)]:
        store.save_run(make_run(run_id, at=base + timedelta(minutes=minutes)))

    assert [r.id for r in store.iter_runs(10)] == ["newest", "middle", "old"]
    assert [r.id for r in store.iter_runs(1)] == ["newest"]
    assert store.iter_runs(0) == []


# -- an unreachable server -----------------------------------------------------------------


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port nobody listens on: bound but not listening, so connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_an_unreachable_redis_raises_store_unavailable_naming_the_url(
    redis_app_factory: Callable[..., Any], dead_port: int
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{dead_port}/0"
    store = RedisStore.for_app(redis_app_factory(result_backend=url))

    with pytest.raises(StoreUnavailableError) as caught:
        store.read("k")

    message = str(caught.value)
    assert f"127.0.0.1:{dead_port}/0" in message
    assert "s3cret" not in message
    assert isinstance(caught.value, ConnectionError)


def test_every_store_operation_reports_an_unreachable_redis(
    redis_app_factory: Callable[..., Any], dead_port: int
) -> None:
    store = RedisStore.for_app(redis_app_factory(result_backend=f"redis://127.0.0.1:{dead_port}"))
    operations: list[Callable[[], object]] = [
        lambda: store.exists("k"),
        lambda: store.write("k", 1, serializer="json", expires_in=None),
        lambda: store.delete("k"),
        lambda: store.acquire_lock("k", "alice", ttl=1),
        lambda: store.renew_lock("k", "alice", ttl=1),
        lambda: store.release_lock("k", "alice"),
        lambda: store.lock_holder("k"),
        lambda: store.save_run(make_run()),
        lambda: store.load_run("r"),
        lambda: store.iter_runs(1),
        lambda: store.iter_keys(),
    ]
    for operation in operations:
        with pytest.raises(StoreUnavailableError):
            operation()


def test_the_json_envelope_is_what_redis_holds(store: RedisStore, redis_client: Any) -> None:
    store.write("k", [1, 2], serializer="json", expires_in=None, task_name="tests.t")
    envelope = json.loads(redis_client.get(store.key_for("cache", "k")))
    assert (envelope["cte"], envelope["key"], envelope["task"]) == (1, "k", "tests.t")
