"""SERIALIZABLE isolation (SPEC §6): one execution per key across threads and processes.

Executions are counted with Redis ``INCR`` inside the task function, so a count is true across
processes. Subprocesses run ``_SCRIPT`` against the test's Redis database and are always killed
in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_taskengine import get_task_run, task, transaction
from celery_taskengine._store.memory import MemoryStore
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import ConfigurationError
from celery_taskengine.states import State
from celery_taskengine.task_engine import run_task_sync
from celery_taskengine.transactions import IsolationLevel, get_transaction

SERIALIZABLE = INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE)
#: The fixed name keeps keys equal between this process and the subprocesses.
TASK_NAME = "tests.serializable.slow_square"

#: Run by each subprocess: define the same task on the same Redis, say "ready", wait for the
#: go key, run once and print the final state. ``LOCK_TTL`` (optional) shortens the lock's life.
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import redis
    from celery import Celery
    from celery_taskengine import task, transactions
    from celery_taskengine.cache_policies import INPUTS
    from celery_taskengine.transactions import IsolationLevel

    url, name = sys.argv[1], sys.argv[2]
    if os.environ.get("LOCK_TTL"):
        transactions.LOCK_TTL_SECONDS = float(os.environ["LOCK_TTL"])
    client = redis.Redis.from_url(url)
    app = Celery("serializable-subprocess", set_as_current=False)
    app.conf.update(broker_url=url, result_backend=url, accept_content=["json"])
    policy = INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE)

    @task(app=app, name=name, cache_policy=policy)
    def slow_square(x):
        client.incr("executions")
        client.set("started", os.getpid())
        time.sleep(float(os.environ.get("WORK_SECONDS", "0.3")))
        return {"square": x * x, "pid": os.getpid()}

    print("ready", flush=True)
    while not client.exists("go"):
        time.sleep(0.005)
    state = slow_square(7, return_state=True)
    print(json.dumps({"name": state.name, "value": state.data}), flush=True)
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "serializable_run.py"
    path.write_text(_SCRIPT)
    return path


@pytest.fixture
def spawn(script: Path, redis_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start subprocesses running ``_SCRIPT``; each is killed and reaped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(**env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(script), redis_url, TASK_NAME],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


def wait_for_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"subprocess said {line!r}, not {expected!r}; stderr:\n{err}")


def slow_square_task(app: Celery, client: redis.Redis, policy: Any = SERIALIZABLE) -> Any:
    """The subprocesses' task, in this process (same name, so the same keys)."""

    @task(app=app, name=TASK_NAME, cache_policy=policy)
    def slow_square(x: int) -> dict[str, int]:
        client.incr("executions")
        time.sleep(0.3)
        return {"square": x * x, "pid": os.getpid()}

    return slow_square


def run_in_threads(t: Any, count: int, *args: Any) -> list[State]:
    """``t(*args)`` from ``count`` threads released at once; their final states."""
    barrier = threading.Barrier(count)

    def one() -> State:
        barrier.wait()
        state: State = t(*args, return_state=True)
        return state

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one) for _ in range(count)]
        return [future.result(timeout=30) for future in futures]


def redis_store(app: Celery) -> RedisStore:
    store = store_for_app(app)
    assert isinstance(store, RedisStore)
    return store


class StoreWithoutLocks(MemoryStore):
    """A store that cannot lock across processes."""

    supports_locking = False


# -- one execution, everyone else Cached -----------------------------------------------------


def test_concurrent_threads_execute_the_function_once(
    redis_app: Any, redis_client: redis.Redis
) -> None:
    slow_square = slow_square_task(redis_app, redis_client)

    states = run_in_threads(slow_square, 8, 7)

    assert int(redis_client.get("executions") or 0) == 1
    assert sorted(s.name for s in states) == ["Cached"] * 7 + ["Completed"]
    assert len({json.dumps(s.data, sort_keys=True) for s in states}) == 1
    [key] = redis_store(redis_app).iter_keys()
    assert redis_store(redis_app).lock_holder(key) is None


