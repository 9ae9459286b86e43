"""The bridge's pieces on their own: state events, backend task states, run documents, the
Redis record channel, the per-process loop, and the producer's cache-key check.

The bridge as a whole is tested with real workers in ``test_bridge_brokers.py``,
``test_bridge_threads.py`` and ``test_bridge_processes.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app.task import Context
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_taskengine import cache_policies as cp
from celery_taskengine import stream, task
from celery_taskengine._celery.engine_backend import CLAIM
from celery_taskengine._celery.events import event_fields, event_type
from celery_taskengine._celery.worker_loop import run_on_worker_loop
from celery_taskengine._engine.observers import RunObservers
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._engine.transaction_keys import (
    key_may_ignore_run_id as _key_may_ignore_run_id,
)
from celery_taskengine._store.claims import Claim, claim_or_wait, is_done
from celery_taskengine._store.record_channel import RecordChannel
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.renewer import renewer
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.task_meta import celery_status, write_task_meta
from celery_taskengine._store.worker_records import Delivery, delivery_observers
from celery_taskengine.errors import ConfigurationError, StoreUnavailableError, TaskRunTimeoutError
from celery_taskengine.states import (
    AwaitingRetry,
    Cached,
    Cancelled,
    Completed,
    Crashed,
    Failed,
    NotReady,
    Pending,
    Retrying,
    Running,
    State,
    StateType,
    TimedOut,
    utcnow,
)

# -- events -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (Pending(), None),
        (Running(), None),
        (Completed(1), None),
        (Failed(ValueError()), None),
        (Cancelled(), None),
        (AwaitingRetry(utcnow()), "task-awaiting-retry"),
        (Retrying(), "task-retrying"),
        (Cached(1), "task-cached"),
        (TimedOut(TimeoutError()), "task-timed-out"),
        (Crashed(KeyboardInterrupt()), "task-crashed"),
        (NotReady(), "task-not-ready"),
        (State(StateType.COMPLETED, "Skipped"), "task-skipped"),
    ],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_states_without_a_celery_twin_have_their_own_event(
    state: State, expected: str | None
) -> None:
    assert event_type(state) == expected


@pytest.mark.parametrize("name", ["Retry", "Retried", "Success", "Succeeded", "Revoked", "-"])
def test_a_state_named_like_a_celery_event_is_never_announced(name: str) -> None:
    assert event_type(State(StateType.COMPLETED, name)) is None


def test_event_fields_carry_engine_fields_and_never_state_or_worker() -> None:
    run = TaskRun(id="r", name="t", task_name="t", run_count=1)
    awaiting = AwaitingRetry(utcnow() + timedelta(seconds=2))

    fields = event_fields(run, awaiting)

    assert fields["engine_state"] == "AwaitingRetry"
    assert fields["run_count"] == 1
    assert fields["retries"] == 0
    assert fields["eta"] == awaiting.scheduled_time.isoformat()  # type: ignore[union-attr]
    assert not {"state", "worker"} & set(fields)


# -- backend task states ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (Pending(), None),
        (Running(), "RUNNING"),
        (Retrying(), "RETRYING"),
        (AwaitingRetry(utcnow()), "AWAITING_RETRY"),
        (NotReady(), "NOT_READY"),
        (Crashed(), "CRASHED"),
        (Completed(1), None),
        (Cached(1), None),
        (Failed(), None),
        (TimedOut(), None),
        (Cancelled(), None),
    ],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_the_backend_shows_engine_states_celery_does_not_write_itself(
    state: State, status: str | None
) -> None:
    assert celery_status(state) == status


def test_an_engine_state_never_overwrites_a_finished_tasks_result(redis_app: Celery) -> None:
    redis_app.backend.store_result("done", 42, "SUCCESS")

    assert not write_task_meta(redis_app, "done", "RUNNING", {})
    assert redis_app.AsyncResult("done").get(timeout=1) == 42


def test_awaiting_retry_replaces_only_the_retry_state_celery_stored(redis_app: Celery) -> None:
    backend = redis_app.backend
    backend.mark_as_retry("waiting", None)
    backend.store_result("running", {}, "RUNNING")

    assert write_task_meta(redis_app, "waiting", "AWAITING_RETRY", {}, expected="RETRY")
    assert not write_task_meta(redis_app, "running", "AWAITING_RETRY", {}, expected="RETRY")
    assert redis_app.AsyncResult("waiting").state == "AWAITING_RETRY"
    assert redis_app.AsyncResult("running").state == "RUNNING"


def test_a_timeout_survives_celerys_json_exception_round_trip(redis_app: Celery) -> None:
    backend = redis_app.backend
    stored = json.loads(json.dumps(backend.prepare_exception(TaskRunTimeoutError(0.5))))

    rebuilt = backend.exception_to_python(stored)

    assert isinstance(rebuilt, TaskRunTimeoutError)
    assert rebuilt.timeout_seconds == 0.5
    assert str(rebuilt) == "Scope timed out after 0.5 second(s)."


# -- run documents ------------------------------------------------------------------------------


def test_an_incremental_run_document_matches_the_run_records_own() -> None:
    run = TaskRun(id="r", name='a "name"', task_name="t", parameters={"x": 1, "s": {1, 2}})
    document = RunDocument(run)
    states = [
        Pending(),
        Running(),
        Failed(ValueError("boom"), message="Task run encountered an exception"),
        AwaitingRetry(utcnow() + timedelta(seconds=1)),
        Retrying(),
        Completed({"total": [1, 2]}),
    ]
    for state in states:
        run.state = state
        run.state_history.append(state)
        run.start_time = run.start_time or state.timestamp
        run.end_time = state.timestamp if state.is_final() else None

        assert json.loads(document.encode(run)) == run.to_document()


# -- the record channel -------------------------------------------------------------------------


def test_a_held_write_reaches_redis_with_the_deliverys_next_write(redis_client: Any) -> None:
    channel = RecordChannel(redis_client)
    writer = channel.writer("run")

    writer.send([("SET", "first", "1")], hold=True)
    writer.send([("SET", "second", "2")])
    writer.confirm()
    channel.send_blocking(("SET", "third", "3"))

    assert redis_client.mget("first", "second", "third") == [b"1", b"2", b"3"]


def test_a_piggybacked_write_rides_on_the_pools_next_command(redis_client: Any) -> None:
    channel = RecordChannel(redis_client)
    redis_client.ping()  # an idle connection in the pool, as Celery's backend has one

    channel.send(("SET", "record", "saved"), piggyback=True)

    assert redis_client.get("record") == b"saved"


def kill_connection(client: Any, client_id: int) -> None:
    """Have Redis close ``client``'s connection ``client_id``, unknown to the client."""
    kwargs = client.connection_pool.connection_kwargs
    with redis.Redis(host=kwargs["host"], port=kwargs["port"]) as other:
        other.client_kill_filter(_id=client_id)


