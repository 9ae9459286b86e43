"""Retries in local runs (SPEC §3): delays, backoff, jitter and ``retry_condition_fn``.

The ``flavour`` fixture runs one body as a ``def`` and as an ``async def`` task (it is the same
helper as in ``test_engine_states.py``; a conftest would be its natural home).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from celery_taskengine import Task, exponential_backoff, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import Completed, Failed, State, StateType
from celery_taskengine.task_engine import TaskRunTimeoutError
from tests.flavours import Flavour


def always_fails() -> None:
    raise ValueError("x")


def awaiting_offsets(run: TaskRun) -> list[float]:
    """Seconds between each AwaitingRetry and the time it scheduled the retry for."""
    offsets = []
    for state in run.state_history:
        if state.name == "AwaitingRetry":
            assert state.scheduled_time is not None
            offsets.append((state.scheduled_time - state.timestamp).total_seconds())
    return offsets


# --- how many attempts, and the delay before each -------------------------------------------


def test_retries_make_at_most_retries_plus_one_attempts(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        raise ValueError("x")

    t = flavour.task(body, retries=3)

    with pytest.raises(ValueError):
        flavour.run(t)
    assert len(calls) == 4


def test_a_task_that_succeeds_on_retry_returns_its_value(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first time")
        return "second time"

    t = flavour.task(body, retries=1)

    assert flavour.run(t) == "second time"


def test_a_list_of_delays_repeats_its_last_value(flavour: Flavour) -> None:
    t = flavour.task(always_fails, retries=4, retry_delay_seconds=[0.01, 0.02])

    _, run = flavour.run_state(t)

    assert awaiting_offsets(run) == pytest.approx([0.01, 0.02, 0.02, 0.02])


def test_a_zero_delay_in_the_list_retries_at_once(flavour: Flavour) -> None:
    t = flavour.task(always_fails, retries=2, retry_delay_seconds=[0, 0.01])

    _, run = flavour.run_state(t)

    assert run.history_names() == [
        "Pending",
        "Running",
        "Retrying",
        "AwaitingRetry",
        "Retrying",
        "Failed",
    ]


def test_exponential_backoff_gives_doubling_delays() -> None:
    @task(retries=4, retry_delay_seconds=exponential_backoff(0.1))
    def backs_off() -> None: ...

    assert backs_off.engine_options.retry_delays == pytest.approx((0.1, 0.2, 0.4, 0.8))


def test_a_delay_callable_is_called_once_with_the_number_of_retries() -> None:
    asked: list[int] = []

    def delays(retries: int) -> list[float]:
        asked.append(retries)
        return [0.0] * retries

    @task(retries=3, retry_delay_seconds=delays)
    def uses_callable() -> None: ...

    assert asked == [3]
    assert uses_callable.engine_options.retry_delays == (0.0, 0.0, 0.0)


def test_jitter_spreads_delays_within_the_documented_window(flavour: Flavour) -> None:
    # Given a 0.01 s delay with jitter 0.5: each delay lies in about [0.63 d, 1.5 d]
    t = flavour.task(always_fails, retries=5, retry_delay_seconds=0.01, retry_jitter_factor=0.5)

    _, run = flavour.run_state(t)

    offsets = awaiting_offsets(run)
    assert len(offsets) == 5
    assert all(0.0062 <= offset <= 0.0151 for offset in offsets), offsets


# --- retry_condition_fn ---------------------------------------------------------------------


def test_retry_condition_is_asked_only_while_retries_remain(flavour: Flavour) -> None:
    asked: list[str | None] = []

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        asked.append(task_run.state_name)
        return True

    t = flavour.task(always_fails, retries=2, retry_condition_fn=condition)

    _, run = flavour.run_state(t)

    assert asked == ["Running", "Retrying"]
    assert run.history_names()[-1] == "Failed"


def test_retry_condition_sees_a_synthetic_failed_state_for_an_exception(flavour: Flavour) -> None:
    seen: list[tuple[Task, TaskRun, State]] = []

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        seen.append((task, task_run, state))
        return False

    t = flavour.task(always_fails, retries=1, retry_condition_fn=condition)

    _, run = flavour.run_state(t)

    [(task_seen, run_seen, state)] = seen
    assert task_seen is t
    assert run_seen is run
    assert state.type is StateType.FAILED
    assert state.message == "Task run encountered unexpected exception: ValueError('x')"
    assert isinstance(state.data, ValueError)


def test_retry_condition_receives_a_returned_failed_state_as_is(flavour: Flavour) -> None:
    returned = Failed(message="please retry")
    seen: list[State] = []
    calls: list[int] = []

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        seen.append(state)
        return True

    def body() -> Any:
        calls.append(1)
        return returned if len(calls) == 1 else "fine"

    t = flavour.task(body, retries=1, retry_condition_fn=condition)

    state, run = flavour.run_state(t)

    assert seen == [returned] and seen[0] is returned
    assert run.history_names() == ["Pending", "Running", "Retrying", "Completed"]
    assert state.result() == "fine"


def test_retry_condition_returning_false_stops_retrying(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        raise ValueError("x")

    t = flavour.task(body, retries=3, retry_condition_fn=lambda task, run, state: False)

    _, run = flavour.run_state(t)

    assert len(calls) == 1
    assert run.history_names() == ["Pending", "Running", "Failed"]


def test_retry_condition_may_be_async(flavour: Flavour) -> None:
    asked: list[int] = []

    async def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        await asyncio.sleep(0)
        asked.append(task_run.run_count)
        return task_run.run_count < 2

    t = flavour.task(always_fails, retries=5, retry_condition_fn=condition)

    _, run = flavour.run_state(t)

    assert asked == [1, 2]
    assert run.history_names() == ["Pending", "Running", "Retrying", "Failed"]


def test_a_raising_retry_condition_means_no_retry_and_is_logged(
    flavour: Flavour, caplog: pytest.LogCaptureFixture
) -> None:
    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        raise RuntimeError("condition broke")

    t = flavour.task(always_fails, retries=3, retry_condition_fn=condition)

    with caplog.at_level(logging.ERROR):
        _, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Failed"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(run.id in r.getMessage() and r.exc_info for r in errors)


def test_a_crash_never_reaches_the_retry_condition(flavour: Flavour) -> None:
    asked: list[int] = []

    def body() -> None:
        raise KeyboardInterrupt

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        asked.append(1)
        return True

    t = flavour.task(body, retries=3, retry_condition_fn=condition)

    with pytest.raises(KeyboardInterrupt):
        flavour.run(t)
    assert asked == []


# --- timeouts are retried like failures -----------------------------------------------------


def test_a_timed_out_attempt_is_retried(flavour: Flavour) -> None:
    # Given a task whose first attempt overruns its timeout and whose second is quick
    calls: list[int] = []

    def body() -> str:
        calls.append(1)
        if len(calls) == 1:
            for _ in range(300):
                time.sleep(0.01)
        return "quick"

    async def async_body() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(3)
        return "quick"

    seen: list[State] = []

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        seen.append(state)
        return True

    t = flavour.task(
        body, async_body=async_body, timeout_seconds=0.2, retries=1, retry_condition_fn=condition
    )

    # When it runs
    state, run = flavour.run_state(t)

    # Then the timeout went through the retry machinery and the retry succeeded
    assert run.history_names() == ["Pending", "Running", "Retrying", "Completed"]
    assert state.result() == "quick"
    assert isinstance(seen[0].data, TaskRunTimeoutError)


def test_a_returned_failed_state_is_retried_like_a_raised_exception(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> Any:
        calls.append(1)
        return Failed(message="not yet") if len(calls) < 3 else Completed(data="now")

    t = flavour.task(body, retries=2)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Retrying", "Retrying", "Completed"]
    assert state.result() == "now"
