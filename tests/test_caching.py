"""Transaction-keyed caching (SPEC §6) through the engine, on a real Redis result backend.

Every task here belongs to a Celery app whose result backend is a private Redis database, so
``t(...)`` caches on Redis exactly as a producer or worker of that app would.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celery_taskengine import get_task_run, task
from celery_taskengine._store.cache_codec import encode_record
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import DEFAULT, INPUTS, NO_CACHE, TASK_SOURCE
from celery_taskengine.states import Completed, Failed, State
from celery_taskengine.task_engine import run_task_async, run_task_sync

# -- helpers -------------------------------------------------------------------------------


def run_and_history(t: Any, **parameters: Any) -> tuple[State, list[str]]:
    """Run ``t`` locally (as ``t(...)`` does) and read its run record back from the store."""
    run_id = uuid.uuid4().hex
    if t.isasync:
        coroutine = run_task_async(t, run_id, parameters=parameters, return_type="state")
        state = asyncio.run(coroutine)
    else:
        state = run_task_sync(t, run_id, parameters=parameters, return_type="state")
    run = get_task_run(run_id, app=t.app)
    assert run is not None, f"no run record for {run_id}"
    return state, [s.name for s in run.state_history]


def names_of_runs(t: Any, *calls: dict[str, Any]) -> list[str]:
    """The final state names of one run per ``calls`` item, in order."""
    return [run_and_history(t, **parameters)[0].name for parameters in calls]


def cache_keys(store: RedisStore) -> list[str]:
    return store.iter_keys()


@pytest.fixture
def store(redis_app: Any) -> RedisStore:
    chosen = store_for_app(redis_app)
    assert isinstance(chosen, RedisStore)
    return chosen


class Counter:
    """Counts calls of the task function, across threads."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, item: Any) -> int:
        with self._lock:
            self.calls.append(item)
            return len(self.calls)


# -- hits and misses -------------------------------------------------------------------------


def test_a_second_call_with_equal_inputs_is_cached_with_the_first_value(redis_app: Any) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def add(x: int, y: int) -> dict[str, Any]:
        count((x, y))
        return {"sum": x + y, "items": [x, y]}

    first, first_history = run_and_history(add, x=1, y=2)
    second, second_history = run_and_history(add, x=1, y=2)

    assert first_history == ["Pending", "Running", "Completed"]
    assert second_history == ["Pending", "Running", "Cached"]
    assert second.is_completed()
    assert second.data == {"sum": 3, "items": [1, 2]}
    assert second.data is not first.data  # decoded from the store, not the object returned
    assert count.calls == [(1, 2)]


def test_a_cache_hit_returns_what_the_store_holds(redis_app: Any, store: RedisStore) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def square(x: int) -> int:
        return x * x

    assert square(3) == 9
    [key] = cache_keys(store)
    store.write(key, 1000, serializer="json", expires_in=None)

    assert square(3) == 1000


def test_different_inputs_miss_the_cache(redis_app: Any) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def double(x: int) -> int:
        count(x)
        return 2 * x

    names = names_of_runs(double, {"x": 1}, {"x": 2}, {"x": 1}, {"x": 2})

    assert names == ["Completed", "Completed", "Cached", "Cached"]
    assert count.calls == [1, 2]


def test_the_order_keyword_arguments_are_given_in_does_not_change_the_key(
    redis_app: Any,
) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def pair(a: int, b: int) -> list[int]:
        return [a, b]

    assert pair(a=1, b=2) == [1, 2]
    assert pair(b=2, a=1, return_state=True).name == "Cached"


