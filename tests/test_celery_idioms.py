"""Celery's task idioms on engine tasks, in local runs: Celery's decorators, ``bind=True``,
``self.request`` and ``self.retry()`` (the worker side is in test_celery_idioms_worker.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task
from celery import _state as celery_state
from celery.exceptions import MaxRetriesExceededError

from celery_taskengine import Task, get_task_run, task


@pytest.fixture
def app() -> Iterator[Celery]:
    own = Celery("celery-idioms-tests", set_as_current=False)
    yield own
    own.close()


def test_app_task_with_base_task_is_an_engine_task_with_engine_options(app: Celery) -> None:
    failures: list[str] = []

    @app.task(base=Task, name="idioms.local_add", retries=1, retry_delay_seconds=0, shared=False,
              on_failure=[lambda t, run, state: failures.append(state.name)])  # fmt: skip
    def add(x: int, y: int) -> int:
        return x + y

    state = add(1, 2, return_state=True)
    add(1, "2", return_state=True)  # TypeError, retried once, then the engine's hook

    assert state.result() == 3
    assert failures == ["Failed"]
    assert add.engine_options.retries == 1
    assert callable(Task.on_failure) and add.on_failure.__func__ is Task.on_failure
    assert app.tasks["idioms.local_add"].engine_options is add.engine_options


def test_app_task_with_base_task_validates_options_when_celery_builds_it(app: Celery) -> None:
    app.finalize()  # else Celery builds the task lazily, at its first use

    with pytest.raises(TypeError, match="retries"):

        @app.task(base=Task, name="idioms.bad", retries="many", shared=False)
        def bad() -> None:
            return None


def test_celerys_shared_task_with_base_task_is_an_engine_task(app: Celery) -> None:
    # Celery resolves a shared task in the current app: this test's (earlier tests in the same
    # process may have left any app current).
    previous = celery_state.get_current_app()
    app.set_current()

    @shared_task(base=Task, name="idioms.shared_double", max_retries=2)
    def double(x: int) -> int:
        return 2 * x

    try:
        assert double(4) == 8
        assert double.engine_options.retries == 2
    finally:
        previous.set_current()


def test_bind_passes_the_task_and_the_request_describes_the_run(app: Celery) -> None:
    seen: list[tuple[Any, ...]] = []

    @task(app=app, bind=True, retries=2, retry_delay_seconds=0)
    def flaky(self: Any, x: int) -> int:
        request = self.request
        seen.append((self, request.id, request.retries, request.headers, request.delivery_info))
        if request.retries < 2:
            raise ConnectionError("down")
        return x

    state = flaky(5, return_state=True)

    run_id = seen[0][1]
    assert state.result() == 5
    assert [s[0] for s in seen] == [flaky] * 3
    assert [s[2] for s in seen] == [0, 1, 2]
    assert {s[1] for s in seen} == {run_id}
    assert get_task_run(run_id) is not None
    assert seen[0][3] == {} and seen[0][4] == {}
    assert flaky.request.id is None  # outside a run: Celery's own request


def test_self_retry_is_an_engine_retry_with_the_countdown_asked_for(app: Celery) -> None:
    ids: list[str] = []

    @task(app=app, bind=True, max_retries=1)
    def once_more(self: Any) -> str:
        ids.append(self.request.id)
        if self.request.retries == 0:
            raise self.retry(exc=LookupError("not yet"), countdown=0.2)
        return "done"

    assert once_more() == "done"
    run = get_task_run(ids[0])
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    awaiting = run.state_history[2]
    assert awaiting.scheduled_time is not None
    waited = (awaiting.scheduled_time - awaiting.timestamp).total_seconds()
    assert waited == pytest.approx(0.2, abs=0.01)


def test_self_retry_past_the_limit_raises_exc_or_max_retries_exceeded(app: Celery) -> None:
    @task(app=app, bind=True, max_retries=1)
    def always(self: Any, with_exc: bool) -> None:
        raise self.retry(exc=KeyError("gone") if with_exc else None, countdown=0)

    with pytest.raises(KeyError, match="gone"):
        always(True)
    with pytest.raises(MaxRetriesExceededError):
        always(False)


def test_self_retry_without_a_count_gets_celerys_three_retries_and_errors_none(
    app: Celery,
) -> None:
    attempts: list[int] = []

    @task(app=app, bind=True)
    def asks(self: Any) -> None:
        attempts.append(self.request.retries)
        raise self.retry(exc=KeyError("gone"), countdown=0)

    @task(app=app, bind=True)
    def raises(self: Any) -> None:
        attempts.append(self.request.retries)
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        asks()
    assert attempts == [0, 1, 2, 3]  # Celery's default max_retries for self.retry()
    attempts.clear()
    with pytest.raises(KeyError, match="gone"):
        raises()
    assert attempts == [0]  # an exception the body raises is retried only `retries` times


def test_self_retry_with_a_count_of_zero_given_retries_never(app: Celery) -> None:
    @task(app=app, bind=True, retries=0)
    def asks(self: Any) -> None:
        raise self.retry(countdown=0)

    with pytest.raises(MaxRetriesExceededError):
        asks()


def test_self_retry_with_new_arguments_is_refused_naming_them(app: Celery) -> None:
    @task(app=app, bind=True, max_retries=1)
    def moving(self: Any, x: int) -> None:
        raise self.retry(args=(x + 1,), queue="other")

    with pytest.raises(TypeError, match="args=, queue="):
        moving(1)


def test_self_retry_outside_a_run_is_celerys(app: Celery) -> None:
    @task(app=app, bind=True)
    def plain(self: Any) -> None:
        return None

    # Called directly (no run, no worker), Celery's retry raises the exception given.
    with pytest.raises(KeyError):
        plain.retry(exc=KeyError("direct"))
