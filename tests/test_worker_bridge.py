"""Engine tasks as real Celery tasks in real workers, on Redis and on RabbitMQ (SPEC §1, §3, §7).

Each test sends with ``.delay()``/canvas to a real worker consuming a real broker (an in-thread
``start_worker`` or a ``celery worker`` subprocess) and reads results and run records back from
the real Redis result backend. The examples' tests cover retries that free a one-slot worker,
async tasks on one loop, streaming, chords with retries and SERIALIZABLE across two workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group
from celery.result import AsyncResult
from kombu import Queue

from celery_taskengine import TaskRunTimeoutError, get_task_run, task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import SerializationError
from celery_taskengine.states import TRANSITIONS
from tests.workers import embedded_worker

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_app(
    request: pytest.FixtureRequest, redis_app_factory: Callable[..., Celery], redis_url: str
) -> Celery:
    """An app on the test Redis as backend, with Redis or RabbitMQ as broker, its own queue."""
    queue = f"bridge-{uuid.uuid4().hex[:10]}"
    broker = redis_url
    if request.param == "rabbitmq":
        if not rabbitmq_answers():
            if os.environ.get("CI"):
                pytest.fail("RabbitMQ is not answering on 127.0.0.1:5672")
            pytest.skip("RabbitMQ is not answering on 127.0.0.1:5672")
        broker = RABBITMQ_URL
    return redis_app_factory(
        broker_url=broker,
        task_default_queue=queue,
        task_queues=[Queue(queue, auto_delete=True)],
        worker_send_task_events=True,
        broker_heartbeat=0,  # lets the in-thread worker stop at once on RabbitMQ
    )


def history(task_id: str, app: Celery) -> list[str]:
    run = get_task_run(task_id, app=app)
    assert run is not None, f"no run record for {task_id}"
    return run.history_names()


def assert_valid_history(task_id: str, app: Celery) -> None:
    run = get_task_run(task_id, app=app)
    assert run is not None
    states = run.state_history
    for before, after in itertools.pairwise(states):
        assert after.type in TRANSITIONS[before.type], f"{before.name} -> {after.name}"


# --- the basic round trip, on both brokers -----------------------------------------------------


def test_delay_runs_the_engine_in_a_worker_and_records_the_run(broker_app: Celery) -> None:
    @task(app=broker_app, name="bridge.add")
    def add(x: int, y: int) -> int:
        return x + y

    with embedded_worker(broker_app, pool="threads", concurrency=2):
        result = add.delay(2, 3)
        assert result.get(timeout=20) == 5

    assert result.state == "SUCCESS"
    assert history(result.id, broker_app) == ["Pending", "Running", "Completed"]
    run = get_task_run(result.id, app=broker_app)
    assert run is not None and run.id == result.id and run.parameters == {"x": 2, "y": 3}


def test_a_failure_reaches_get_as_the_tasks_own_exception(broker_app: Celery) -> None:
    @task(app=broker_app, name="bridge.boom")
    def boom() -> None:
        raise ValueError("xyz")

    with embedded_worker(broker_app, pool="threads", concurrency=2):
        result = boom.delay()
        with pytest.raises(ValueError, match="xyz"):
            result.get(timeout=20)

    run = get_task_run(result.id, app=broker_app)
    assert run is not None and run.history_names() == ["Pending", "Running", "Failed"]
    assert run.state is not None
    assert run.state.message == "Task run encountered an exception ValueError: xyz"


def test_a_delayed_retry_goes_back_to_the_broker_and_continues_the_same_run(
    broker_app: Celery,
) -> None:
    attempts: list[str] = []

    @task(app=broker_app, name="bridge.flaky", retries=2, retry_delay_seconds=0.3)
    def flaky() -> str:
        attempts.append(threading.current_thread().name)
        if len(attempts) < 3:
            raise ConnectionError("not yet")
        return "ok"

    with embedded_worker(broker_app, pool="threads", concurrency=2):
        result = flaky.delay()
        assert result.get(timeout=30) == "ok"

    run = get_task_run(result.id, app=broker_app)
    assert run is not None and run.run_count == 3
    assert run.history_names() == [
        "Pending",
        "Running",
        "AwaitingRetry",
        "Retrying",
        "AwaitingRetry",
        "Retrying",
        "Completed",
    ]
    assert_valid_history(result.id, broker_app)


# --- timeouts in every pool --------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_timeout_stops_a_sleeping_task_in_an_in_process_worker(
    pool: str, redis_app_factory: Callable[..., Celery]
) -> None:
    app = redis_app_factory()

    @task(app=app, name="bridge.nap", timeout_seconds=0.3)
    def nap() -> str:
        time.sleep(5)
        return "woke up"

    @task(app=app, name="bridge.quick")
    def quick() -> str:
        return "quick"

    with embedded_worker(app, pool=pool, concurrency=1):
        result = nap.delay()
        with pytest.raises(TaskRunTimeoutError):
            result.get(timeout=20)
        # the slot is free again long before the 5 s sleep would have ended
        assert quick.delay().get(timeout=3) == "quick"

    assert history(result.id, app) == ["Pending", "Running", "TimedOut"]


@contextlib.contextmanager
def worker_process(
    app: Celery, pool: str, concurrency: int = 2, module: str = "tests.bridge.worker_app"
) -> Iterator[None]:
    """A real ``celery worker -A module`` subprocess on ``app``'s broker, backend and queue."""
    env = {
        **os.environ,
        "BRIDGE_BROKER_URL": app.conf.broker_url,
        "BRIDGE_BACKEND_URL": app.conf.result_backend,
        "PYTHONPATH": str(ROOT),
    }
    queue = app.conf.task_default_queue
    command = [sys.executable, "-m", "celery", "-A", module, "worker"]
    command += [f"--pool={pool}", f"--concurrency={concurrency}", "-Q", queue, "-l", "warning"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-E"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            assert proc.poll() is None, "the worker process exited during start-up"
            assert time.monotonic() < deadline, "the worker never answered a ping"
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_timeout_stops_a_sleeping_task_in_every_pool_of_a_real_worker(
    pool: str, redis_app_factory: Callable[..., Celery]
) -> None:
    queue = f"bridge-{uuid.uuid4().hex[:10]}"
    app = redis_app_factory(task_default_queue=queue)
    from tests.bridge import worker_app

    with worker_process(app, pool):
        result = app.send_task(worker_app.sleepy.name, args=[5], queue=queue)
        with pytest.raises(TaskRunTimeoutError):
            result.get(timeout=20)
        # the pool is not stuck in the 5 s sleep: the next task is served
        assert app.send_task(worker_app.pid.name, queue=queue).get(timeout=4) > 0

    run = get_task_run(result.id, app=app)
    assert run is not None and run.history_names() == ["Pending", "Running", "TimedOut"]
    assert run.state is not None
    assert run.state.message == "Task run exceeded timeout of 0.5 second(s)"


# --- what the backend, monitors and other processes see ---------------------------------------


def test_the_backend_shows_the_engine_state_while_the_task_runs(
    redis_app_factory: Callable[..., Celery],
) -> None:
    app = redis_app_factory()
    started, release = threading.Event(), threading.Event()

    @task(app=app, name="bridge.held")
    def held() -> str:
        started.set()
        release.wait(20)
        return "released"

    with embedded_worker(app, pool="threads", concurrency=2):
        result = held.delay()
        assert started.wait(20)
        # (a Running record may travel with the next write for up to 200 ms: see record_channel)
        deadline = time.monotonic() + 5
        while AsyncResult(result.id, app=app).state != "RUNNING":
            assert time.monotonic() < deadline, AsyncResult(result.id, app=app).state
            time.sleep(0.05)
        release.set()
        assert result.get(timeout=20) == "released"
    assert AsyncResult(result.id, app=app).state == "SUCCESS"


def test_another_process_reads_the_run_record_from_the_backend(
    redis_app_factory: Callable[..., Celery],
) -> None:
    app = redis_app_factory()

    @task(app=app, name="bridge.double")
    def double(x: int) -> int:
        return 2 * x

    with embedded_worker(app, pool="threads", concurrency=2):
        result = double.delay(21)
        assert result.get(timeout=20) == 42

    reader = (
        "import sys; from celery import Celery; from celery_taskengine import get_task_run; "
        "app = Celery('reader', backend=sys.argv[1]); "
        "run = get_task_run(sys.argv[2], app=app); "
        "print(' '.join(run.history_names()), run.state.result())"
    )
    done = subprocess.run(
        [sys.executable, "-c", reader, app.conf.result_backend, result.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Pending", "Running", "Completed", "42"]


def test_engine_states_without_a_celery_twin_go_out_as_task_events(broker_app: Celery) -> None:
    seen: list[dict[str, Any]] = []
    listening, stop = threading.Event(), threading.Event()

    def listen() -> None:
        with broker_app.connection_for_read() as connection:
            receiver = broker_app.events.Receiver(connection, handlers={"*": seen.append})
            listening.set()
            while not stop.is_set():
                try:
                    for _ in receiver.itercapture(limit=None, timeout=0.3, wakeup=False):
                        if stop.is_set():
                            return
                except (TimeoutError, OSError):
                    continue

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert listening.wait(10)

    @task(app=broker_app, name="bridge.twice", retries=1, retry_delay_seconds=0.2)
    def twice() -> str:
        if not seen_attempts:
            seen_attempts.append(1)
            raise ConnectionError("first attempt fails")
        return "second attempt"

    seen_attempts: list[int] = []
    try:
        with embedded_worker(broker_app, pool="threads", concurrency=2):
            result = twice.delay()
            assert result.get(timeout=30) == "second attempt"
            deadline = time.monotonic() + 10
            wanted = {"task-awaiting-retry", "task-retrying", "task-succeeded"}
            while not wanted <= {e["type"] for e in seen if e.get("uuid") == result.id}:
                assert time.monotonic() < deadline, sorted({e["type"] for e in seen})
                time.sleep(0.1)
    finally:
        stop.set()
        listener.join(5)

    mine = [e for e in seen if e.get("uuid") == result.id]
    awaiting = next(e for e in mine if e["type"] == "task-awaiting-retry")
    assert awaiting["engine_state"] == "AwaitingRetry" and awaiting["run_count"] == 1
    retrying = next(e for e in mine if e["type"] == "task-retrying")
    assert retrying["engine_state"] == "Retrying" and retrying["run_count"] == 2
    # task-retried is Celery's own (its worker sends it on every Retry); we send neither it nor
    # task-retry / task-success, which would override the final state in monitors
    assert not {"task-retry", "task-success"} & {e["type"] for e in mine}
    assert sum(e["type"] == "task-retried" for e in mine) == 1
    assert not any(
        "state" in e or "worker" in e for e in mine if e["type"] in wanted - {"task-succeeded"}
    )


# --- the producer side -------------------------------------------------------------------------


def test_a_committed_result_answers_delay_without_publishing(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    app = redis_app_factory()
    calls: list[int] = []

    @task(app=app, name="bridge.lookup", cache_policy=INPUTS)
    def lookup(x: int) -> dict[str, int]:
        calls.append(x)
        return {"x": x}

    with embedded_worker(app, pool="threads", concurrency=2):
        assert lookup.delay(7).get(timeout=20) == {"x": 7}

    # With no worker running at all, the same call is answered at once from the cache
    cached = lookup.delay(7)
    assert cached.get(timeout=1) == {"x": 7}
    assert calls == [7]
    assert redis_client.llen(app.conf.task_default_queue) == 0
    assert history(cached.id, app) == ["Pending", "Cached"]
    # while other arguments still go to the broker
    pending = lookup.delay(8)
    assert not pending.ready()
    assert redis_client.llen(app.conf.task_default_queue) == 1


def test_unserialisable_arguments_fail_at_delay_and_nothing_is_published(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    app = redis_app_factory()

    @task(app=app, name="bridge.takes_anything")
    def takes_anything(value: Any) -> Any:
        return value

    with pytest.raises(SerializationError, match="value"):
        takes_anything.delay(object())
    assert redis_client.llen(app.conf.task_default_queue) == 0


# --- cancellation ------------------------------------------------------------------------------


def test_revoking_a_run_that_awaits_its_retry_ends_it_cancelled(
    redis_app_factory: Callable[..., Celery],
) -> None:
    app = redis_app_factory()
    attempts: list[int] = []

    @task(app=app, name="bridge.revoked_later", retries=3, retry_delay_seconds=1.5)
    def revoked_later() -> None:
        attempts.append(1)
        raise ConnectionError("always")

    with embedded_worker(app, pool="threads", concurrency=2):
        result = revoked_later.delay()
        deadline = time.monotonic() + 20
        while "AwaitingRetry" not in names(result.id, app):
            assert time.monotonic() < deadline, "the run never reached AwaitingRetry"
            time.sleep(0.05)
        result.revoke()
        deadline = time.monotonic() + 20
        while names(result.id, app)[-1:] != ["Cancelled"]:
            assert time.monotonic() < deadline, history(result.id, app)
            time.sleep(0.1)

    assert attempts == [1]
    assert history(result.id, app)[-1] == "Cancelled"
    assert_valid_history(result.id, app)


def names(task_id: str, app: Celery) -> list[str]:
    """The run's state names so far ([] before it has a record)."""
    run = get_task_run(task_id, app=app)
    return run.history_names() if run is not None else []


# --- canvas --------------------------------------------------------------------------------------


def test_identical_calls_in_one_chain_share_a_result_through_run_id(
    redis_app_factory: Callable[..., Celery],
) -> None:
    app = redis_app_factory()
    calls: list[int] = []

    @task(app=app, name="bridge.costly", persist_result=True)  # DEFAULT: INPUTS+SOURCE+RUN_ID
    def costly(x: int) -> int:
        calls.append(x)
        return x * 10

    with embedded_worker(app, pool="solo"):
        workflow = chain(costly.si(1), costly.si(1)).apply_async()
        assert workflow.get(timeout=30) == 10
        first, second = workflow.parent.id, workflow.id
        separate = costly.delay(1)
        assert separate.get(timeout=30) == 10

    assert history(first, app)[-1] == "Completed"
    assert history(second, app)[-1] == "Cached"  # same workflow root: same RUN_ID
    assert history(separate.id, app)[-1] == "Completed"  # another workflow: runs again
    assert calls == [1, 1]


def test_engine_and_plain_celery_tasks_mix_in_groups_and_chords(broker_app: Celery) -> None:
    @task(app=broker_app, name="bridge.square", retries=1, retry_delay_seconds=0.2)
    def square(x: int) -> int:
        if x == 3 and not retried:
            retried.append(x)
            raise ConnectionError("retry me inside the chord header")
        return x * x

    @broker_app.task(name="bridge.plain_total")
    def plain_total(values: list[int]) -> int:
        return sum(values)

    retried: list[int] = []
    with embedded_worker(broker_app, pool="threads", concurrency=2):
        header = group(square.s(x) for x in range(1, 5))
        assert header.apply_async().get(timeout=30) == [1, 4, 9, 16]
        retried.clear()
        assert chord(header)(plain_total.s()).get(timeout=30) == 30
    assert retried == [3]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("celery_stored_it", [False, True], ids=["lost", "stored"])
def test_a_message_handled_by_a_dead_delivery_gets_its_recorded_outcome_once(
    celery_stored_it: bool, redis_app: Celery, redis_client: Any
) -> None:
    counter = f"handled:{uuid.uuid4().hex}"

    @task(app=redis_app, name="bridge.handled")
    def handled() -> str:
        return f"ran {redis_client.incr(counter)}"

    with embedded_worker(redis_app, pool="threads", concurrency=1):
        # Given: a delivery recorded its outcome and marked the message handled; then (the
        # "lost" case) its process died before Celery stored the result.
        first = handled.delay()
        assert first.get(timeout=10) == "ran 1"
        if not celery_stored_it:
            redis_client.delete(redis_app.backend.get_key_for_task(first.id))
        # When: a copy of the message comes (a countdown makes it claim first, as a
        # redelivered or retried message does).
        again = handled.apply_async(task_id=first.id, countdown=0.1)
        if celery_stored_it:  # .get() answers at once: give the copy time to run, if it would
            grace_until = time.monotonic() + 5
            while time.monotonic() < grace_until and redis_client.get(counter) == b"1":
                time.sleep(0.1)
        value = again.get(timeout=10)

    # Then: the function ran once; Celery has the recorded outcome.
    assert value == "ran 1"
    assert redis_client.get(counter) == b"1"
    assert history(first.id, redis_app) == ["Pending", "Running", "Completed"]
