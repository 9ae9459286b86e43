"""SERIALIZABLE locks across real worker processes, and a holder that dies (SPEC §6).

The lock lives on Redis (``SET NX PX``) and its holder renews it every third of its TTL while
it works. A holder killed with SIGKILL cannot release it: the lock must expire, never block
forever. Two worker processes running the same inputs must execute each once, the others
reading the committed result (Cached).
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import (
    WorkerProcess,
    counter,
    deliveries,
    history_problems,
    load_run,
    reliability_app,
    wait_for,
    workers,
)
from tests.reliability.worker_app import side

pytestmark = pytest.mark.timeout(120)

#: Seconds a SERIALIZABLE lock lives in these workers unless renewed (default 30).
LOCK_TTL = 3.0
KEYS = 20
RUNS_PER_KEY = 4
#: Bound on waits that include a lock expiry or a redelivery.
TIMEOUT = 45.0


@pytest.fixture
def rel(redis_url: str) -> Iterator[tuple[Any, Any]]:
    with reliability_app(redis_url, visibility_timeout=3) as app_and_tasks:
        yield app_and_tasks


def lock_keys(app: Any) -> list[bytes]:
    return list(side(app).scan_iter(match="cte:*:lock:*"))


def test_a_lock_whose_holder_was_sigkilled_expires_and_the_waiting_run_goes_on(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    queue_a, queue_b = f"{app.conf.task_default_queue}-a", f"{app.conf.task_default_queue}-b"
    env = {"RELIABILITY_LOCK_TTL": str(LOCK_TTL)}
    holder = WorkerProcess(app, tmp_path, concurrency=1, env=env, queues=queue_a)
    waiter = WorkerProcess(app, tmp_path, concurrency=1, env=env, queues=queue_b)
    key, gate = uuid.uuid4().hex, f"gate:{uuid.uuid4().hex}"
    with workers(holder, waiter):
        # Given: a run in one worker holds the lock on `key`; a run in another waits for it.
        first = tasks.locked.apply_async((key, 0.0, gate), queue=queue_a)
        wait_for(lambda: counter(app, f"exec:{key}") == 1, 30, "the first run to take the lock")
        (lock,) = lock_keys(app)
        dead_holder = side(app).get(lock)
        second = tasks.locked.apply_async((key, 0.0, ""), queue=queue_b)
        wait_for(lambda: deliveries(app).started(second.id), 30, "the second run to start")
        assert counter(app, f"exec:{key}") == 1  # it waits: the lock is held

        # When: the holder's whole worker is SIGKILLed; nobody can release its lock.
        holder.kill()
        assert side(app).get(lock) == dead_holder
        assert 0 < side(app).pttl(lock) <= LOCK_TTL * 1000

        # Then: the lock expires and the waiting run takes it, runs, and commits.
        value = second.get(timeout=TIMEOUT)
        assert value["execution"] == 2
        assert load_run(app, second.id).history_names() == ["Pending", "Running", "Completed"]

        # And the dead holder's run, delivered again to a restarted worker, reads that result.
        holder.start()
        assert first.get(timeout=TIMEOUT) == value
        run = load_run(app, first.id)

    assert run.history_names() == ["Pending", "Running", "Crashed", "Retrying", "Cached"]
    assert counter(app, f"exec:{key}") == 2
    assert lock_keys(app) == []


def test_two_worker_processes_contending_on_twenty_keys_execute_each_once(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    one = WorkerProcess(app, tmp_path, concurrency=2)
    two = WorkerProcess(app, tmp_path, concurrency=2)
    keys = [uuid.uuid4().hex for _ in range(KEYS)]
    with workers(one, two):
        # When: each key is sent several times in a row, so both workers get the same key.
        sent = [(key, tasks.locked.delay(key, 0.3)) for key in keys for _ in range(RUNS_PER_KEY)]
        values = [(key, result, result.get(timeout=TIMEOUT)) for key, result in sent]
        pool_of = {pid: "one" for pid in one.children()} | {pid: "two" for pid in two.children()}
        log = deliveries(app)

    # Then: one execution per key; every other run came back Cached with the same value.
    endings: collections.Counter[str] = collections.Counter()
    problems = []
    for key in keys:
        runs = [(result, value) for k, result, value in values if k == key]
        if counter(app, f"exec:{key}") != 1:
            problems.append(f"{key}: executed {counter(app, f'exec:{key}')} times")
        if len({value["execution"] for _r, value in runs}) != 1:
            problems.append(f"{key}: different values {[v for _r, v in runs]}")
        for result, _value in runs:
            run = load_run(app, result.id)
            problems += history_problems(run, result.id)
            endings[run.state.name if run is not None else "missing"] += 1
    assert not problems, "\n".join(problems)
    assert endings == {"Completed": KEYS, "Cached": KEYS * (RUNS_PER_KEY - 1)}
    # The contention was real: some key was delivered to both worker processes.
    workers_per_key = collections.defaultdict(set)
    task_key = {result.id: key for key, result in sent}
    for task_id, _retries, _redelivered, pid in log.starts:
        workers_per_key[task_key[task_id]].add(pool_of.get(pid, "unknown"))
    assert any(seen >= {"one", "two"} for seen in workers_per_key.values()), workers_per_key
    assert lock_keys(app) == []
