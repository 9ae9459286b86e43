"""Bad input, catalogued (SPEC §8): each mistake gets a clear error naming it, and loses nothing.

One table per kind of mistake. Every case checks three things:

- the error type (for unreadable records: a warning and a miss instead of an error);
- that the message names the offending thing (option, argument, key, task, serializer, host);
- that nothing was lost or half-done: no message published (``LLEN celery`` on the broker
  database), no record written, the task not registered, or the run finished with its value.

Cases that need the Celery bridge's ``apply_async`` are strict xfails marked "bridge".
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import NotRegistered
from kombu.exceptions import OperationalError

from celery_taskengine import Task, flush_run_records, get_task_run, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import encode_record
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine.errors import (
    ReservedArgumentError,
    SerializationError,
    StoreUnavailableError,
)
from celery_taskengine.states import Completed, Pending, Running
from celery_taskengine.task_engine import run_task_sync
from tests.workers import embedded_worker

#: The queue Celery publishes to by default: a list of that name on the broker database.
BROKER_QUEUE = "celery"
#: The explicit cache key of the cached tasks below (explicit keys are used as given).
CACHE_KEY = "bad-input/answer"


def queue_length(client: Any) -> int:
    """How many messages wait on the default queue (the broker shares the test's database)."""
    return int(client.llen(BROKER_QUEUE))


def engine_keys(client: Any, kind: str) -> list[str]:
    """The raw Redis keys of the engine's records of one kind (``cache``, ``run``, ``lock``)."""
    return sorted(k.decode() for k in client.keys(f"*cte:*:{kind}:*"))


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def add(x: int, y: int) -> int:
    return x + y


#: Calls of ``answer_on_worker`` (the solo worker runs in a thread of this process).
worker_answers: list[int] = []


def answer_on_worker() -> int:
    worker_answers.append(1)
    return 42


@pytest.fixture
def worker_app(redis_app: Celery) -> Iterator[Celery]:
    """``redis_app`` with two engine tasks and a solo worker consuming them, stopped afterwards.

    Tasks must be registered before the worker starts: it builds its dispatch table then.
    """
    task(app=redis_app, name="bad_input.add")(add)
    task(app=redis_app, name="bad_input.answer", cache_key_fn=lambda ctx, params: CACHE_KEY)(
        answer_on_worker
    )
    worker_answers.clear()
    with embedded_worker(redis_app):
        yield redis_app


# === 1. Decoration options ==================================================================


def body(x: int) -> int:
    return x


def takes_return_state(x: int, return_state: bool = False) -> int:
    return x


def takes_wait_for(x: int, wait_for: Any = None) -> int:
    return x


def hook(task: Any, task_run: Any, state: Any) -> None:
    return None


def delays_that_raise(retries: int) -> list[float]:
    raise ZeroDivisionError("division by zero")


@dataclass(frozen=True)
class OptionMistake:
    """A decoration that must fail: the error type and the words its message must contain."""

    options: dict[str, Any]
    error: type[Exception]
    names: tuple[str, ...]
    fn: Callable[..., Any] = body


OPTION_MISTAKES = [
    pytest.param(OptionMistake({"retires": 3}, TypeError, ("retires", "did you mean 'retries'")),
                 id="misspelt-engine-option"),
    pytest.param(OptionMistake({"acks_lat": True}, TypeError, ("acks_lat", "'acks_late'")),
                 id="misspelt-celery-option"),
    pytest.param(OptionMistake({"max_retries": None}, TypeError, ("max_retries", "for ever")),
                 id="celery-option-that-fights-the-engine"),
    pytest.param(OptionMistake({"retries": -1}, ValueError, ("retries", ">= 0")),
                 id="negative-retries"),
    pytest.param(OptionMistake({"retries": "3"}, TypeError, ("retries", "int")),
                 id="retries-as-a-string"),
    pytest.param(OptionMistake({"timeout_seconds": math.nan}, ValueError,
                               ("timeout_seconds", "finite", "None")),
                 id="nan-timeout"),
    pytest.param(OptionMistake({"timeout_seconds": math.inf}, ValueError,
                               ("timeout_seconds", "finite", "None")),
                 id="infinite-timeout"),
    pytest.param(OptionMistake({"cache_expiration": math.inf}, ValueError,
                               ("cache_expiration", "finite")),
                 id="infinite-cache-expiration"),
    pytest.param(OptionMistake({"retries": 1, "retry_delay_seconds": [math.inf]}, ValueError,
                               ("retry_delay_seconds", "finite")),
                 id="infinite-retry-delay"),
    pytest.param(OptionMistake({"retry_jitter_factor": math.nan}, ValueError,
                               ("retry_jitter_factor", "finite")),
                 id="nan-jitter"),
    pytest.param(OptionMistake({"retries": 2, "retry_delay_seconds": delays_that_raise},
                               ValueError, ("retry_delay_seconds", "ZeroDivisionError")),
                 id="retry-delay-callable-that-raises"),
    pytest.param(OptionMistake({"retries": 51, "retry_delay_seconds": [1] * 51}, ValueError,
                               ("retry_delay_seconds", "50")),
                 id="more-than-fifty-retry-delays"),
    pytest.param(OptionMistake({"on_completion": hook}, TypeError,
                               ("on_completion", "on_completion=[my_hook]")),
                 id="hook-not-in-a-list"),
    pytest.param(OptionMistake({"on_failure": [hook, None]}, TypeError,
                               ("on_failure", "NoneType")),
                 id="hook-list-holding-a-non-callable"),
    pytest.param(OptionMistake({"cache_policy": "INPUTS"}, TypeError, ("cache_policy",)),
                 id="cache-policy-as-a-string"),
    pytest.param(OptionMistake({"result_serializer": "yaml-ish"}, ValueError,
                               ("result_serializer", "yaml-ish", "json")),
                 id="unknown-result-serializer"),
    pytest.param(OptionMistake({"tags": "etl"}, TypeError, ("tags",)),
                 id="tags-as-one-string"),
    pytest.param(OptionMistake({}, ReservedArgumentError, ("return_state", "takes_return_state"),
                               fn=takes_return_state),
                 id="reserved-parameter-return-state"),
    pytest.param(OptionMistake({}, ReservedArgumentError, ("wait_for", "takes_wait_for"),
                               fn=takes_wait_for),
                 id="reserved-parameter-wait-for"),
    pytest.param(OptionMistake({"serializer": 3}, TypeError, ("'serializer'", "str")),
                 id="message-serializer-not-a-name"),
    pytest.param(OptionMistake({"retry_condition_fn": lambda: True}, TypeError,
                               ("retry_condition_fn", "(task, task_run, state)")),
                 id="retry-condition-with-no-parameters"),
]  # fmt: skip


@pytest.mark.parametrize("mistake", OPTION_MISTAKES)
def test_a_bad_decoration_raises_naming_the_option_and_registers_nothing(
    mistake: OptionMistake,
) -> None:
    app = Celery("bad-options", set_as_current=False)
    try:
        with pytest.raises(mistake.error) as raised:
            task(app=app, name="bad_input.decorated", **mistake.options)(mistake.fn)

        for word in mistake.names:
            assert word in str(raised.value)
        assert "bad_input.decorated" not in app.tasks
    finally:
        app.close()


def test_a_lambda_can_be_decorated_and_run() -> None:
    app = Celery("bad-options", set_as_current=False)
    try:
        t = task(app=app, name="bad_input.lambda")(lambda x: x + 1)

        assert t(1) == 2
    finally:
        app.close()


def test_decorating_something_that_is_not_a_function_names_what_it_got() -> None:
    app = Celery("bad-options", set_as_current=False)
    try:
        with pytest.raises(TypeError, match="@task decorates a function, got int"):
            task(app=app)(42)  # type: ignore[arg-type]
    finally:
        app.close()


# === 2. Arguments at .delay() ===============================================================


@dataclass(frozen=True)
class DelayMistake:
    """A call that must fail before anything reaches the broker."""

    send: Callable[[Task], Any]
    error: type[Exception]
    names: tuple[str, ...]


DELAY_MISTAKES = [
    pytest.param(DelayMistake(lambda t: t.delay(object(), 1), SerializationError,
                              ("argument 'x'", "'bad_input.add'", "'object'", "'json'")),
                 id="an-object-with-the-json-serializer"),
    pytest.param(DelayMistake(lambda t: t.delay(1, y={1, 2}), SerializationError,
                              ("argument 'y'", "'bad_input.add'", "'set'", "'json'")),
                 id="a-set-with-the-json-serializer"),
    pytest.param(DelayMistake(lambda t: t.delay(1), TypeError, ("add()", "'y'")),
                 id="too-few-arguments"),
    pytest.param(DelayMistake(lambda t: t.delay(1, 2, 3), TypeError, ("add()", "3")),
                 id="too-many-arguments"),
    pytest.param(DelayMistake(lambda t: t.delay(1, z=2), TypeError, ("add()", "'z'")),
                 id="an-unknown-keyword"),
    pytest.param(DelayMistake(lambda t: t.delay(1, 2, return_state=True), TypeError,
                              ("add()", "'return_state'")),
                 id="a-local-only-engine-argument"),
    pytest.param(DelayMistake(lambda t: t.delay(1, 2, wait_for=[]), TypeError,
                              ("add()", "'wait_for'", "chain")),
                 id="wait-for-in-a-message"),
    pytest.param(DelayMistake(lambda t: t.apply_async((1, 2), wait_for=[]), TypeError,
                              ("add()", "'wait_for'", "chain")),
                 id="wait-for-as-a-send-option"),
]  # fmt: skip


@pytest.mark.parametrize("mistake", DELAY_MISTAKES)
def test_bad_arguments_fail_at_delay_naming_the_problem_and_publish_nothing(
    mistake: DelayMistake, redis_app: Celery, redis_client: Any
) -> None:
    t = task(app=redis_app, name="bad_input.add")(add)

    with pytest.raises(mistake.error) as raised:
        mistake.send(t)

    for word in mistake.names:
        assert word in str(raised.value)
    assert queue_length(redis_client) == 0
    assert engine_keys(redis_client, "run") == []


@pytest.mark.parametrize(
    ("call", "named"),
    [
        pytest.param({"args": 5}, "args", id="args-that-are-not-a-sequence"),
        pytest.param({"args": (1, 2), "kwargs": [1]}, "kwargs", id="kwargs-not-a-mapping"),
    ],
)
def test_apply_async_with_misshapen_args_or_kwargs_names_which(
    call: dict[str, Any], named: str, redis_app: Celery, redis_client: Any
) -> None:
    t = task(app=redis_app, name="bad_input.add")(add)

    with pytest.raises(TypeError) as raised:
        t.apply_async(**call)

    assert f"{named!r}" in str(raised.value) or f"{named}=" in str(raised.value)
    assert queue_length(redis_client) == 0


# === 3. A task name no worker knows =========================================================


@pytest.mark.timeout(60)
def test_an_unknown_task_name_fails_with_not_registered_and_the_worker_keeps_serving(
    worker_app: Celery,
) -> None:
    # When a producer sends a task name no worker has registered
    result = worker_app.send_task("no.such.task", args=(1,))

    # Then the result fails promptly, naming the task, instead of hanging
    with pytest.raises(NotRegistered, match=r"no\.such\.task"):
        result.get(timeout=10)
    assert get_task_run(result.id, app=worker_app) is None
    # And the worker is still there for real work
    assert worker_app.send_task("bad_input.add", args=(2, 3)).get(timeout=10) == 5


def test_an_unknown_run_id_reads_as_none(redis_app: Celery) -> None:
    assert get_task_run("no-such-run", app=redis_app) is None


# === 4. Cache records that are corrupt, foreign or not allowed ==============================


def envelope(**changes: Any) -> bytes:
    """A valid cache record of ``CACHE_KEY`` holding 41, with some fields changed (None: drop)."""
    fields = json.loads(
        encode_record(
            CACHE_KEY,
            41,
            serializer="json",
            accept=["json"],
            created_at=datetime.now(timezone.utc),
            task_name="bad_input.answer",
        )
    )
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


def pickle_envelope() -> bytes:
    """A record whose payload is a pickle (of 41): never decoded by a JSON-only app."""
    return encode_record(
        CACHE_KEY,
        41,
        serializer="pickle",
        accept=["json", "pickle"],
        created_at=datetime.now(timezone.utc),
    )


UNREADABLE_RECORDS = [
    pytest.param(lambda: b"\xff\x00\x13 not json at all", "not JSON", id="corrupt-bytes"),
    pytest.param(lambda: envelope()[:40], "not JSON", id="truncated-record"),
    pytest.param(lambda: b"[" * 100_000, "not JSON", id="json-nested-too-deeply"),
    pytest.param(lambda: json.dumps({"status": "SUCCESS", "result": 41}).encode(),
                 "not a celery-taskengine record", id="foreign-json-object"),
    pytest.param(lambda: b"41", "not a celery-taskengine record", id="bare-json-number"),
    pytest.param(lambda: envelope(cte=2), "newer envelope", id="newer-envelope-version"),
    pytest.param(pickle_envelope, "'pickle', which is not accepted", id="pickle-not-accepted"),
    pytest.param(lambda: envelope(serializer="no-such"), "'no-such'", id="unknown-serializer"),
    pytest.param(lambda: envelope(key="another/key"), "'another/key'", id="record-of-another-key"),
    pytest.param(lambda: envelope(payload="{not json"), "payload does not decode",
                 id="payload-that-does-not-decode"),
    pytest.param(lambda: envelope(created_at="2024-01-01T00:00:00"), "no time zone",
                 id="time-without-a-zone"),
    pytest.param(lambda: envelope(payload=None), "'payload'", id="missing-payload"),
]  # fmt: skip


@pytest.mark.parametrize(("planted", "reason"), UNREADABLE_RECORDS)
def test_an_unreadable_cache_record_is_a_miss_with_a_warning_and_the_task_runs(
    planted: Callable[[], bytes],
    reason: str,
    redis_app: Celery,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given an unreadable record under the key the task's result is cached at
    calls: list[int] = []

    @task(app=redis_app, name="bad_input.answer", cache_key_fn=lambda ctx, params: CACHE_KEY)
    def answer() -> int:
        calls.append(1)
        return 42

    store = RedisStore.for_app(redis_app)
    redis_client.set(store.key_for("cache", CACHE_KEY), planted())

    # When the task runs
    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        state = answer(return_state=True)

    # Then it was a miss: a warning names the key and the reason, and the function ran
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(CACHE_KEY in m and reason in m for m in warnings), warnings
    assert calls == [1]
    assert state.name == "Completed" and state.result() == 42
    # And nothing is lost: the record is replaced by a good one, which the next run reuses
    record = store.read(CACHE_KEY)
    assert record is not None and record.value == 42
    assert answer(return_state=True).name == "Cached"
    assert calls == [1]


@pytest.mark.timeout(60)
def test_an_unreadable_cache_record_is_a_miss_at_delay_and_in_the_worker(
    worker_app: Celery, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given corrupt bytes under the key of a task that a worker runs
    store = RedisStore.for_app(worker_app)
    redis_client.set(store.key_for("cache", CACHE_KEY), b"\xff\x00 garbage")
    answer = worker_app.tasks["bad_input.answer"]

    # When it is sent, Then the producer and the worker both read a miss, and the worker runs it
    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        assert answer.delay().get(timeout=10) == 42
    assert worker_answers == [1]
    assert any(CACHE_KEY in r.getMessage() for r in caplog.records)
    # And nothing is lost: the good record the worker wrote answers the next call
    again = answer.delay()
    assert again.get(timeout=10) == 42
    assert worker_answers == [1]
    run = get_task_run(again.id, app=worker_app)
    assert run is not None and run.history_names()[-1] == "Cached"


def test_an_unreadable_record_in_the_in_process_store_is_a_miss_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from celery_taskengine._store.memory import default_memory_store

    key = f"bad-input/{uuid.uuid4()}"
    app = Celery("bad-memory", set_as_current=False)  # no backend: the in-process store
    try:

        @task(app=app, name="bad_input.memory", cache_key_fn=lambda ctx, params: key)
        def answer() -> int:
            return 42

        default_memory_store().write_raw(key, b"\xff garbage")

        with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
            assert answer() == 42

        assert any(key in r.getMessage() for r in caplog.records)
        assert answer(return_state=True).name == "Cached"
    finally:
        default_memory_store().delete(key)
        app.close()


# === 5. Results: unserialisable, and large ==================================================


def test_an_unserialisable_result_is_returned_but_not_cached_with_a_warning_naming_it(
    redis_app: Celery, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @task(app=redis_app, name="bad_input.opaque", cache_key_fn=lambda ctx, params: CACHE_KEY)
    def opaque() -> object:
        return {1, 2, 3}

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        state = opaque(return_state=True)

    assert state.name == "Completed" and state.result() == {1, 2, 3}
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "bad_input.opaque" in message and CACHE_KEY in message
    assert "'set'" in message and "'json'" in message
    assert engine_keys(redis_client, "cache") == []


def test_a_20_mb_result_round_trips_through_the_redis_cache(
    redis_app: Celery, redis_client: Any
) -> None:
    # The package sets no size limit of its own (Redis allows 512 MB per value), so "oversized"
    # means "large": it must come back whole, from the cache and from the run record.
    big = "x" * (20 * 1024 * 1024 - 7) + "the end"

    @task(app=redis_app, name="bad_input.big", cache_key_fn=lambda ctx, params: CACHE_KEY)
    def produce() -> str:
        return big

    first = run_task_sync(produce, task_run_id="big-run", return_type="state")
    second = produce(return_state=True)

    assert first.name == "Completed" and second.name == "Cached"
    assert second.result() == big
    assert flush_run_records(redis_app)
    store = RedisStore.for_app(redis_app)  # read from Redis, not this process's live copy
    run = store.load_run("big-run")
    assert run is not None and run.state is not None and run.state.data == big
    assert redis_client.strlen(store.key_for("cache", CACHE_KEY)) > len(big)


# === 6. Run records that are malformed ======================================================


def run_document(**changes: Any) -> dict[str, Any]:
    """A valid run document with some fields changed."""
    history = [Pending(), Running(), Completed(data=3)]
    run = TaskRun(
        id="bad-run",
        name="add-1",
        task_name="bad_input.add",
        parameters={"x": 1, "y": 2},
        run_count=1,
        state=history[-1],
        state_history=history,
    )
    return {**run.to_document(), **changes}


def encoded(document: Any) -> bytes:
    return json.dumps(document).encode()


MALFORMED_RUNS = [
    pytest.param(b"\x80\x04 not json", id="corrupt-bytes"),
    pytest.param(b"{" * 50_000, id="json-nested-too-deeply"),
    pytest.param(encoded(["a", "list"]), id="a-json-list"),
    pytest.param(encoded({"status": "SUCCESS", "result": 3}), id="a-celery-result-lookalike"),
    pytest.param(encoded(run_document(v=99)), id="unknown-version"),
    pytest.param(encoded({k: v for k, v in run_document().items() if k != "id"}), id="no-id"),
    pytest.param(encoded(run_document(run_count="many")), id="run-count-not-a-number"),
    pytest.param(b'{"v": 1, "id": "bad-run", "name": "n", "task_name": "t", "parameters": {}, '
                 b'"tags": [], "run_count": Infinity, "start_time": null, "end_time": null, '
                 b'"state_history": []}', id="run-count-infinity"),
    pytest.param(encoded(run_document(state_history="PENDING")), id="history-not-a-list"),
    pytest.param(encoded(run_document(state_history=[{"type": "DONE", "name": "x",
                                                      "timestamp": "2024-01-01T00:00:00"}])),
                 id="unknown-state-type"),
    pytest.param(encoded(run_document(state_history=[{"type": "COMPLETED", "name": "x",
                                                      "timestamp": "yesterday"}])),
                 id="unparseable-timestamp"),
    pytest.param(encoded(run_document(state_history=[{"type": "FAILED", "name": "x",
                                                      "timestamp": "2024-01-01T00:00:00",
                                                      "exception": "boom"}])),
                 id="exception-not-an-object"),
    pytest.param(encoded(run_document(tags=[["unhashable"]])), id="tags-not-strings"),
]  # fmt: skip


@pytest.mark.parametrize("raw", MALFORMED_RUNS)
def test_a_malformed_run_record_reads_as_none_with_a_warning_naming_the_run(
    raw: bytes, redis_app: Celery, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(RedisStore.for_app(redis_app).key_for("run", "bad-run"), raw)

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        assert get_task_run("bad-run", app=redis_app) is None

    assert any("'bad-run'" in r.getMessage() for r in caplog.records)


# === 7. User code around the task that raises or hangs ======================================


def boom(*args: Any) -> Any:
    raise RuntimeError("boom from user code")


def nap(*args: Any) -> None:
    time.sleep(0.5)
    naps.append("done")


naps: list[str] = []


def returns_seven() -> int:
    return 7


def fails_once_then_returns(calls: list[int]) -> Callable[[], int]:
    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first attempt fails")
        return 7

    return flaky


@dataclass(frozen=True)
class Misbehaving:
    """User code given as an option that misbehaves, and what the run must still end as."""

    options: dict[str, Any]
    fails_first: bool
    history: list[str]
    logged: str = "boom from user code"
    #: Commit hooks run inside a transaction, which knows its key but not the run.
    logged_with_key: bool = False


MISBEHAVING = [
    pytest.param(Misbehaving({"on_running": [boom]}, False,
                             ["Pending", "Running", "Completed"]),
                 id="on-running-hook-raises"),
    pytest.param(Misbehaving({"on_completion": [boom]}, False,
                             ["Pending", "Running", "Completed"]),
                 id="on-completion-hook-raises"),
    pytest.param(Misbehaving({"on_failure": [boom]}, True,
                             ["Pending", "Running", "Failed"]),
                 id="on-failure-hook-raises"),
    pytest.param(Misbehaving({"retries": 2, "retry_condition_fn": boom}, True,
                             ["Pending", "Running", "Failed"], logged="retry_condition_fn"),
                 id="retry-condition-raises"),
    pytest.param(Misbehaving({"cache_key_fn": boom}, False,
                             ["Pending", "Running", "Completed"], logged="cannot compute"),
                 id="cache-key-fn-raises"),
    pytest.param(Misbehaving({"cache_key_fn": lambda ctx, params: CACHE_KEY, "on_commit": [boom]},
                             False, ["Pending", "Running", "Completed"], logged_with_key=True),
                 id="on-commit-hook-raises"),
]  # fmt: skip


@pytest.mark.parametrize("case", MISBEHAVING)
def test_user_code_that_raises_is_logged_with_the_run_id_and_the_outcome_stands(
    case: Misbehaving, redis_app: Celery, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    fn = fails_once_then_returns(calls) if case.fails_first else returns_seven
    t = task(app=redis_app, name="bad_input.user_code", **case.options)(fn)
    run_id = f"run-{uuid.uuid4()}"

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        state = run_task_sync(t, task_run_id=run_id, return_type="state")

    run = get_task_run(run_id, app=redis_app)
    assert run is not None and run.history_names() == case.history
    assert len(calls) == (1 if case.fails_first else 0)
    if case.fails_first:
        assert isinstance(state.result(raise_on_failure=False), ValueError)
    else:
        assert state.result() == 7
    identity = CACHE_KEY if case.logged_with_key else run_id
    logged = [r for r in caplog.records if identity in r.getMessage()]
    assert logged, [r.getMessage() for r in caplog.records]
    assert any(case.logged in (r.getMessage() + str(r.exc_info and r.exc_info[1])) for r in logged)
    # A commit hook that raises skips the write: nothing half-committed is left behind
    assert engine_keys(redis_client, "cache") == []


def test_a_slow_hook_is_not_bounded_and_the_run_waits_for_it(redis_app: Celery) -> None:
    # Hooks run inline and have no timeout of their own: a hook that hangs holds the run (and,
    # in a worker, the worker slot). This pins that down; bound slow work inside the hook.
    naps.clear()
    t = task(app=redis_app, name="bad_input.napping", on_completion=[nap])(returns_seven)

    assert t() == 7
    assert naps == ["done"]


# === 8. Services that are down ==============================================================


@pytest.mark.timeout(30)
def test_a_broker_that_is_down_at_delay_raises_operational_error_naming_it(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    # Given an app whose broker is a closed port, set not to retry (the result backend is up)
    port = closed_port()
    app = redis_app_factory(
        broker_url=f"redis://127.0.0.1:{port}/0",
        broker_connection_retry=False,
        broker_connection_timeout=1,
        task_publish_retry=False,
    )
    t = task(app=app, name="bad_input.add")(add)

    # When a task is sent, Then the producer gets a connection error naming the broker at once
    with pytest.raises(OperationalError, match=str(port)):
        t.delay(1, 2)

    # And no run record claims a run that was never sent
    assert engine_keys(redis_client, "run") == []


@pytest.mark.timeout(30)
def test_a_result_backend_that_is_down_fails_a_cached_run_before_calling_the_function(
    redis_app_factory: Callable[..., Celery],
) -> None:
    # A cache read must reach the backend: without it the run cannot know whether to execute
    port = closed_port()
    app = redis_app_factory(result_backend=f"redis://127.0.0.1:{port}/0")
    calls: list[int] = []

    @task(app=app, name="bad_input.unstored", cache_key_fn=lambda ctx, params: CACHE_KEY)
    def unstored() -> int:
        calls.append(1)
        return 1

    with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
        unstored()
    assert calls == []


@pytest.mark.timeout(30)
def test_a_result_backend_that_is_down_still_lets_an_uncached_local_run_return_its_value(
    redis_app_factory: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    # Local runs record themselves on the backend from a background thread: the caller gets
    # its value, and the record that could not be written is reported with the run id.
    port = closed_port()
    app = redis_app_factory(result_backend=f"redis://127.0.0.1:{port}/0")
    t = task(app=app, name="bad_input.unrecorded")(returns_seven)
    run_id = f"run-{uuid.uuid4()}"

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        assert run_task_sync(t, task_run_id=run_id) == 7
        flush_run_records()

    report = next(r for r in caplog.records if run_id in r.getMessage())
    assert report.exc_info is not None and f"127.0.0.1:{port}" in str(report.exc_info[1])


def test_a_message_serializer_kombu_does_not_know_yet_is_said_at_decoration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Celery("bad-serializer", set_as_current=False)
    with caplog.at_level(logging.WARNING):
        task(app=app, name="bad.serializer", serializer="nope")(body)
    assert any(
        "'nope'" in r.getMessage() and "serializer" in r.getMessage() for r in caplog.records
    )