def test_the_record_is_json_in_the_taskengine_namespace(
    redis_app: Any, redis_client: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def greet(name: str) -> str:
        return f"hello {name}"

    greet("ada")

    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert keys, "nothing was written"
    assert all(k.startswith("cte:") for k in keys), keys
    [key] = cache_keys(store)
    raw = redis_client.get(store.key_for("cache", key))
    assert b'"serializer":"json"' in raw
    assert b'"payload":"\\"hello ada\\""' in raw


# -- expiry and refresh ----------------------------------------------------------------------


def test_an_expired_record_is_a_miss_and_is_rewritten(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS, cache_expiration=0.2)
    def stamp(x: int) -> int:
        return count(x)

    assert names_of_runs(stamp, {"x": 1}, {"x": 1}) == ["Completed", "Cached"]
    [key] = cache_keys(store)
    before = store.read(key)
    time.sleep(0.25)

    after_expiry, history = run_and_history(stamp, x=1)
    rewritten = store.read(key)
    again, _ = run_and_history(stamp, x=1)

    assert history == ["Pending", "Running", "Completed"]
    assert after_expiry.data == 2
    assert before is not None and rewritten is not None
    assert rewritten.value == 2
    assert rewritten.created_at > before.created_at
    assert (again.name, again.data) == ("Cached", 2)


def test_a_negative_expiration_never_reuses_a_result(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS, cache_expiration=-1)
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]


def test_refresh_cache_always_runs_and_overwrites_for_later_readers(redis_app: Any) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS, name="tests.refresh.stamp")
    def stamp(x: int) -> int:
        return count(x)

    refreshing = stamp.with_options(refresh_cache=True)

    assert run_and_history(stamp, x=1)[0].data == 1
    refreshed = [run_and_history(refreshing, x=1)[0] for _ in range(2)]
    reader, _ = run_and_history(stamp, x=1)

    assert [(s.name, s.data) for s in refreshed] == [("Completed", 2), ("Completed", 3)]
    assert (reader.name, reader.data) == ("Cached", 3)


def test_a_failed_refresh_leaves_the_old_record(redis_app: Any) -> None:
    failing = threading.Event()

    @task(app=redis_app, cache_policy=INPUTS, name="tests.refresh.flaky")
    def flaky(x: int) -> str:
        if failing.is_set():
            raise RuntimeError("refresh failed")
        return f"good {x}"

    refreshing = flaky.with_options(refresh_cache=True)
    assert flaky(1) == "good 1"
    failing.set()

    refresh, _ = run_and_history(refreshing, x=1)
    reader, _ = run_and_history(flaky, x=1)

    assert refresh.name == "Failed"
    assert (reader.name, reader.data) == ("Cached", "good 1")


# -- what is never cached --------------------------------------------------------------------


