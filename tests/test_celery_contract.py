"""Celery's contract for results and control flow holds for engine tasks, in real workers.

``ignore_result`` stores no task meta at any time; ``Reject`` and ``Ignore`` raised in the
body mean what they mean in Celery; arguments that do not fit raise ``TypeError`` at once;
chord error callbacks get what they get with plain tasks; a retry's wait shows the exception
being retried. Each runs on Redis as broker and on RabbitMQ (Redis is the result backend).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import chord
from celery.exceptions import ChordError, Reject
from celery.result import AsyncResult

from celery_taskengine import get_task_run
from tests.bridge_workers import broker_url, wait_for
from tests.contract_app import contract_worker, history, key, meta_written, side, watch_for_meta

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["redis", "amqp"])
def worker(request: pytest.FixtureRequest, redis_server: str) -> Iterator[SimpleNamespace]:
    backend = f"{redis_server}/0"
    with contract_worker(broker_url(request.param, backend), backend) as running:
        yield running


# -- ignore_result ---------------------------------------------------------------------------


def test_an_ignore_result_call_stores_no_task_meta_while_running_retrying_or_after(
    worker: SimpleNamespace,
) -> None:
    counter, gate = key("counter"), key("gate")
    result = worker.tasks.gated.apply_async((counter, gate, 1), ignore_result=True)
    wait_for(lambda: "AwaitingRetry" in history(worker.app, result.id), what="the retry")
    assert not meta_written(worker.app, result.id)
    side(worker.app).set(gate, 1)

    assert watch_for_meta(worker.app, result.id) == []
    assert history(worker.app, result.id) == [
        "Pending", "Running", "AwaitingRetry", "Retrying", "Completed",
    ]  # fmt: skip
    assert AsyncResult(result.id, app=worker.app).state == "PENDING"


def test_a_task_with_ignore_result_stores_no_task_meta(worker: SimpleNamespace) -> None:
    result = worker.tasks.ignoring.delay(5)

    assert watch_for_meta(worker.app, result.id) == []
    assert history(worker.app, result.id) == ["Pending", "Running", "Completed"]


# -- Reject and Ignore -----------------------------------------------------------------------


def test_reject_with_requeue_redelivers_the_message_and_the_run_goes_on(
    worker: SimpleNamespace,
) -> None:
    counter = key("counter")
    result = worker.tasks.reject_once.delay(counter)

    assert result.get(timeout=30) == "second pass, redelivered=True"
    assert result.state == "SUCCESS"
    assert int(side(worker.app).get(counter)) == 2
    run = get_task_run(result.id, app=worker.app)
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "Requeued", "Retrying", "Completed"]
    assert run.run_count == 2


def test_reject_without_requeue_stores_failure_and_is_never_retried(
    worker: SimpleNamespace,
) -> None:
    counter = key("counter")
    result = worker.tasks.reject_for_good.delay(counter)

    with pytest.raises(Reject):
        result.get(timeout=20)
    assert result.state == "FAILURE"
    assert int(side(worker.app).get(counter)) == 1  # retries=2, but a Reject is Celery's
    assert history(worker.app, result.id) == ["Pending", "Running", "Failed"]


def test_ignore_stores_nothing_and_is_never_retried(worker: SimpleNamespace) -> None:
    counter = key("counter")
    result = worker.tasks.ignore.delay(counter)

    wait_for(lambda: "Ignored" in history(worker.app, result.id), what="the run to end")
    assert history(worker.app, result.id) == ["Pending", "Running", "Ignored"]
    time.sleep(0.5)  # anything Celery or the bridge would store after the body has landed
    assert int(side(worker.app).get(counter)) == 1
    # Only the RUNNING the attempt started with (Celery's STARTED, were it tracked) is there.
    assert AsyncResult(result.id, app=worker.app).state in ("PENDING", "RUNNING")


# -- arguments that do not fit ---------------------------------------------------------------


def test_arguments_that_do_not_fit_raise_type_error_locally_and_at_delay(
    worker: SimpleNamespace,
) -> None:
    add = worker.tasks.add
    with pytest.raises(TypeError):
        add(5)
    with pytest.raises(TypeError, match="wrong_arg"):
        add(5, 5, wrong_arg=5)
    with pytest.raises(TypeError):
        add.delay(5)
    with pytest.raises(TypeError):
        add.delay(5, 5, wrong_arg=5)
    assert add(5, 5, z=1) == 11


def test_a_typing_false_task_is_sent_and_fails_in_the_worker_with_type_error(
    worker: SimpleNamespace,
) -> None:
    for args, kwargs in (((5,), {}), ((5, 5), {"wrong_arg": 5})):
        result = worker.tasks.add_not_typed.apply_async(args, kwargs)
        with pytest.raises(TypeError):
            result.get(timeout=20)
        assert result.state == "FAILURE"


# -- chord error callbacks -------------------------------------------------------------------


def test_a_chord_error_callback_gets_the_failed_task_and_the_header_results_survive(
    worker: SimpleNamespace,
) -> None:
    t, errors = worker.tasks, key("errors")
    header = [t.add.s(1, 2), t.add.s(3, 4), t.fail.s("boom")]
    result = chord(header, t.tsum.s().on_error(t.record_error.s(errors))).apply_async()

    with pytest.raises((ChordError, ValueError)):
        result.get(timeout=30, propagate=True)
    wait_for(lambda: side(worker.app).llen(errors), what="the errback")
    errback_got = side(worker.app).lrange(errors, 0, -1)[0].decode()
    assert errback_got == result.id  # an old-style errback gets the failed task's id
    failure = AsyncResult(errback_got, app=worker.app).result
    assert isinstance(failure, ChordError)
    group_result = result.parent
    values = [r.result for r in group_result.results if r.successful()]
    assert sorted(values) == [3, 7]


# -- the wait for a retry --------------------------------------------------------------------


def test_the_backend_shows_awaiting_retry_with_the_exception_being_retried(
    worker: SimpleNamespace,
) -> None:
    counter, gate = key("counter"), key("gate")
    result = worker.tasks.gated.delay(counter, gate, 1)
    backend = worker.app.backend

    wait_for(lambda: result.state == "AWAITING_RETRY", what="AWAITING_RETRY")
    meta = backend.get_task_meta(result.id)
    info = meta["result"]
    assert info["engine_state"] == "AwaitingRetry"
    assert info["exc_type"] == "ConnectionError"
    exc = backend.exception_to_python(info)
    assert isinstance(exc, ConnectionError)
    assert str(exc) == "not yet"
    assert "ConnectionError: not yet" in meta["traceback"]
    side(worker.app).set(gate, 1)
    assert result.get(timeout=20) == 2