def test_a_write_queued_on_a_connection_redis_then_drops_is_sent_again(
    redis_client: Any,
) -> None:
    # Given: a record queued on the pool's idle connection, not yet read by Redis.
    channel = RecordChannel(redis_client)
    client_id = redis_client.client_id()
    channel.send(("SET", "record", "final"), key="record", piggyback=True)

    # When: Redis drops that connection; the next command finds out and reconnects.
    kill_connection(redis_client, client_id)
    redis_client.ping()

    # Then: the write became an orphan, and the delivery's end writes it.
    assert channel.has_orphans and redis_client.get("record") is None
    channel.resend_orphans(patience=5.0)
    assert redis_client.get("record") == b"final" and not channel.has_orphans


def test_a_newer_write_of_a_record_supersedes_its_orphan(redis_client: Any) -> None:
    channel = RecordChannel(redis_client)
    client_id = redis_client.client_id()
    channel.send(("SET", "record", "running"), key="record", piggyback=True)
    kill_connection(redis_client, client_id)
    redis_client.ping()

    channel.send(("SET", "record", "final"), key="record", piggyback=True)
    channel.resend_orphans(patience=5.0)

    assert redis_client.get("record") == b"final"


def test_a_write_to_a_connection_redis_killed_still_arrives(redis_client: Any) -> None:
    channel = RecordChannel(redis_client)
    channel.send(("SET", "before", "1"))
    redis_client.client_kill_filter(_type="normal", skipme=True)

    channel.send(("SET", "after", "2"))
    redis_client.ping()  # our writes skip replies: a round trip later they were read

    assert redis_client.get("after") == b"2"


