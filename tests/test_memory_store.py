"""The in-process store: encoded records, clock-driven expiry, in-process locks, run records."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import decode_record, encode_record
from celery_taskengine._store.memory import MemoryStore, default_memory_store
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine.errors import SerializationError
from celery_taskengine.states import Completed, Pending, Running

T0 = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds that move only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


def make_run(run_id: str = "run-1") -> TaskRun:
    history = [Pending(), Running(), Completed(data={"answer": 42})]
    return TaskRun(
        id=run_id,
        name=f"add-{run_id}",
        task_name="tests.add",
        parameters={"x": 1, "y": 2},
        run_count=1,
        start_time=history[1].timestamp,
        end_time=history[2].timestamp,
        state=history[-1],
        state_history=history,
    )


# -- cached results ------------------------------------------------------------------------


def test_memory_store_satisfies_the_result_store_protocol(store: MemoryStore) -> None:
    assert isinstance(store, ResultStore)
    assert store.supports_locking is True


def test_a_written_value_reads_back_equal_but_as_a_fresh_copy(store: MemoryStore) -> None:
    items = [1, 2, 3]
    value = {"items": items, "name": "x"}
    store.write("k", value, serializer="json", expires_in=None, task_name="tests.add")

    items.append(4)
    first, second = store.read("k"), store.read("k")

    assert first is not None and second is not None
    assert first.value == {"items": [1, 2, 3], "name": "x"}
    assert first.value is not second.value
    assert first.key == "k"
    assert first.task_name == "tests.add"
    assert first.serializer == "json"
    assert first.created_at == datetime.fromtimestamp(T0, timezone.utc)
    assert first.expires_at is None


def test_a_missing_key_reads_as_none(store: MemoryStore) -> None:
    assert store.read("nothing") is None
    assert store.exists("nothing") is False


def test_a_record_expires_exactly_when_its_lifetime_ends(
    store: MemoryStore, clock: FakeClock
) -> None:
    store.write("k", 1, serializer="json", expires_in=10.0)
    record = store.read("k")
    assert record is not None
    assert record.expires_at == datetime.fromtimestamp(T0 + 10.0, timezone.utc)

    clock.advance(9.999)
    assert store.exists("k")
    assert store.read("k") is not None

    clock.advance(0.001)
    assert not store.exists("k")
    assert store.read("k") is None


def test_a_record_without_expiry_is_kept(store: MemoryStore, clock: FakeClock) -> None:
    store.write("k", "v", serializer="json", expires_in=None)
    clock.advance(10 * 365 * 86_400)
    record = store.read("k")
    assert record is not None and record.value == "v"


def test_a_zero_lifetime_write_clears_the_key(store: MemoryStore) -> None:
    store.write("k", "old", serializer="json", expires_in=None)
    store.write("k", "new", serializer="json", expires_in=0)
    assert store.read("k") is None


def test_a_write_overwrites_the_previous_record(store: MemoryStore) -> None:
    store.write("k", "old", serializer="json", expires_in=None)
    store.write("k", "new", serializer="json", expires_in=None)
    record = store.read("k")
    assert record is not None and record.value == "new"


def test_delete_removes_the_record_and_says_whether_one_was_there(store: MemoryStore) -> None:
    store.write("k", 1, serializer="json", expires_in=None)
    assert store.delete("k") is True
    assert store.read("k") is None
    assert store.delete("k") is False


def test_deleting_an_expired_record_reports_nothing_was_there(
    store: MemoryStore, clock: FakeClock
) -> None:
    store.write("k", 1, serializer="json", expires_in=1.0)
    clock.advance(1.0)
    assert store.delete("k") is False


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (object(), "object")],
    ids=["set", "object"],
)
def test_an_unserialisable_value_raises_naming_its_type_and_writes_nothing(
    store: MemoryStore, value: object, type_name: str
) -> None:
    with pytest.raises(SerializationError) as caught:
        store.write("k", value, serializer="json", expires_in=None, task_name="tests.bad")

    message = str(caught.value)
    assert "'tests.bad'" in message
    assert "'k'" in message
    assert f"'{type_name}'" in message
    assert "'json'" in message
    assert store.read("k") is None
    assert store.iter_keys() == []


def test_an_unserialisable_value_leaves_the_previous_record_in_place(store: MemoryStore) -> None:
    store.write("k", "good", serializer="json", expires_in=None)
    with pytest.raises(SerializationError):
        store.write("k", {1}, serializer="json", expires_in=None)
    record = store.read("k")
    assert record is not None and record.value == "good"


def test_pickle_is_used_when_asked_and_accepted(store: MemoryStore) -> None:
    store.write("k", {1, 2}, serializer="pickle", expires_in=None)
    record = store.read("k")
    assert record is not None
    assert record.value == {1, 2}
    assert record.serializer == "pickle"


def test_pickle_is_refused_when_the_store_does_not_accept_it(clock: FakeClock) -> None:
    json_only = MemoryStore(accept=["json"], clock=clock)
    with pytest.raises(SerializationError, match="does not accept 'pickle'"):
        json_only.write("k", {1, 2}, serializer="pickle", expires_in=None)
    assert json_only.read("k") is None


def test_an_unknown_serializer_is_refused(store: MemoryStore) -> None:
    with pytest.raises(SerializationError, match="'nope'"):
        store.write("k", 1, serializer="nope", expires_in=None)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04 not a record",
        b'{"status": "SUCCESS", "result": 1}',
        b"[1, 2, 3]",
        b'{"cte": 1, "key": "k"}',
        b'{"cte": 99, "key": "k", "serializer": "json", "payload": "1"}',
    ],
    ids=["garbage", "foreign-json", "json-list", "truncated-envelope", "newer-envelope"],
)
def test_a_corrupt_or_foreign_record_reads_as_a_miss_with_a_warning(
    store: MemoryStore, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store.write_raw("k", raw)
    with caplog.at_level(logging.WARNING, logger="celery_taskengine._store.memory"):
        assert store.read("k") is None
    assert any("'k'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_pickled_record_is_not_loaded_by_a_store_that_does_not_accept_pickle(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a record pickled elsewhere, planted where a JSON-only store looks
    raw = encode_record(
        "k",
        ExplodingOnUnpickle(),
        serializer="pickle",
        accept={"json", "pickle"},
        created_at=datetime.fromtimestamp(T0, timezone.utc),
    )
    json_only = MemoryStore(accept=["json"], clock=clock)
    json_only.write_raw("k", raw)

    # When it is read, Then it is a miss with a warning, and the payload was never unpickled
    with caplog.at_level(logging.WARNING, logger="celery_taskengine._store.memory"):
        assert json_only.read("k") is None
    assert "not accepted" in caplog.text
    assert UNPICKLED == []


def test_a_record_written_under_another_key_reads_as_a_miss(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    raw = encode_record(
        "other",
        1,
        serializer="json",
        accept={"json"},
        created_at=datetime.fromtimestamp(T0, timezone.utc),
    )
    store.write_raw("k", raw)
    with caplog.at_level(logging.WARNING, logger="celery_taskengine._store.memory"):
        assert store.read("k") is None
    assert "'other'" in caplog.text


def test_the_envelope_is_self_describing_json() -> None:
    created = datetime.fromtimestamp(T0, timezone.utc)
    raw = encode_record(
        "k",
        [1, "two"],
        serializer="json",
        accept={"json"},
        created_at=created,
        expires_at=created + timedelta(seconds=5),
        task_name="tests.t",
    )
    envelope = json.loads(raw)
    assert envelope["cte"] == 1
    assert envelope["key"] == "k"
    assert envelope["task"] == "tests.t"
    assert envelope["serializer"] == "json"
    assert envelope["content_type"] == "application/json"
    assert envelope["created_at"] == created.isoformat()
    assert decode_record(raw, {"json"}).value == [1, "two"]


def test_iter_keys_lists_unexpired_keys_by_prefix(store: MemoryStore, clock: FakeClock) -> None:
    store.write("a:1", 1, serializer="json", expires_in=None)
    store.write("a:2", 2, serializer="json", expires_in=None)
    store.write("b:1", 3, serializer="json", expires_in=None)
    store.write("a:short", 4, serializer="json", expires_in=1.0)
    clock.advance(1.0)

    assert store.iter_keys("a:") == ["a:1", "a:2"]
    assert store.iter_keys() == ["a:1", "a:2", "b:1"]


# -- locks ---------------------------------------------------------------------------------


def test_a_free_lock_is_acquired_and_a_second_holder_is_refused(store: MemoryStore) -> None:
    assert store.acquire_lock("k", "alice", ttl=30) is True
    assert store.acquire_lock("k", "bob", ttl=30) is False
    assert store.lock_holder("k") == "alice"


def test_a_lock_is_not_reentrant(store: MemoryStore) -> None:
    assert store.acquire_lock("k", "alice", ttl=30) is True
    assert store.acquire_lock("k", "alice", ttl=30) is False


def test_release_by_the_holder_frees_the_lock(store: MemoryStore) -> None:
    store.acquire_lock("k", "alice", ttl=30)
    store.release_lock("k", "alice")
    assert store.lock_holder("k") is None
    assert store.acquire_lock("k", "bob", ttl=30) is True


def test_release_by_another_holder_does_nothing(store: MemoryStore) -> None:
    store.acquire_lock("k", "alice", ttl=30)
    store.release_lock("k", "bob")
    assert store.lock_holder("k") == "alice"


def test_a_dead_holders_lock_expires_after_its_ttl(store: MemoryStore, clock: FakeClock) -> None:
    store.acquire_lock("k", "dead-worker", ttl=5)
    clock.advance(4.999)
    assert store.acquire_lock("k", "bob", ttl=5) is False

    clock.advance(0.001)
    assert store.lock_holder("k") is None
    assert store.acquire_lock("k", "bob", ttl=5) is True


def test_renewing_extends_the_lock_from_now(store: MemoryStore, clock: FakeClock) -> None:
    store.acquire_lock("k", "alice", ttl=5)
    clock.advance(4)
    assert store.renew_lock("k", "alice", ttl=5) is True

    clock.advance(4)
    assert store.lock_holder("k") == "alice"
    clock.advance(1)
    assert store.lock_holder("k") is None


def test_renewing_a_lost_or_foreign_lock_fails(store: MemoryStore, clock: FakeClock) -> None:
    store.acquire_lock("k", "alice", ttl=5)
    assert store.renew_lock("k", "bob", ttl=60) is False

    clock.advance(5)
    assert store.renew_lock("k", "alice", ttl=60) is False
    assert store.renew_lock("never-locked", "alice", ttl=60) is False


def test_a_released_expired_lock_does_not_free_a_newer_holder(
    store: MemoryStore, clock: FakeClock
) -> None:
    store.acquire_lock("k", "slow", ttl=1)
    clock.advance(1)
    store.acquire_lock("k", "fast", ttl=30)

    store.release_lock("k", "slow")

    assert store.lock_holder("k") == "fast"


def test_a_lock_needs_a_positive_ttl(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lock("k", "alice", ttl=0)


def test_exactly_one_of_many_contending_threads_gets_the_lock() -> None:
    store = MemoryStore()
    start = threading.Barrier(16)
    winners: list[str] = []

    def contend(holder: str) -> None:
        start.wait()
        if store.acquire_lock("k", holder, ttl=30):
            winners.append(holder)

    threads = [threading.Thread(target=contend, args=(f"t{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(winners) == 1
    assert store.lock_holder("k") == winners[0]


# -- run records ---------------------------------------------------------------------------


def test_a_saved_run_loads_back_as_the_same_object(store: MemoryStore) -> None:
    run = make_run()
    store.save_run(run)
    loaded = store.load_run("run-1")
    assert loaded is run
    assert loaded.history_names() == ["Pending", "Running", "Completed"]


def test_an_unknown_run_id_loads_as_none(store: MemoryStore) -> None:
    assert store.load_run("nope") is None


def test_the_run_bound_drops_the_oldest_runs_first(clock: FakeClock) -> None:
    store = MemoryStore(max_runs=3, clock=clock)
    for i in range(5):
        store.save_run(make_run(f"r{i}"))

    assert store.load_run("r0") is None
    assert store.load_run("r1") is None
    assert [r.id for r in store.iter_runs(10)] == ["r4", "r3", "r2"]


def test_saving_a_run_again_makes_it_the_most_recent(clock: FakeClock) -> None:
    store = MemoryStore(max_runs=3, clock=clock)
    first = make_run("r0")
    store.save_run(first)
    store.save_run(make_run("r1"))
    store.save_run(make_run("r2"))

    store.save_run(first)  # its next state change
    store.save_run(make_run("r3"))

    assert store.load_run("r0") is first
    assert store.load_run("r1") is None
    assert [r.id for r in store.iter_runs(2)] == ["r3", "r0"]


def test_iter_runs_with_no_room_is_empty(store: MemoryStore) -> None:
    store.save_run(make_run())
    assert store.iter_runs(0) == []


def test_a_run_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_runs"):
        MemoryStore(max_runs=0)


def test_the_default_memory_store_is_one_per_process() -> None:
    assert default_memory_store() is default_memory_store()
    assert isinstance(default_memory_store(), MemoryStore)


UNPICKLED: list[str] = []


class ExplodingOnUnpickle:
    """Pickles fine; unpickling it leaves a trace in ``UNPICKLED``."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_note_unpickled, ("a payload that was not accepted",))


def _note_unpickled(what: str) -> None:
    UNPICKLED.append(what)