def test_concurrent_processes_execute_the_function_once(
    redis_client: redis.Redis, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    procs = [spawn() for _ in range(4)]
    for proc in procs:
        wait_for_line(proc, "ready")

    redis_client.set("go", 1)
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        outcomes.append(json.loads(out.strip().splitlines()[-1]))

    assert int(redis_client.get("executions") or 0) == 1
    assert sorted(o["name"] for o in outcomes) == ["Cached", "Cached", "Cached", "Completed"]
    assert len({json.dumps(o["value"], sort_keys=True) for o in outcomes}) == 1
    assert outcomes[0]["value"]["square"] == 49


def test_without_serializable_concurrent_threads_may_all_execute(
    redis_app: Any, redis_client: redis.Redis
) -> None:
    slow_square = slow_square_task(redis_app, redis_client, policy=INPUTS)

    states = run_in_threads(slow_square, 4, 7)

    assert int(redis_client.get("executions") or 0) == 4
    assert [s.name for s in states] == ["Completed"] * 4


def test_an_enclosing_serializable_transaction_makes_its_tasks_lock(
    redis_app: Any, redis_client: redis.Redis
) -> None:
    store = redis_store(redis_app)
    held: list[str | None] = []

    @task(app=redis_app, cache_key_fn=lambda context, parameters: f"locked-{parameters['x']}")
    def inner(x: int) -> int:
        held.append(store.lock_holder(f"locked-{x}"))
        return x

    with transaction(store=store, isolation_level=IsolationLevel.SERIALIZABLE):
        inner(1)

    assert held[0] is not None
    assert store.lock_holder("locked-1") is None


# -- dead holders ----------------------------------------------------------------------------


def test_a_lock_whose_holder_died_expires_and_the_next_run_proceeds(
    redis_app: Any, redis_client: redis.Redis, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    store = redis_store(redis_app)
    holder = spawn(LOCK_TTL="0.6", WORK_SECONDS="60")
    wait_for_line(holder, "ready")
    redis_client.set("go", 1)
    deadline = time.monotonic() + 20
    while not redis_client.exists("started"):
        assert holder.poll() is None, holder.communicate(timeout=10)[1]
        assert time.monotonic() < deadline, "the subprocess never started its run"
        time.sleep(0.01)
    [locked_key] = redis_client.keys(store.key_for("lock", "*"))

    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    assert redis_client.exists(locked_key), "the lock should outlive its dead holder for a while"

    state = slow_square_task(redis_app, redis_client)(7, return_state=True)

    assert state.name == "Completed"
    assert int(redis_client.get("executions") or 0) == 2
    assert not redis_client.exists(locked_key)


def test_a_lock_that_is_never_released_expires_after_its_ttl(redis_app: Any) -> None:
    store = redis_store(redis_app)

    @task(app=redis_app, cache_key_fn=lambda context, parameters: "abandoned")
    def work() -> str:
        return "done"

    assert store.acquire_lock("abandoned", "a-holder-that-died", 0.5)

    with transaction(store=store, isolation_level=IsolationLevel.SERIALIZABLE):
        state = work(return_state=True)

    assert state.name == "Completed"
    assert store.lock_holder("abandoned") is None


# -- configuration ---------------------------------------------------------------------------


def test_serializable_without_a_lock_capable_store_fails_before_running(
    redis_app: Any,
) -> None:
    calls: list[int] = []
    policy = SERIALIZABLE.configure(key_storage=StoreWithoutLocks())

    @task(app=redis_app, cache_policy=policy)
    def guarded(x: int) -> int:
        calls.append(x)
        return x

    with pytest.raises(ConfigurationError, match=r"SERIALIZABLE.*StoreWithoutLocks"):
        run_task_sync(guarded, "run-without-locks", parameters={"x": 1})

    run = get_task_run("run-without-locks", app=redis_app)
    assert run is not None
    assert [s.name for s in run.state_history] == ["Pending"]
    assert calls == []
    assert get_transaction() is None


def test_a_lock_manager_on_the_policy_locks_for_a_store_that_cannot(
    redis_app: Any, redis_client: redis.Redis
) -> None:
    records = StoreWithoutLocks()
    locks = redis_store(redis_app)
    policy = SERIALIZABLE.configure(key_storage=records, lock_manager=locks)
    held: list[int] = []

    @task(app=redis_app, cache_policy=policy)
    def guarded(x: int) -> int:
        redis_client.incr("executions")
        held.append(len(redis_client.keys(locks.key_for("lock", "*"))))
        time.sleep(0.2)
        return x

    states = run_in_threads(guarded, 4, 1)

    assert int(redis_client.get("executions") or 0) == 1
    assert sorted(s.name for s in states) == ["Cached"] * 3 + ["Completed"]
    assert held == [1]
    assert len(records.iter_keys()) == 1  # the record lives on the policy's key_storage
    assert redis_client.keys(locks.key_for("lock", "*")) == []


def test_a_serializable_transaction_on_a_store_without_locks_fails_and_leaves_no_trace() -> None:
    with pytest.raises(ConfigurationError, match="SERIALIZABLE"):  # noqa: SIM117
        with transaction(
            "k", store=StoreWithoutLocks(), isolation_level=IsolationLevel.SERIALIZABLE
        ):
            pytest.fail("the body must not run")

    assert get_transaction() is None


def test_an_app_without_a_redis_backend_uses_the_in_process_store_which_locks() -> None:
    app = Celery("no-redis-backend", set_as_current=False)
    app.conf.update(result_backend="cache+memory://")
    try:
        store = store_for_app(app)
        assert isinstance(store, MemoryStore)
        assert store.supports_locking
    finally:
        app.close()


@pytest.mark.parametrize("backend", [None, "cache+memory://"], ids=["no-backend", "cache-memory"])
def test_local_runs_without_a_redis_backend_serialize_with_in_process_locks(
    backend: str | None,
) -> None:
    app = Celery("local-serializable", set_as_current=False)
    if backend is not None:
        app.conf.update(result_backend=backend)
    executions: list[int] = []

    @task(app=app, cache_policy=SERIALIZABLE, name=f"tests.local.once.{backend}")
    def once(x: int) -> int:
        executions.append(x)
        time.sleep(0.2)
        return x * 10

    try:
        token = time.monotonic_ns()  # a fresh key in the process-wide memory store
        states = run_in_threads(once, 8, token)
    finally:
        app.close()

    assert len(executions) == 1
    assert sorted(s.name for s in states) == ["Cached"] * 7 + ["Completed"]
    assert {s.data for s in states} == {token * 10}


def test_the_redis_store_is_lock_capable(redis_app: Any) -> None:
    assert isinstance(store_for_app(redis_app), RedisStore)
    assert store_for_app(redis_app).supports_locking