def test_a_write_while_redis_is_down_fails_with_a_clear_error_after_its_patience() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))  # fail each try at once
    channel = RecordChannel(client, patience=0.2)

    with pytest.raises(StoreUnavailableError, match="cannot write run records to Redis"):
        channel.send(("SET", "record", "x"))


def test_a_blocking_write_reports_a_failed_command(redis_client: Any) -> None:
    channel = RecordChannel(redis_client)
    redis_client.set("text", "x")

    with pytest.raises(Exception, match="WRONGTYPE"):
        channel.send_blocking(("LPUSH", "text", "y"), ("SET", "after", "1"))
    assert redis_client.get("after") == b"1"  # the connection stayed in step


# -- the worker's event loop --------------------------------------------------------------------


def test_coroutines_from_any_thread_run_on_one_loop_per_process() -> None:
    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    seen: list[int] = [run_on_worker_loop(loop_id())]
    thread = threading.Thread(target=lambda: seen.append(run_on_worker_loop(loop_id())))
    thread.start()
    thread.join()

    assert len(seen) == 2
    assert seen[0] == seen[1]


# -- the producer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "storage_key", "known_before_the_run"),
    [
        (cp.INPUTS, None, True),
        (cp.INPUTS + cp.TASK_SOURCE, None, True),
        (cp.DEFAULT, None, False),
        (cp.RUN_ID, None, False),
        (cp.INPUTS - "x", None, True),
        (None, "report-{parameters[day]}", True),
        (None, "report-{run_id}", False),
    ],
)
def test_a_key_is_known_at_send_time_only_without_a_run_id_part(
    policy: cp.CachePolicy | None, storage_key: str | None, known_before_the_run: bool
) -> None:
    assert _key_may_ignore_run_id(policy, storage_key) is known_before_the_run


def test_stream_needs_a_redis_result_backend() -> None:
    app = Celery("no-backend", set_as_current=False)

    with pytest.raises(ConfigurationError, match="Redis result backend"):
        next(stream(app.AsyncResult("some-id")))


# -- delivery claims ----------------------------------------------------------------------------


def _claim(client: Any, ttl: float = 5.0) -> Claim:
    return RedisStore(client).new_claim("t", 0, ttl)


def test_a_delivery_claims_a_free_message(redis_client: Any) -> None:
    claim = _claim(redis_client)

    assert claim_or_wait(redis_client, claim, poll=0.01)
    assert redis_client.get(claim.key) == claim.token.encode()


def test_a_duplicate_delivery_waits_for_the_holder_and_then_has_nothing_to_do(
    redis_client: Any,
) -> None:
    holder, duplicate = _claim(redis_client), _claim(redis_client)
    assert claim_or_wait(redis_client, holder, poll=0.01)
    settle = holder.record_command(holder.key + ":run", "{}", "0", settle=True)
    timer = threading.Timer(0.2, lambda: redis_client.execute_command(*settle))
    timer.start()
    try:
        assert not claim_or_wait(redis_client, duplicate, poll=0.01)
    finally:
        timer.join()
    assert is_done(redis_client.get(holder.key))


def test_a_crashed_holders_claim_lapses_and_is_taken_over(redis_client: Any) -> None:
    crashed = _claim(redis_client, ttl=0.2)
    assert claim_or_wait(redis_client, crashed, poll=0.01)  # then it dies: never renewed
    successor = _claim(redis_client)

    assert claim_or_wait(redis_client, successor, poll=0.01)
    assert redis_client.get(successor.key) == successor.token.encode()


def test_a_held_claim_is_renewed_while_its_delivery_runs(redis_client: Any) -> None:
    claim = _claim(redis_client, ttl=0.3)
    assert claim_or_wait(redis_client, claim, poll=0.01)
    renewer().hold(claim)
    try:
        time.sleep(1.0)  # more than three lifetimes
        assert redis_client.get(claim.key) == claim.token.encode()
        assert not claim.lost
    finally:
        renewer().release(claim)


# -- the backend engine tasks store through ------------------------------------------------------