def test_a_raised_failure_is_never_cached(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def first_call_fails(x: int) -> int:
        if count(x) == 1:
            raise ValueError("first call fails")
        return x

    failed, _ = run_and_history(first_call_fails, x=5)
    assert failed.name == "Failed"
    assert cache_keys(store) == []

    assert names_of_runs(first_call_fails, {"x": 5}, {"x": 5}) == ["Completed", "Cached"]


def test_a_returned_failed_state_is_never_cached(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def reports_failure(x: int) -> State:
        count(x)
        return Failed(message="not today")

    assert names_of_runs(reports_failure, {"x": 1}, {"x": 1}) == ["Failed", "Failed"]
    assert count.calls == [1, 1]
    assert cache_keys(store) == []


def test_a_returned_completed_state_is_cached_by_its_data(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def reports_success(x: int) -> State:
        return Completed(data={"x": x})

    first, _ = run_and_history(reports_success, x=1)
    second, _ = run_and_history(reports_success, x=1)

    assert (second.name, second.data) == ("Cached", {"x": 1})
    assert first.data == second.data


# -- the key ---------------------------------------------------------------------------------


def test_an_upstream_state_argument_is_keyed_by_its_value(redis_app: Any) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def upstream(x: int) -> int:
        return x

    @task(app=redis_app, cache_policy=INPUTS)
    def downstream(x: int) -> int:
        count(x)
        return x * 2

    first = upstream(1, return_state=True)
    second = upstream(1, return_state=True)  # an equal value in a different State object
    assert first.timestamp != second.timestamp

    names = names_of_runs(downstream, {"x": first}, {"x": second}, {"x": 1})

    assert names == ["Completed", "Cached", "Cached"]
    assert count.calls == [1]


def test_an_excluded_input_does_not_change_the_key(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS - "verbose")
    def compute(x: int, verbose: bool) -> int:
        return x * 10

    assert names_of_runs(compute, {"x": 1, "verbose": False}, {"x": 1, "verbose": True}) == [
        "Completed",
        "Cached",
    ]
    assert names_of_runs(compute, {"x": 2, "verbose": True}) == ["Completed"]


def test_two_tasks_with_equal_inputs_do_not_share_policy_keys(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def plus_one(x: int) -> int:
        return x + 1

    @task(app=redis_app, cache_policy=INPUTS)
    def minus_one(x: int) -> int:
        return x - 1

    assert plus_one(10) == 11
    assert run_and_history(minus_one, x=10)[0].name == "Completed"
    assert minus_one(10) == 9


def test_tasks_sharing_a_cache_key_fn_share_the_entry(redis_app: Any) -> None:
    def key(context: Any, parameters: dict[str, Any]) -> str:
        return f"shared-{parameters['x']}"

    @task(app=redis_app, cache_key_fn=key)
    def producer(x: int) -> str:
        return f"made by producer for {x}"

    @task(app=redis_app, cache_key_fn=key)
    def consumer(x: int) -> str:
        return f"made by consumer for {x}"

    producer(7)
    state, _ = run_and_history(consumer, x=7)

    assert (state.name, state.data) == ("Cached", "made by producer for 7")


def test_tasks_sharing_a_result_storage_key_share_the_entry(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, result_storage_key="k-{parameters[x]}")
    def producer(x: int) -> str:
        return f"made by producer for {x}"

    @task(app=redis_app, result_storage_key="k-{parameters[x]}")
    def consumer(x: int) -> str:
        return f"made by consumer for {x}"

    producer(7)
    state, _ = run_and_history(consumer, x=7)

    assert cache_keys(store) == ["k-7"]
    assert (state.name, state.data) == ("Cached", "made by producer for 7")


def test_a_cache_key_fn_returning_none_runs_uncached(redis_app: Any, store: RedisStore) -> None:
    @task(app=redis_app, cache_key_fn=lambda context, parameters: None)
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]
    assert cache_keys(store) == []


def test_task_source_keys_on_the_function_text(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=TASK_SOURCE, name="tests.source.versioned")
    def versioned() -> str:
        return "v1"

    versioned()

    @task(app=redis_app, cache_policy=TASK_SOURCE, name="tests.source.versioned")
    def versioned_edited() -> str:
        return "v2"  # an edited body is a new key

    assert run_and_history(versioned_edited)[0].name == "Completed"
    assert run_and_history(versioned)[0].name == "Cached"


def test_persist_result_false_disables_caching(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS, persist_result=False)
    def echo(x: int) -> int:
        count(x)
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]
    assert count.calls == [1, 1]
    assert cache_keys(store) == []


@pytest.mark.parametrize(
    "options",
    [{"cache_policy": DEFAULT}, {"persist_result": True}],
    ids=["explicit-DEFAULT", "implicit-DEFAULT"],
)
def test_the_default_policy_never_hits_locally(
    redis_app: Any, store: RedisStore, options: dict[str, Any]
) -> None:
    count = Counter()

    @task(app=redis_app, **options)
    def echo(x: int) -> int:
        count(x)
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]
    assert count.calls == [1, 1]
    assert len(cache_keys(store)) == 2  # each run keyed by its own run id


def test_a_task_without_caching_options_writes_nothing(redis_app: Any, store: RedisStore) -> None:
    @task(app=redis_app)
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]
    assert cache_keys(store) == []


def test_no_cache_never_writes(redis_app: Any, store: RedisStore) -> None:
    @task(app=redis_app, cache_policy=NO_CACHE)
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Completed"]
    assert cache_keys(store) == []


