"""Local runs' records on the real Redis: written behind the caller, seen by other clients.

Another client (another process, as far as Redis can tell) must see every local run's record
soon without anyone flushing, at once after ``flush_run_records``, while a long run is still
running, and after the process that ran it exits; a cache hit writes one record, not two.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from celery_taskengine import flush_run_records, task
from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.local_flush import WRITE_BEHIND_SECONDS
from celery_taskengine._store.local_records import LocalRunRecorder, recorder_for
from celery_taskengine._store.record_batch import MAX_RUNS_PER_BATCH
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.states import State, StateType
from celery_taskengine.task_engine import run_task_sync

#: How long a test waits for a record that is written behind (about 0.2 s is expected).
PATIENCE_SECONDS = 5.0


@pytest.fixture
def store(redis_app: Any) -> RedisStore:
    store = store_for_app(redis_app)
    assert isinstance(store, RedisStore)
    return store


def run_locally(t: Any, **parameters: Any) -> tuple[str, Any]:
    """Run ``t`` locally, as ``t(...)`` does, under a run id of our own: (id, final state)."""
    run_id = uuid.uuid4().hex
    return run_id, run_task_sync(t, run_id, parameters=parameters, return_type="state")


def stored_history(client: redis.Redis, store: RedisStore, run_id: str) -> list[str] | None:
    raw = client.get(store.key_for("run", run_id))
    if raw is None:
        return None
    return [state["name"] for state in json.loads(raw)["state_history"]]


def wait_for_history(
    client: redis.Redis, store: RedisStore, run_id: str, last: str
) -> list[str] | None:
    """The run's stored history once it ends in ``last`` (None if it never does)."""
    deadline = time.monotonic() + PATIENCE_SECONDS
    while time.monotonic() < deadline:
        history = stored_history(client, store, run_id)
        if history is not None and history[-1] == last:
            return history
        time.sleep(0.005)
    return stored_history(client, store, run_id)


def test_a_local_runs_record_reaches_other_clients_without_a_flush(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis
) -> None:
    t = task(app=redis_app, name="records.double")(lambda x: 2 * x)

    run_id, state = run_locally(t, x=21)

    assert state.result() == 42
    history = wait_for_history(redis_client, store, run_id, "Completed")
    assert history == ["Pending", "Running", "Completed"]


def test_flush_run_records_makes_them_visible_at_once(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis
) -> None:
    t = task(app=redis_app, name="records.flushed")(lambda x: x)
    run_ids = [run_locally(t, x=n)[0] for n in range(20)]

    assert flush_run_records(redis_app)

    histories = [stored_history(redis_client, store, run_id) for run_id in run_ids]
    assert histories == [["Pending", "Running", "Completed"]] * 20