def test_an_engine_task_stores_through_the_apps_own_backend(redis_app: Celery) -> None:
    @task(app=redis_app, name="units.stored")
    def stored() -> int:
        return 1

    backend = stored.backend
    assert backend is not redis_app.backend and isinstance(backend, type(redis_app.backend))
    assert backend.client is redis_app.backend.client  # one client, one pool, one consumer
    assert stored.backend is backend


def test_a_claimed_delivery_stores_its_outcome_without_reading_first(
    redis_app: Celery, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    @task(app=redis_app, name="units.fresh")
    def fresh() -> int:
        return 1

    claim = RedisStore.for_app(redis_app).new_claim("fresh-1", 0, 5.0)
    assert claim_or_wait(redis_client, claim, poll=0.01)
    request = Context(id="fresh-1", **{CLAIM: claim})
    scripts = _commands(redis_client, "eval")

    def no_read(task_id: str) -> Any:
        raise AssertionError("read the stored meta before storing")

    with monkeypatch.context() as patched:
        patched.setattr(fresh.backend, "_get_task_meta_for", no_read)
        fresh.backend.mark_as_done("fresh-1", 42, request=request)

    assert _commands(redis_client, "eval") == scripts + 1  # the fenced store, nothing else
    assert fresh.AsyncResult("fresh-1").get(timeout=5) == 42


def test_a_delivery_that_lost_its_claim_stores_no_outcome_over_the_holders(
    redis_app: Celery, redis_client: Any
) -> None:
    @task(app=redis_app, name="units.stale")
    def stale() -> int:
        return 1

    store = RedisStore.for_app(redis_app)
    lapsed, holder = store.new_claim("stale-1", 0, 0.1), store.new_claim("stale-1", 0, 5.0)
    assert claim_or_wait(redis_client, lapsed, poll=0.01)
    assert claim_or_wait(redis_client, holder, poll=0.01)  # after the first one lapsed
    stale.backend.mark_as_done("stale-1", 42, request=Context(id="stale-1", **{CLAIM: holder}))

    # When: the delivery whose claim lapsed ends, with another outcome.
    stale.backend.mark_as_failure(
        "stale-1", ValueError("late"), request=Context(id="stale-1", **{CLAIM: lapsed})
    )

    # Then: the holder's outcome stays, and the stale delivery knows it lost its claim.
    assert stale.AsyncResult("stale-1").get(timeout=5) == 42
    assert lapsed.lost and not holder.lost


def test_any_other_delivery_never_overwrites_a_success(redis_app: Celery) -> None:
    @task(app=redis_app, name="units.redelivered")
    def redelivered() -> int:
        return 1

    redelivered.backend.mark_as_done("late-1", 42, request=Context(id="late-1"))

    # A duplicate delivery that failed late: Celery's read keeps the success.
    redelivered.backend.mark_as_failure("late-1", ValueError("late"), request=Context(id="late-1"))

    assert redelivered.AsyncResult("late-1").get(timeout=5) == 42


def _commands(client: Any, name: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0))


# -- recording a worker run ---------------------------------------------------------------------


def test_a_worker_run_s_final_state_is_written_only_once_its_engine_returned(
    redis_app: Celery, redis_client: Any
) -> None:
    # The transaction commits after Completed is entered: a worker killed in between must leave
    # the run Running (continued by the redelivery), not Completed with nothing committed.
    store = RedisStore.for_app(redis_app)
    delivery = Delivery(
        "run-1", "run-1", "worker@x", retries=0, redelivered=False, send_events=False
    )
    recorder = RunObservers(delivery_observers(redis_app, store, delivery))
    run = TaskRun(id="run-1", name="t", task_name="t", parameters={})
    for state in (Pending(), Running(), Completed(data=1)):
        run.state = state
        run.state_history.append(state)
        recorder(run, state)
    time.sleep(0.5)  # longer than the kernel holds a held write (200 ms)

    assert store.load_run("run-1").history_names() == ["Pending", "Running"]
    recorder.end(run)
    deadline = time.monotonic() + 5
    while store.load_run("run-1").state.name != "Completed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.load_run("run-1").history_names() == ["Pending", "Running", "Completed"]