def test_unhashable_inputs_warn_and_run_uncached(
    redis_app: Any, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    def guarded(x: int, lock: Any) -> int:
        count(x)
        return x

    lock = threading.Lock()
    with caplog.at_level(logging.WARNING):
        names = names_of_runs(guarded, {"x": 1, "lock": lock}, {"x": 1, "lock": lock})

    assert names == ["Completed", "Completed"]
    assert count.calls == [1, 1]
    assert cache_keys(store) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot compute the cache key" in w and "NO_CACHE" in w for w in warnings), warnings


def test_excluding_the_unhashable_input_makes_the_task_cacheable(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS - "lock")
    def guarded(x: int, lock: Any) -> int:
        return x

    lock = threading.Lock()
    assert names_of_runs(guarded, {"x": 1, "lock": lock}, {"x": 1, "lock": lock}) == [
        "Completed",
        "Cached",
    ]


# -- corrupt and foreign records -------------------------------------------------------------


def _foreign_envelope_for_another_key(store: RedisStore) -> bytes:
    return encode_record(
        "some-other-key",
        "not yours",
        serializer="json",
        accept=["json"],
        created_at=store._now(),
    )


def _pickled_envelope(key: str, store: RedisStore) -> bytes:
    return encode_record(
        key, {"planted": True}, serializer="pickle", accept=["pickle"], created_at=store._now()
    )


@pytest.mark.parametrize(
    "garbage",
    [
        lambda key, store: b"\x80\x04not json at all",
        lambda key, store: b'{"status": "SUCCESS", "result": 42}',
        lambda key, store: b'{"cte": 99, "key": "newer envelope"}',
        lambda key, store: _foreign_envelope_for_another_key(store),
        _pickled_envelope,
    ],
    ids=["binary", "foreign-json", "newer-envelope", "other-key", "unaccepted-pickle"],
)
def test_a_corrupt_or_foreign_record_is_a_miss_with_a_warning(
    redis_app: Any,
    redis_client: Any,
    store: RedisStore,
    caplog: pytest.LogCaptureFixture,
    garbage: Callable[[str, RedisStore], bytes],
) -> None:
    @task(app=redis_app, cache_key_fn=lambda context, parameters: f"report-{parameters['x']}")
    def report(x: int) -> str:
        return f"fresh {x}"

    redis_client.set(store.key_for("cache", "report-1"), garbage("report-1", store))

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        state, history = run_and_history(report, x=1)

    assert history == ["Pending", "Running", "Completed"]
    assert state.data == "fresh 1"
    assert any("report-1" in r.getMessage() for r in caplog.records if r.levelno >= 30)
    rewritten = store.read("report-1")
    assert rewritten is not None and rewritten.value == "fresh 1"
    assert report(1, return_state=True).name == "Cached"


def test_an_app_without_a_result_backend_caches_in_process_memory() -> None:
    from celery import Celery

    from celery_taskengine._store.memory import default_memory_store

    app = Celery("no-backend", set_as_current=False)
    count = Counter()

    key = f"tests-memory-{uuid.uuid4().hex}"

    @task(app=app, cache_key_fn=lambda context, parameters: key)
    def remembered() -> list[int]:
        count(None)
        return [1, 2]

    try:
        first, second = remembered(), remembered(return_state=True)
    finally:
        app.close()

    assert store_for_app(app) is default_memory_store()
    assert (second.name, second.data) == ("Cached", [1, 2])
    assert second.data is not first
    assert len(count.calls) == 1
    assert default_memory_store().delete(key)


def test_a_policys_key_storage_holds_its_records_instead_of_the_backend(
    redis_app: Any, store: RedisStore
) -> None:
    from celery_taskengine._store.memory import MemoryStore

    elsewhere = MemoryStore()

    @task(app=redis_app, cache_policy=INPUTS.configure(key_storage=elsewhere))
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}, {"x": 1}) == ["Completed", "Cached"]
    assert len(elsewhere.iter_keys()) == 1
    assert cache_keys(store) == []