def test_a_long_local_run_is_seen_running_while_it_runs(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis
) -> None:
    seen_running = threading.Event()
    run_ids: list[str] = []

    def watch() -> None:
        while not run_ids:
            time.sleep(0.001)
        if wait_for_history(redis_client, store, run_ids[0], "Running") is not None:
            seen_running.set()

    @task(app=redis_app, name="records.long")
    def long_running() -> bool:
        run = current_task_run()
        assert run is not None
        run_ids.append(run.id)
        return seen_running.wait(PATIENCE_SECONDS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert long_running() is True  # the record said Running while the function ran
    finally:
        watcher.join()


def test_a_cache_hit_writes_its_run_record_once(
    redis_app: Any, store: RedisStore, redis_url: str
) -> None:
    square = task(app=redis_app, name="records.square", cache_policy=INPUTS)(lambda x: x * x)
    assert square(7) == 49
    assert flush_run_records(redis_app)
    run_prefix = store.key_for("run", "").encode()
    token = f"done-{uuid.uuid4().hex}"
    writes: list[bytes] = []
    watching = threading.Event()

    def monitor() -> None:
        with redis.Redis.from_url(redis_url).monitor() as commands:
            watching.set()
            for command in commands.listen():
                words = command["command"].split()
                if words[0].upper() == "SET" and words[1].encode().startswith(run_prefix):
                    writes.append(words[1].encode())
                if words[0] == "ECHO" and token in command["command"]:
                    return

    watcher = threading.Thread(target=monitor)
    watcher.start()
    assert watching.wait(5)
    time.sleep(0.05)  # MONITOR is on before the hits are sent

    started = time.monotonic()
    runs = [run_locally(square, x=7) for _ in range(30)]
    elapsed = time.monotonic() - started
    assert flush_run_records(redis_app)
    redis.Redis.from_url(redis_url).echo(token)
    watcher.join(10)

    assert [state.name for _, state in runs] == ["Cached"] * 30
    run_keys = {store.key_for("run", run_id).encode() for run_id, _ in runs}
    ours = [key for key in writes if key in run_keys]  # MONITOR sees every database
    # Each hit's Running and Cached are one write, unless the flusher thread came by between
    # them (once per WRITE_BEHIND_SECONDS at most): then Running was written on its own.
    flusher_visits = 1 + int(elapsed / WRITE_BEHIND_SECONDS)
    assert set(ours) == run_keys
    assert len(ours) <= len(run_keys) + flusher_visits


def test_records_held_when_the_process_exits_are_written(
    store: RedisStore, redis_client: redis.Redis, redis_url: str
) -> None:
    script = textwrap.dedent(
        f"""
        import uuid
        from celery import Celery
        from celery_taskengine import task
        from celery_taskengine.task_engine import run_task_sync

        app = Celery("exiting", set_as_current=False)
        app.conf.update(broker_url={redis_url!r}, result_backend={redis_url!r},
                        taskengine_namespace={store.namespace!r})
        t = task(app=app, name="records.exiting")(lambda x: x)
        for n in range(5):
            run_id = f"exiting-{{n}}-{{uuid.uuid4().hex}}"
            run_task_sync(t, run_id, parameters={{"x": n}})
            print(run_id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )

    run_ids = done.stdout.split()
    assert len(run_ids) == 5
    for run_id in run_ids:
        assert wait_for_history(redis_client, store, run_id, "Completed") == [
            "Pending",
            "Running",
            "Completed",
        ]


def test_records_go_on_after_redis_drops_the_recorders_connection(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis
) -> None:
    t = task(app=redis_app, name="records.dropped")(lambda x: x)
    first, _ = run_locally(t, x=1)
    assert flush_run_records(redis_app)
    recorder = recorder_for(store)
    host, port = recorder._connection._sock.getsockname()[:2]
    assert redis_client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1

    second, _ = run_locally(t, x=2)
    assert flush_run_records(redis_app)

    for run_id in (first, second):
        assert stored_history(redis_client, store, run_id) == ["Pending", "Running", "Completed"]


def test_a_forked_child_records_its_own_runs_and_leaves_the_parents_connection_alone(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis
) -> None:
    t = task(app=redis_app, name="records.forked")(lambda x: x)
    square = task(app=redis_app, name="records.forked_square", cache_policy=INPUTS)(lambda x: x * x)
    before, _ = run_locally(t, x=1)
    assert [square(3), square(3)] == [9, 9]  # the parent keeps a connection for early reads
    assert flush_run_records(redis_app)

    child_run = f"child-{uuid.uuid4().hex}"
    pid = os.fork()
    if pid == 0:  # the child: run, flush, and leave without pytest's clean-up
        ok = False
        signal.alarm(30)  # a child that hangs must not hang the suite
        try:
            run_task_sync(t, child_run, parameters={"x": 2})
            hit = square(3, return_state=True)  # on a connection of the child's own
            ok = hit.name == "Cached" and hit.result() == 9
            ok = flush_run_records(redis_app, timeout=10) and ok
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    after, _ = run_locally(t, x=3)
    assert flush_run_records(redis_app)

    assert os.waitstatus_to_exitcode(status) == 0
    for run_id in (before, child_run, after):
        assert stored_history(redis_client, store, run_id) == ["Pending", "Running", "Completed"]


class Unshowable:
    """A result that neither JSON nor ``repr`` can show."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_a_record_that_cannot_be_encoded_is_reported_and_the_others_go_on(
    redis_app: Any, store: RedisStore, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    bad = task(app=redis_app, name="records.unshowable")(lambda: Unshowable())
    good = task(app=redis_app, name="records.showable")(lambda x: x)
    assert flush_run_records(redis_app)

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        bad_run, _ = run_locally(bad)
        assert run_locally(good, x=1)[1].result() == 1  # another run's record is not its business
        flushed = flush_run_records(redis_app)
        assert not flushed  # one record was lost, and it says which
        assert flushed.lost_runs == (bad_run,)
    later, _ = run_locally(good, x=2)  # written by the flusher thread, which goes on

    assert any(bad_run in record.getMessage() for record in caplog.records)
    assert wait_for_history(redis_client, store, later, "Completed") is not None
    assert flush_run_records(redis_app)


def test_a_backend_that_is_down_makes_flush_say_records_were_lost(
    redis_app_factory: Any,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = redis_app_factory(result_backend=f"redis://127.0.0.1:{port}/0")
    t = task(app=app, name="records.nowhere")(lambda x: x)

    assert t(1) == 1
    assert not flush_run_records(app, timeout=2)


def test_local_runs_do_not_wait_for_a_backend_that_hangs(redis_app_factory: Any) -> None:
    # A server that takes connections but never answers: the flusher thread connects and then
    # waits for an answer, holding the recorder's lock, until the server goes away. Twenty
    # runs must finish meanwhile: none of them may wait for that lock.
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)
        port = hanging.getsockname()[1]
        app = redis_app_factory(
            result_backend=f"redis://127.0.0.1:{port}/0", redis_socket_timeout=3600
        )
        t = task(app=app, name="records.hanging")(lambda x: x)
        assert t(-1) == -1
        recorder = recorder_for(store_for_app(app))  # type: ignore[arg-type]
        deadline = time.monotonic() + PATIENCE_SECONDS
        while not recorder._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder._lock.locked(), "the flusher never started waiting on the server"

        values: list[int] = []
        finished = threading.Event()

        def run_twenty() -> None:
            values.extend(t(n) for n in range(20))
            finished.set()

        runner = threading.Thread(target=run_twenty, daemon=True)
        runner.start()
        finished.wait(PATIENCE_SECONDS)  # a guard against hanging forever, not a speed limit

        assert values == list(range(20))
        assert recorder._lock.locked()  # the flusher still waits: the runs never needed it
    runner.join(PATIENCE_SECONDS)  # the server is gone: its connections fail, all unblock


def finished_run(
    run_id: str, task_name: str = "records.manual", final: StateType = StateType.COMPLETED
) -> TaskRun:
    run = TaskRun(id=run_id, name=task_name, task_name=task_name)
    for state in (State(StateType.PENDING), State(StateType.RUNNING), State(final)):
        run.state, run.state_history = state, [*run.state_history, state]
    return run


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


def test_records_held_together_go_out_in_one_script_call_per_batch_and_are_indexed(
    store: RedisStore, redis_client: redis.Redis
) -> None:
    # Given 300 records held at once (more than one batch takes), of two tasks and two states
    recorder = LocalRunRecorder(store)  # out of the flusher's reach
    task_a, task_b = (f"records.batched_{name}_{uuid.uuid4().hex[:8]}" for name in "ab")
    done = [finished_run(f"done-{n}-{uuid.uuid4().hex}", task_a) for n in range(200)]
    failed = [
        finished_run(f"failed-{n}-{uuid.uuid4().hex}", task_b, StateType.FAILED) for n in range(100)
    ]
    for run in done + failed:
        recorder._held[run.id] = run
    calls_before = script_calls(redis_client)

    # When they are written
    assert recorder.flush(5)

    # Then a script call per batch carried them all, and the index lists each where it belongs
    assert script_calls(redis_client) - calls_before == math.ceil(300 / MAX_RUNS_PER_BATCH)
    assert {run.id for run in store.list_runs(500, task=task_a)} == {run.id for run in done}
    listed = store.list_runs(500, task=task_b, state="failed")
    assert {run.id for run in listed} == {run.id for run in failed}
    assert store.list_runs(500, task=task_a, state="failed") == []
    for run in (done[0], failed[-1]):
        assert run.state is not None
        assert stored_history(redis_client, store, run.id) == ["Pending", "Running", run.state.name]
    index_keys = [store.run_index.task_key(task_a), store.run_index.tasks_key]
    assert all(
        redis_client.pttl(key) > 0 for key in [*index_keys, store.key_for("run", done[0].id)]
    )


def test_writes_redis_had_not_confirmed_are_sent_again_after_it_drops_the_connection(
    store: RedisStore, redis_client: redis.Redis
) -> None:
    # A recorder of its own, out of the flusher's reach, so nothing confirms in between.
    recorder = LocalRunRecorder(store)
    warm, sent, later = (finished_run(f"{name}-{uuid.uuid4().hex}") for name in "wsl")
    recorder._held[warm.id] = warm
    assert recorder.flush(5)
    recorder._held[sent.id] = sent
    recorder.write_held()  # sent, held back by the kernel, not confirmed
    host, port = recorder._connection._sock.getsockname()[:2]
    assert redis_client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1

    recorder._held[later.id] = later
    assert recorder.flush(5)

    for run in (warm, sent, later):
        assert stored_history(redis_client, store, run.id) == ["Pending", "Running", "Completed"]
