"""The engine's state histories (SPEC §2), for ``def`` and ``async def`` tasks alike.

Each test builds its task through the ``flavour`` fixture, which makes the same body a sync or
an async task and runs it with ``run_task_sync`` or ``run_task_async``: where the two must
behave the same, one test body checks both.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from celery_taskengine import FailedRun, Task, get_task_run, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.states import (
    Completed,
    Failed,
    Pending,
    Running,
    Scheduled,
    State,
    StateType,
    is_legal_transition,
    utcnow,
)
from celery_taskengine.task_engine import TaskRunTimeoutError, run_task_async
from tests.flavours import Flavour


def assert_valid_history(run: TaskRun) -> None:
    """Every step of the history is a legal transition, in time order, from Pending."""
    history = run.state_history
    assert history[0].name == "Pending"
    assert run.state is history[-1]
    for before, after in itertools.pairwise(history):
        assert is_legal_transition(before, after), f"{before} -> {after}"
        assert before.timestamp <= after.timestamp


# --- success --------------------------------------------------------------------------------


def test_success_goes_pending_running_completed(flavour: Flavour) -> None:
    def double(x: int) -> int:
        return x * 2

    t = flavour.task(double)

    state, run = flavour.run_state(t, {"x": 21})

    assert run.history_names() == ["Pending", "Running", "Completed"]
    assert state.type is StateType.COMPLETED and state.result() == 42
    assert_valid_history(run)


def test_success_in_result_mode_returns_the_very_object(flavour: Flavour) -> None:
    value = object()

    def give() -> object:
        return value

    t = flavour.task(give)

    assert flavour.run(t) is value


def test_a_finished_run_records_run_count_and_times(flavour: Flavour) -> None:
    def ok() -> str:
        return "ok"

    t = flavour.task(ok)

    _, run = flavour.run_state(t)

    running, completed = run.state_history[1], run.state_history[2]
    assert run.run_count == 1
    assert run.start_time == running.timestamp
    assert run.end_time == completed.timestamp
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time <= run.end_time


# --- exceptions -----------------------------------------------------------------------------


def test_exception_without_retries_fails_with_the_reference_message(flavour: Flavour) -> None:
    def body() -> None:
        raise ValueError("xyz")

    t = flavour.task(body)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Failed"]
    assert state.type is StateType.FAILED
    assert state.message == "Task run encountered an exception ValueError: xyz"
    assert isinstance(state.data, ValueError)
    assert_valid_history(run)


def test_exception_in_result_mode_raises_the_same_exception_object(flavour: Flavour) -> None:
    raised: list[BaseException] = []

    def body() -> None:
        error = ValueError("xyz")
        raised.append(error)
        raise error

    t = flavour.task(body)

    with pytest.raises(ValueError) as info:
        flavour.run(t)
    assert info.value is raised[0]


# --- retries --------------------------------------------------------------------------------


def test_retry_without_delay_goes_straight_to_retrying(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        raise ValueError("again")

    t = flavour.task(body, retries=2)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Retrying", "Retrying", "Failed"]
    assert len(calls) == 3
    assert run.run_count == 3
    assert state.name == "Failed"
    assert_valid_history(run)


def test_retry_without_delay_never_enters_failed_before_the_end(flavour: Flavour) -> None:
    calls: list[int] = []

    def body() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")
        return "done"

    t = flavour.task(body, retries=5)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Retrying", "Retrying", "Completed"]
    assert state.result() == "done"
    assert not any(s.is_failed() for s in run.state_history)


def test_retry_with_delay_enters_awaiting_retry_then_retrying(flavour: Flavour) -> None:
    def body() -> None:
        raise ValueError("again")

    t = flavour.task(body, retries=2, retry_delay_seconds=0.02)

    _, run = flavour.run_state(t)

    assert run.history_names() == [
        "Pending",
        "Running",
        "AwaitingRetry",
        "Retrying",
        "AwaitingRetry",
        "Retrying",
        "Failed",
    ]
    awaiting = [s for s in run.state_history if s.name == "AwaitingRetry"]
    for s in awaiting:
        assert s.type is StateType.SCHEDULED
        assert s.scheduled_time is not None
        assert (s.scheduled_time - s.timestamp).total_seconds() == pytest.approx(0.02)
    # Then each Retrying starts no earlier than the time it was scheduled for.
    for index, s in enumerate(run.state_history):
        if s.name == "AwaitingRetry":
            following = run.state_history[index + 1]
            assert s.scheduled_time is not None
            assert following.timestamp >= s.scheduled_time
    assert_valid_history(run)


# --- timeouts -------------------------------------------------------------------------------


def _sleep_in_small_steps() -> None:
    # Interruptible by SIGALRM and by an asynchronous exception alike, so no thread lingers.
    for _ in range(500):
        time.sleep(0.01)


async def _async_sleep() -> None:
    await asyncio.sleep(5)


def test_timeout_ends_timed_out_with_the_reference_message(flavour: Flavour) -> None:
    t = flavour.task(_sleep_in_small_steps, async_body=_async_sleep, timeout_seconds=0.3)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "TimedOut"]
    assert state.type is StateType.FAILED
    assert state.message == "Task run exceeded timeout of 0.3 second(s)"
    assert_valid_history(run)


def test_timeout_in_result_mode_raises_task_run_timeout_error(flavour: Flavour) -> None:
    t = flavour.task(_sleep_in_small_steps, async_body=_async_sleep, timeout_seconds=0.3)

    with pytest.raises(TaskRunTimeoutError) as info:
        flavour.run(t)

    assert isinstance(info.value, TimeoutError)
    assert str(info.value) == "Scope timed out after 0.3 second(s)."


def test_a_user_raised_timeout_error_ends_timed_out(flavour: Flavour) -> None:
    def body() -> None:
        raise TimeoutError("my own")

    t = flavour.task(body)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "TimedOut"]
    assert state.message == "Task run failed due to timeout: TimeoutError('my own')"
    with pytest.raises(TimeoutError, match="my own"):
        flavour.run(t)


# --- crashes --------------------------------------------------------------------------------


class CustomBaseException(BaseException):
    pass


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (KeyboardInterrupt(), "Execution was aborted by an interrupt signal."),
        (SystemExit(3), "Execution was aborted by Python system exit call."),
        (
            CustomBaseException("boom"),
            "Execution was interrupted by an unexpected exception: CustomBaseException: boom",
        ),
    ],
    ids=["KeyboardInterrupt", "SystemExit", "custom"],
)
def test_a_base_exception_crashes_the_run_and_is_reraised_without_retries(
    flavour: Flavour, error: BaseException, message: str
) -> None:
    # Given a task that raises a BaseException, with retries to spare
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        raise error

    t = flavour.task(body, retries=3)
    run_id = str(uuid.uuid4())

    # When it runs
    with pytest.raises(type(error)) as info:
        flavour.run(t, task_run_id=run_id)

    # Then the very exception comes back, the run is Crashed, and it was never retried
    assert info.value is error
    run = get_task_run(run_id)
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "Crashed"]
    assert run.state is not None and run.state.type is StateType.CRASHED
    assert run.state.message == message
    assert run.state.data is error
    assert len(calls) == 1
    assert_valid_history(run)


def test_an_async_run_cancelled_from_outside_crashes_and_is_not_retried() -> None:
    # Given an async task with retries, awaiting something slow inside an asyncio task
    calls: list[int] = []
    run_id = str(uuid.uuid4())

    @task(retries=2)
    async def waits(started: asyncio.Event) -> None:
        calls.append(1)
        started.set()
        await asyncio.sleep(5)

    async def main() -> None:
        started = asyncio.Event()
        running = asyncio.create_task(
            run_task_async(waits, parameters={"started": started}, task_run_id=run_id)
        )
        await asyncio.wait_for(started.wait(), timeout=5)
        # When the runtime cancels it
        running.cancel()
        await running

    # Then the cancellation reaches the caller, and the run is Crashed, never retried
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    run = get_task_run(run_id)
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "Crashed"]
    assert run.state is not None
    assert run.state.message == "Execution was cancelled by the runtime environment."
    assert calls == [1]


# --- cache hits -----------------------------------------------------------------------------


def test_a_cache_hit_goes_pending_running_cached(flavour: Flavour) -> None:
    calls: list[int] = []

    def body(token: str) -> list[str]:
        calls.append(1)
        return [token]

    t = flavour.task(body, cache_policy=INPUTS)
    token = uuid.uuid4().hex  # the store is process-wide: keep this test's key its own

    _, first_run = flavour.run_state(t, {"token": token})
    second, second_run = flavour.run_state(t, {"token": token})

    assert first_run.history_names() == ["Pending", "Running", "Completed"]
    assert second_run.history_names() == ["Pending", "Running", "Cached"]
    assert second.type is StateType.COMPLETED
    assert second.result() == [token]
    assert len(calls) == 1
    assert_valid_history(second_run)


# --- upstream states and wait_for -----------------------------------------------------------


def _hooked(flavour: Flavour, calls: list[str], seen: list[str]) -> Task:
    def record(kind: str) -> Callable[..., None]:
        return lambda task, task_run, state: seen.append(kind)

    def body(upstream: Any = None) -> str:
        calls.append("called")
        return "ran"

    return flavour.task(
        body,
        on_running=[record("running")],
        on_completion=[record("completion")],
        on_failure=[record("failure")],
    )


@pytest.mark.parametrize("via", ["parameter", "wait_for"])
def test_an_upstream_that_did_not_complete_leaves_the_run_not_ready(
    flavour: Flavour, via: str
) -> None:
    # Given an upstream state that failed, as a parameter or in wait_for
    calls: list[str] = []
    seen: list[str] = []
    t = _hooked(flavour, calls, seen)
    upstream = Failed(message="upstream broke")
    parameters = {"upstream": upstream} if via == "parameter" else {}
    wait_for = [upstream] if via == "wait_for" else None

    # When the task runs, in state mode and in result mode
    state, run = flavour.run_state(t, parameters, wait_for=wait_for)
    value = flavour.run(t, parameters, wait_for=wait_for)

    # Then it stops at NotReady: no Running, no call, no hooks, no value, no exception
    assert run.history_names() == ["Pending", "NotReady"]
    assert state.name == "NotReady" and state.type is StateType.PENDING
    assert state.message is not None and "did not reach a 'COMPLETED' state" in state.message
    assert value is None
    assert calls == [] and seen == []
    assert_valid_history(run)


def test_a_completed_upstream_state_is_passed_on_as_its_value(flavour: Flavour) -> None:
    def increment(upstream: int) -> int:
        return upstream + 1

    t = flavour.task(increment)

    assert flavour.run(t, {"upstream": Completed(data=41)}, wait_for=[Completed()]) == 42


# --- returned states ------------------------------------------------------------------------


def one_of_two_failed() -> list[State]:
    return [Completed(data=1), Failed(message="no")]


def test_a_returned_state_is_kept_with_its_custom_name(flavour: Flavour) -> None:
    def custom() -> State:
        return State(StateType.COMPLETED, name="Custom", message="mine", data=7)

    t = flavour.task(custom)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Custom"]
    assert state.name == "Custom" and state.message == "mine"
    assert flavour.run(t) == 7


def test_a_returned_list_of_states_is_aggregated(flavour: Flavour) -> None:
    t = flavour.task(one_of_two_failed)

    state, run = flavour.run_state(t)

    assert run.history_names() == ["Pending", "Running", "Failed"]
    assert state.message == "1/2 states failed."


def test_a_returned_list_of_completed_states_completes_with_their_values(
    flavour: Flavour,
) -> None:
    def all_completed() -> list[State]:
        return [Completed(data=1), Completed(data=2)]

    t = flavour.task(all_completed)

    state, _ = flavour.run_state(t)

    assert state.name == "Completed" and state.message == "All states completed."
    assert flavour.run(t) == [1, 2]


def test_a_returned_failed_state_without_exception_raises_failed_run(flavour: Flavour) -> None:
    # [ours] Prefect hands a returned Failed back as a value; we raise it like any failure.
    def give_up() -> State:
        return Failed(message="gave up")

    t = flavour.task(give_up)

    with pytest.raises(FailedRun, match="gave up"):
        flavour.run(t)


def test_a_returned_failed_state_holding_an_exception_raises_that_exception(
    flavour: Flavour,
) -> None:
    error = KeyError("missing")

    def lookup() -> State:
        return Failed(data=error, message="lookup failed")

    t = flavour.task(lookup)

    with pytest.raises(KeyError) as info:
        flavour.run(t)
    assert info.value is error


def test_a_returned_aggregate_failure_raises_failed_run_with_its_message(
    flavour: Flavour,
) -> None:
    t = flavour.task(one_of_two_failed)

    with pytest.raises(FailedRun, match=r"1/2 states failed\."):
        flavour.run(t)


@pytest.mark.parametrize("returned", ["Pending", "Running", "Scheduled"])
def test_a_returned_non_final_state_fails_the_run_instead_of_looping(
    flavour: Flavour, returned: str
) -> None:
    # Given a task that returns a state no run can end in (a mistake in the task)
    calls: list[int] = []
    states = {
        "Pending": Pending(),
        "Running": Running(),
        "Scheduled": Scheduled(utcnow() + timedelta(seconds=0.01)),
    }

    def body() -> State:
        calls.append(1)
        if len(calls) > 5:
            raise SystemExit("the engine kept calling the function")
        return states[returned]

    t = flavour.task(body)

    # When it runs
    state, run = flavour.run_state(t)

    # Then the function ran once and the run failed, saying why
    assert len(calls) == 1
    assert run.history_names() == ["Pending", "Running", "Failed"]
    assert state.message is not None and returned in state.message
    with pytest.raises(FailedRun, match="non-final"):
        flavour.run(t)
    assert_valid_history(run)


# --- return_type="state" --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["failed", "timed_out", "not_ready", "returned_failed"])
def test_state_mode_never_raises_for_failed_timed_out_or_not_ready(
    flavour: Flavour, case: str
) -> None:
    def raise_error() -> None:
        raise ValueError("bad")

    def raise_timeout() -> None:
        raise TimeoutError("slow")

    def nothing() -> None:
        return None

    def return_failed() -> State:
        return Failed(message="returned")

    bodies: dict[str, Callable[..., Any]] = {
        "failed": raise_error,
        "timed_out": raise_timeout,
        "not_ready": nothing,
        "returned_failed": return_failed,
    }
    t = flavour.task(bodies[case])
    wait_for = [Failed()] if case == "not_ready" else None

    state = flavour.run(t, return_type="state", wait_for=wait_for)

    assert isinstance(state, State)
    expected = {
        "failed": "Failed",
        "timed_out": "TimedOut",
        "not_ready": "NotReady",
        "returned_failed": "Failed",
    }[case]
    assert state.name == expected


def test_calling_the_task_with_return_state_gives_the_final_state() -> None:
    @task
    def fails() -> None:
        raise ValueError("xyz")

    state = fails(return_state=True)

    assert isinstance(state, State) and state.name == "Failed"
    assert isinstance(state.data, ValueError)
