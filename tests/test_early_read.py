"""Early cache reads: a local cache hit sends its GET before recording Running, on the real Redis.

An early read must answer exactly as a plain read would (hit, miss, expired, corrupt), survive
a connection Redis dropped, and never let an unread answer meet a later read.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from celery_taskengine import task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import encode_record
from celery_taskengine._store.local_records import LocalRunRecorder
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS, CachePolicy, IsolationLevel
from celery_taskengine.states import Completed, State
from celery_taskengine.task_engine import SyncTaskRunEngine


@pytest.fixture
def store(redis_app: Any) -> RedisStore:
    store = store_for_app(redis_app)
    assert isinstance(store, RedisStore)
    return store


def put(store: RedisStore, key: str, value: Any, *, expired: bool = False) -> None:
    now = datetime.now(timezone.utc)
    raw = encode_record(
        key,
        value,
        serializer="json",
        accept=store.accept,
        created_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1) if expired else None,
    )
    store.client.set(store.key_for("cache", key), raw)


def test_an_early_read_answers_as_a_plain_read(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    put(store, "t/hit", {"v": 1})
    put(store, "t/old", 5, expired=True)
    store.client.set(store.key_for("cache", "t/corrupt"), b"\x00not a record")

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        answers = {key: store.start_read(key).result() for key in ("t/hit", "t/old", "t/corrupt")}
        missing = store.start_read("t/missing").result()

    hit = answers["t/hit"]
    assert hit is not None and hit.value == {"v": 1}
    assert hit == store.read("t/hit")
    assert answers["t/old"] is None and answers["t/corrupt"] is None and missing is None
    assert any("t/corrupt" in record.getMessage() for record in caplog.records)


def test_two_early_reads_in_flight_on_one_thread_each_get_their_own_answer(
    store: RedisStore,
) -> None:
    put(store, "t/a", "a")
    put(store, "t/b", "b")

    first, second = store.start_read("t/a"), store.start_read("t/b")

    second_record, first_record = second.result(), first.result()
    assert first_record is not None and first_record.value == "a"
    assert second_record is not None and second_record.value == "b"


def test_a_discarded_read_never_answers_a_later_one(store: RedisStore) -> None:
    put(store, "t/a", "a")
    put(store, "t/b", "b")

    store.start_read("t/a").discard()
    later = store.start_read("t/b").result()

    assert later is not None and later.value == "b"


def test_a_read_on_a_connection_redis_dropped_is_made_again(store: RedisStore) -> None:
    put(store, "t/a", "a")
    assert store.start_read("t/a").result() is not None  # a read connection is kept
    host, port = store.connections._free[-1]._sock.getsockname()[:2]
    assert store.client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1

    again = store.start_read("t/a").result()

    assert again is not None and again.value == "a"


def test_a_local_hit_sends_its_read_before_running_is_recorded(
    redis_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    start_read, record = RedisStore.start_read, LocalRunRecorder.__call__

    def spy_read(self: RedisStore, key: str) -> Any:
        events.append("read sent")
        return start_read(self, key)

    def spy_record(self: LocalRunRecorder, run: TaskRun, state: State) -> None:
        events.append(state.name)
        record(self, run, state)

    monkeypatch.setattr(RedisStore, "start_read", spy_read)
    monkeypatch.setattr(LocalRunRecorder, "__call__", spy_record)

    @task(app=redis_app, name="early.square", cache_policy=INPUTS)
    def square(x: int) -> int:
        return x * x

    assert square(4) == 16
    assert square(4, return_state=True).name == "Cached"
    assert events == [
        *("read sent", "Pending", "Running", "Completed"),
        *("read sent", "Pending", "Running", "Cached"),
    ]


def test_a_read_waits_for_upstream_states_to_be_unwrapped(
    redis_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An upstream state is keyed by its value, known once the inputs are resolved, after
    # Pending: the read goes then, still before Running.
    events: list[str] = []
    start_read, record = RedisStore.start_read, LocalRunRecorder.__call__
    monkeypatch.setattr(
        RedisStore, "start_read", lambda self, key: events.append("read") or start_read(self, key)
    )

    def spy_record(self: LocalRunRecorder, run: TaskRun, state: State) -> None:
        events.append(state.name)
        record(self, run, state)

    monkeypatch.setattr(LocalRunRecorder, "__call__", spy_record)
    square = task(app=redis_app, name="early.upstream", cache_policy=INPUTS)(lambda x: x * x)
    assert square(6) == 36
    events.clear()

    upstream = Completed(data=6)
    assert square(upstream, return_state=True).name == "Cached"
    assert events == ["Pending", "read", "Running", "Cached"]


@pytest.mark.parametrize(
    "options",
    [
        {"refresh_cache": True},
        {"on_running": [lambda task, run, state: None]},
        {"cache_key_fn": lambda context, parameters: f"fixed-{parameters['x']}"},
        {"cache_policy": INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE)},
        {"result_storage_key": "early-{parameters[x]}"},
    ],
    ids=["refresh", "on_running", "cache_key_fn", "serializable", "storage_key"],
)
def test_a_read_that_running_could_change_is_not_sent_early(
    redis_app: Any, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    sent: list[str] = []
    start_read = RedisStore.start_read
    monkeypatch.setattr(
        RedisStore, "start_read", lambda self, key: sent.append(key) or start_read(self, key)
    )
    given = {"cache_policy": INPUTS, **options}
    if "cache_key_fn" in given or "result_storage_key" in given:
        given.pop("cache_policy")

    @task(app=redis_app, name="early.late", **given)
    def square(x: int) -> int:
        return x * x

    assert [square(3), square(3)] == [9, 9]
    assert sent == []


def test_the_step_by_step_engine_sends_no_early_read(
    redis_app: Any, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() is also a public step: nothing would read an answer sent from it.
    sent: list[str] = []
    start_read = RedisStore.start_read
    monkeypatch.setattr(
        RedisStore, "start_read", lambda self, key: sent.append(key) or start_read(self, key)
    )
    square = task(app=redis_app, name="early.steps", cache_policy=INPUTS)(lambda x: x * x)
    assert square(5) == 25
    sent.clear()

    engine = SyncTaskRunEngine(square, {"x": 5})
    with engine.start(), engine.run_context(), engine.transaction_context() as txn:
        engine.call_task_fn(txn)

    assert sent == []
    assert square(5, return_state=True).name == "Cached"
    assert len(sent) == 1  # and this thread's early reads still work


def test_unhashable_inputs_warn_once_per_run(
    redis_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    echo = task(app=redis_app, name="early.unhashable", cache_policy=INPUTS)(lambda x: 1)

    with caplog.at_level(logging.WARNING):
        assert echo(threading.Lock()) == 1

    assert len([r for r in caplog.records if "cannot compute the cache key" in r.getMessage()]) == 1


def test_a_policy_of_your_own_is_not_keyed_early(
    redis_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    @dataclasses.dataclass(frozen=True, slots=True)
    class ByState(CachePolicy):
        def compute_key(self, ctx: Any, inputs: Any) -> str | None:
            seen.append(ctx.task_run.state_name)
            return "fixed"

    t = task(app=redis_app, name="early.own_policy", cache_policy=ByState())(lambda: 1)

    assert t() == 1
    assert seen == ["Running"]  # computed where it always was, not while Pending
