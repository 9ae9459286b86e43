"""The Celery bridge against real brokers and real in-process workers.

Core behaviour runs twice, with Redis as broker and with RabbitMQ as broker (Redis is the result
backend in both): results and exceptions, run records, retries that leave the worker, events,
async and generator tasks, the producer side, canvas and cancellation. Each broker gets one
solo worker for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import chain, chord, group
from celery.events.state import State as MonitorState
from celery.result import AsyncResult
from celery.utils.nodenames import anon_nodename

from celery_taskengine import get_task_run, stream
from celery_taskengine._celery.producer import CachedResult
from celery_taskengine.errors import SerializationError, TaskRunTimeoutError
from tests.bridge_app import side
from tests.bridge_workers import EventRecorder, Worker, broker_url, in_process_worker, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", params=["redis", "amqp"])
def worker(request: pytest.FixtureRequest, redis_server: str) -> Iterator[Worker]:
    """A solo worker for the module, on the broker named by the parameter."""
    backend = f"{redis_server}/0"
    with in_process_worker(broker_url(request.param, backend), backend) as running:
        yield running


def run_of(w: Worker, result: AsyncResult) -> Any:
    return get_task_run(result.id, app=w.app)


def state_name(w: Worker, result: AsyncResult) -> str | None:
    run = run_of(w, result)
    return run.state_name if run is not None else None


def history(w: Worker, result: AsyncResult) -> list[str]:
    run = run_of(w, result)
    return run.history_names() if run is not None else []


def queue_length(w: Worker, queue: str) -> int:
    """Messages waiting in ``queue`` (declaring it again, as created, reports the count)."""
    with w.app.connection_for_write() as connection:
        declared = connection.default_channel.queue_declare(queue, durable=True, auto_delete=False)
        return int(declared.message_count)


@pytest.fixture
def idle_queue(worker: Worker) -> Iterator[str]:
    """A queue no worker consumes, to see whether a message was published."""
    name = f"{worker.queue}-idle"
    with worker.app.connection_for_write() as connection:
        connection.default_channel.queue_declare(name, durable=True, auto_delete=False)
    yield name
    with worker.app.connection_for_write() as connection:
        connection.default_channel.queue_delete(name)


# -- results, exceptions and run records ------------------------------------------------------


def test_a_task_sent_to_a_worker_returns_its_value_and_records_its_run(worker: Worker) -> None:
    result = worker.tasks.add.delay(2, 3)

    assert result.get(timeout=10) == 5
    run = run_of(worker, result)
    assert run.id == result.id
    assert run.task_name == "bridge.add"
    assert run.parameters == {"a": 2, "b": 3}
    assert run.history_names() == ["Pending", "Running", "Completed"]
    assert run.run_count == 1
    assert run.state.data == 5


def test_a_failing_task_raises_its_exception_from_get_and_is_recorded_failed(
    worker: Worker,
) -> None:
    result = worker.tasks.fail.delay("boom")

    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=10)
    run = run_of(worker, result)
    assert run.history_names() == ["Pending", "Running", "Failed"]
    assert run.state.message == "Task run encountered an exception ValueError: boom"
    assert result.state == "FAILURE"


def test_the_backend_shows_the_engine_state_while_the_task_runs(worker: Worker) -> None:
    started, gate = worker.key("started"), worker.key("gate")
    result = worker.tasks.blocker.delay(started, gate)
    wait_for(lambda: side(worker.app).exists(started), what="the task to start")

    wait_for(lambda: AsyncResult(result.id, app=worker.app).state == "RUNNING", what="RUNNING")
    assert AsyncResult(result.id, app=worker.app).info["engine_state"] == "Running"
    wait_for(lambda: history(worker, result) == ["Pending", "Running"], what="the record")
    side(worker.app).set(gate, 1)

    assert result.get(timeout=10) == "unblocked"
    assert result.state == "SUCCESS"
    assert history(worker, result) == ["Pending", "Running", "Completed"]


def test_a_second_message_for_a_finished_run_returns_the_recorded_value_without_running_again(
    worker: Worker,
) -> None:
    counter = worker.key("counter")
    first = worker.tasks.counted_add.delay(1, 2, counter)
    assert first.get(timeout=10) == 3

    # A message Celery would send again for the same run (a retry, a redelivery).
    again = worker.tasks.counted_add.apply_async((1, 2, counter), task_id=first.id, retries=1)

    assert again.get(timeout=10) == 3
    assert int(side(worker.app).get(counter)) == 1
    assert history(worker, first) == ["Pending", "Running", "Completed"]


# -- retries --------------------------------------------------------------------------------


def test_a_retry_with_a_delay_leaves_the_only_worker_slot_free_for_other_tasks(
    worker: Worker,
) -> None:
    counter, done = worker.key("counter"), worker.key("done")
    slow = worker.tasks.slow_retry.delay(counter, done)
    wait_for(lambda: state_name(worker, slow) == "AwaitingRetry", what="AwaitingRetry")
    wait_for(lambda: AsyncResult(slow.id, app=worker.app).state == "AWAITING_RETRY")

    # The solo worker runs another task while the first one waits for its retry.
    assert worker.tasks.mark.delay(done, "other").get(timeout=10) == "other"
    assert run_of(worker, slow).state.name == "AwaitingRetry"

    assert slow.get(timeout=15) == "retried"
    assert side(worker.app).lrange(done, 0, -1) == [b"other", b"slow_retry"]
    run = run_of(worker, slow)
    assert run.history_names() == ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    assert run.run_count == 2


def test_engine_retries_are_announced_as_task_events_with_engine_fields(worker: Worker) -> None:
    counter = worker.key("counter")
    with EventRecorder(worker.app) as events:
        result = worker.tasks.flaky.delay(counter, 1)
        assert result.get(timeout=15) == "finally"
        # Celery's own task events may lag (a worker buffers them); ours go out at once.
        wait_for(lambda: "task-retrying" in events.types_of(result.id), what="task-retrying")

    by_type = {event["type"]: event for event in events.of(result.id)}
    awaiting, retrying = by_type["task-awaiting-retry"], by_type["task-retrying"]
    assert (awaiting["engine_state"], awaiting["run_count"], awaiting["retries"]) == (
        "AwaitingRetry",
        1,
        0,
    )
    assert awaiting["eta"]
    assert (retrying["engine_state"], retrying["run_count"], retrying["retries"]) == (
        "Retrying",
        2,
        1,
    )
    ours = [e for e in events.of(result.id) if "engine_state" in e]
    assert all("state" not in e and "worker" not in e for e in ours)
    assert not {"task-retry", "task-success"} & set(events.types_of(result.id))


def test_a_monitor_shows_a_task_awaiting_its_retry(worker: Worker) -> None:
    with EventRecorder(worker.app) as events:
        result = worker.tasks.flaky.delay(worker.key("counter"), 1)
        assert result.get(timeout=15) == "finally"
        wait_for(lambda: "task-retrying" in events.types_of(result.id), what="task-retrying")

    monitor = MonitorState()  # what Flower and `celery events` build from events
    for event in events.of(result.id):
        monitor.event(dict(event))
        if event["type"] == "task-awaiting-retry":
            break
    assert monitor.tasks[result.id].state == "AWAITING-RETRY"


# -- async and generator tasks --------------------------------------------------------------


def test_async_tasks_run_on_one_event_loop_per_worker_process(worker: Worker) -> None:
    first = worker.tasks.loop_id.delay().get(timeout=10)
    second = worker.tasks.loop_id.delay().get(timeout=10)

    assert first == second  # same process, same loop object
    assert worker.tasks.async_add.delay(2, 2).get(timeout=10) == 4


def test_a_generator_tasks_items_reach_the_caller_while_it_runs(worker: Worker) -> None:
    gate = worker.key("gate")
    result = worker.tasks.gen_gated.delay(3, gate)
    items = stream(result, timeout=20)

    assert next(items) == 0
    assert not result.ready()  # the task is still waiting for the gate
    side(worker.app).set(gate, 1)
    assert list(items) == [1, 2]
    assert result.get(timeout=10) == [0, 1, 2]


def test_stream_raises_a_failed_generators_exception_after_its_items(worker: Worker) -> None:
    received = []
    with pytest.raises(ValueError, match="generator broke"):
        for item in stream(worker.tasks.gen_fail.delay(), timeout=20):
            received.append(item)
    assert received == [1]


def test_an_async_generator_task_streams_its_items_and_returns_them_all(worker: Worker) -> None:
    result = worker.tasks.agen.delay(3)

    assert list(stream(result, timeout=20)) == [0, 1, 2]
    assert result.get(timeout=10) == [0, 1, 2]


# -- the producer side ----------------------------------------------------------------------


def test_unserializable_arguments_fail_at_delay_naming_the_argument_and_serializer(
    worker: Worker, idle_queue: str
) -> None:
    with pytest.raises(SerializationError, match=r"argument 'a' .*'object'.*'json'"):
        worker.tasks.add.apply_async((object(), 1), queue=idle_queue)
    assert queue_length(worker, idle_queue) == 0


def test_wrong_arity_fails_at_delay(worker: Worker, idle_queue: str) -> None:
    with pytest.raises(TypeError):
        worker.tasks.add.apply_async((1,), queue=idle_queue)
    assert queue_length(worker, idle_queue) == 0


def test_a_cached_result_is_returned_at_delay_without_publishing(
    worker: Worker, idle_queue: str
) -> None:
    counter = worker.key("counter")
    assert worker.tasks.cached.delay(7, counter).get(timeout=10) == 70

    hit = worker.tasks.cached.apply_async((7, counter), queue=idle_queue)

    assert isinstance(hit, CachedResult)
    assert hit.get() == 70
    assert queue_length(worker, idle_queue) == 0
    assert int(side(worker.app).get(counter)) == 1
    assert history(worker, hit) == ["Pending", "Cached"]
    assert AsyncResult(hit.id, app=worker.app).get(timeout=5) == 70


def test_a_cached_task_inside_a_chain_is_still_sent_to_the_worker(worker: Worker) -> None:
    counter = worker.key("counter")
    assert worker.tasks.cached.delay(3, counter).get(timeout=10) == 30

    result = chain(worker.tasks.cached.s(3, counter), worker.tasks.add.s(1)).apply_async()

    assert result.get(timeout=10) == 31
    assert history(worker, result.parent) == ["Pending", "Running", "Cached"]


# -- canvas ---------------------------------------------------------------------------------


def test_chains_groups_and_chords_mix_engine_and_plain_tasks(worker: Worker) -> None:
    t = worker.tasks
    counter = worker.key("counter")

    assert chain(t.add.s(1, 2), t.plain_add.s(3), t.add.s(4)).apply_async().get(timeout=15) == 10
    assert group(t.add.s(1, 1), t.plain_add.s(2, 2), t.async_add.s(3, 3)).apply_async().get(
        timeout=15
    ) == [2, 4, 6]
    header = [t.flaky_int.s(counter, 1, 5), t.add.s(1, 1)]
    assert chord(header, t.plain_sum.s()).apply_async().get(timeout=20) == 7


def test_a_retry_inside_a_chord_header_keeps_the_chord_waiting_for_it(worker: Worker) -> None:
    t = worker.tasks
    counter = worker.key("counter")
    flaky = t.flaky_int.s(counter, 1, 40)
    flaky_id = flaky.freeze().id

    result = chord([flaky, t.plain_add.s(1, 1)], t.plain_sum.s()).apply_async()

    assert result.get(timeout=20) == 42
    assert history(worker, AsyncResult(flaky_id)) == [
        "Pending",
        "Running",
        "AwaitingRetry",
        "Retrying",
        "Completed",
    ]


def test_identical_calls_in_one_workflow_share_a_result_but_separate_calls_do_not(
    worker: Worker,
) -> None:
    counter = worker.key("counter")
    t = worker.tasks

    shared = group(t.per_workflow.s(1, counter), t.per_workflow.s(1, counter)).apply_async()

    assert shared.get(timeout=15) == [101, 101]
    assert int(side(worker.app).get(counter)) == 1
    finals = sorted(history(worker, member)[-1] for member in shared.results)
    assert finals == ["Cached", "Completed"]

    alone = t.per_workflow.delay(1, counter)
    assert alone.get(timeout=10) == 101
    assert int(side(worker.app).get(counter)) == 2
    assert history(worker, alone)[-1] == "Completed"


# -- timeouts in the in-process pools -------------------------------------------------------


def test_a_sync_task_times_out_in_the_solo_pool(worker: Worker) -> None:
    result = worker.tasks.sleepy.delay(5)

    with pytest.raises(TaskRunTimeoutError):
        result.get(timeout=4)
    assert history(worker, result) == ["Pending", "Running", "TimedOut"]


# -- cancellation ---------------------------------------------------------------------------


def test_revoking_a_queued_task_records_its_run_cancelled(worker: Worker) -> None:
    parked = f"{worker.queue}-parked"
    queued = worker.tasks.add.apply_async((1, 1), queue=parked)

    queued.revoke()
    # Control commands run in order: the worker knows of the revoke before it sees the message.
    worker.app.control.add_consumer(parked, reply=True, destination=[hostname_of(worker)])

    wait_for(lambda: history(worker, queued) == ["Pending", "Cancelled"], what="Cancelled")
    assert run_of(worker, queued).state.message == "The task run was revoked."
    assert AsyncResult(queued.id, app=worker.app).state == "REVOKED"
    worker.app.control.cancel_consumer(parked, reply=True, destination=[hostname_of(worker)])


def test_revoking_a_task_awaiting_its_retry_records_its_run_cancelled(worker: Worker) -> None:
    counter, done = worker.key("counter"), worker.key("done")
    result = worker.tasks.slow_retry.delay(counter, done)
    wait_for(lambda: state_name(worker, result) == "AwaitingRetry", what="AwaitingRetry")

    result.revoke()

    expected = ["Pending", "Running", "AwaitingRetry", "Cancelled"]
    wait_for(lambda: history(worker, result) == expected, timeout=10, what="Cancelled")
    assert int(side(worker.app).get(counter)) == 1
    assert AsyncResult(result.id, app=worker.app).state == "REVOKED"


def hostname_of(w: Worker) -> str:
    """The node name of the in-process worker (other workers may share the broker)."""
    return str(anon_nodename())  # start_worker's default: it runs in this process