def test_each_attempt_reads_its_key_once_whether_it_hits_or_misses(redis_app: Any) -> None:
    from celery_taskengine._store.memory import MemoryStore

    class CountingStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def read(self, key: str) -> Any:
            self.reads += 1
            return super().read(key)

    counting = CountingStore()

    @task(app=redis_app, cache_policy=INPUTS.configure(key_storage=counting))
    def echo(x: int) -> int:
        return x

    assert names_of_runs(echo, {"x": 1}) == ["Completed"]
    assert counting.reads == 1
    assert names_of_runs(echo, {"x": 1}) == ["Cached"]
    assert counting.reads == 2


# -- serializers -----------------------------------------------------------------------------


def test_a_result_json_cannot_encode_warns_and_is_returned_uncached(
    redis_app: Any, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def members(x: int) -> set[int]:
        return {x, x + 1}

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        first = members(1, return_state=True)
    second = members(1, return_state=True)

    assert (first.name, first.data) == ("Completed", {1, 2})
    assert second.name == "Completed"
    assert cache_keys(store) == []
    assert any("could not be serialized" in r.getMessage() for r in caplog.records)


def test_pickle_is_refused_when_the_app_does_not_accept_it(
    redis_app: Any, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    @task(app=redis_app, cache_policy=INPUTS, result_serializer="pickle")
    def members(x: int) -> set[int]:
        return {x}

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        state = members(1, return_state=True)

    assert (state.name, state.data) == ("Completed", {1})
    assert cache_keys(store) == []
    assert any("result_accept_content" in r.getMessage() for r in caplog.records)


def test_pickle_caches_values_json_cannot_when_the_app_accepts_it(
    redis_app_factory: Callable[..., Any], redis_client: Any
) -> None:
    app = redis_app_factory(result_accept_content=["json", "pickle"])
    store = store_for_app(app)
    assert isinstance(store, RedisStore)

    @task(app=app, cache_policy=INPUTS, result_serializer="pickle")
    def members(x: int) -> set[int]:
        return {x, x + 1}

    assert members(1) == {1, 2}
    state, history = run_and_history(members, x=1)

    assert history == ["Pending", "Running", "Cached"]
    assert state.data == {1, 2}
    [key] = store.iter_keys()
    assert b'"serializer":"pickle"' in redis_client.get(store.key_for("cache", key))


def test_the_result_serializer_option_defaults_to_json(redis_app: Any) -> None:
    @task(app=redis_app, cache_policy=INPUTS)
    def echo(x: int) -> int:
        return x

    assert echo.engine_options.result_serializer == "json"


# -- async tasks -----------------------------------------------------------------------------


def test_an_async_task_caches_like_a_sync_one(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS - "note", cache_expiration=60)
    async def fetch(x: int, note: str = "") -> dict[str, int]:
        await asyncio.sleep(0)
        count(x)
        return {"x": x}

    first, first_history = run_and_history(fetch, x=1, note="a")
    second, second_history = run_and_history(fetch, x=1, note="b")
    third = asyncio.run(fetch(2))

    assert first_history == ["Pending", "Running", "Completed"]
    assert second_history == ["Pending", "Running", "Cached"]
    assert second.data == first.data and second.data is not first.data
    assert third == {"x": 2}
    assert count.calls == [1, 2]
    assert len(cache_keys(store)) == 2


def test_an_async_task_never_caches_a_failure(redis_app: Any, store: RedisStore) -> None:
    count = Counter()

    @task(app=redis_app, cache_policy=INPUTS)
    async def first_call_fails(x: int) -> int:
        if count(x) == 1:
            raise ValueError("first call fails")
        return x

    assert run_and_history(first_call_fails, x=1)[0].name == "Failed"
    assert cache_keys(store) == []
    assert names_of_runs(first_call_fails, {"x": 1}, {"x": 1}) == ["Completed", "Cached"]
