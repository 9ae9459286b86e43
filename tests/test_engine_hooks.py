"""State hooks (SPEC §5): when ``on_running``, ``on_completion`` and ``on_failure`` fire.

The ``flavour`` fixture runs one body as a ``def`` and as an ``async def`` task (it is the same
helper as in ``test_engine_states.py``; a conftest would be its natural home).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from celery_taskengine import Task, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.states import Failed, State, StateType
from tests.flavours import Flavour


@dataclass
class Call:
    """One hook call, as the hook saw it."""

    hook: str
    task: Task
    task_run: TaskRun
    state: State
    run_count: int


class Recorder:
    """Hooks that record their calls (in one list, so the order across kinds shows)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def hook(self, label: str) -> Callable[[Task, TaskRun, State], None]:
        def hook(task: Task, task_run: TaskRun, state: State) -> None:
            self.calls.append(Call(label, task, task_run, state, task_run.run_count))

        return hook

    def all(self) -> dict[str, list[Callable[..., Any]]]:
        return {
            "on_running": [self.hook("running")],
            "on_completion": [self.hook("completion")],
            "on_failure": [self.hook("failure")],
        }

    def labels(self) -> list[str]:
        return [c.hook for c in self.calls]


def returns_one() -> int:
    return 1


def always_fails() -> None:
    raise ValueError("x")


# --- on_running -----------------------------------------------------------------------------


def test_on_running_fires_after_running_and_each_retrying(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(always_fails, retries=2, **recorder.all())

    flavour.run_state(t)

    running = [c for c in recorder.calls if c.hook == "running"]
    assert [c.state.name for c in running] == ["Running", "Retrying", "Retrying"]
    assert [c.run_count for c in running] == [1, 2, 3]
    assert recorder.labels() == ["running", "running", "running", "failure"]


def test_on_running_fires_after_a_delayed_retry_too(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(always_fails, retries=1, retry_delay_seconds=0.01, **recorder.all())

    _, run = flavour.run_state(t)

    assert "AwaitingRetry" in run.history_names()
    assert [c.state.name for c in recorder.calls] == ["Running", "Retrying", "Failed"]


def test_on_running_and_on_completion_fire_on_a_cache_hit(flavour: Flavour) -> None:
    recorder = Recorder()

    def body(token: str) -> str:
        return token

    t = flavour.task(body, cache_policy=INPUTS, **recorder.all())
    token = uuid.uuid4().hex
    flavour.run_state(t, {"token": token})
    recorder.calls.clear()

    state, _ = flavour.run_state(t, {"token": token})

    assert state.name == "Cached"
    assert [(c.hook, c.state.name) for c in recorder.calls] == [
        ("running", "Running"),
        ("completion", "Cached"),
    ]


# --- on_completion --------------------------------------------------------------------------


def test_on_completion_fires_once_on_the_final_completed_state(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(returns_one, **recorder.all())

    state, run = flavour.run_state(t)

    assert recorder.labels() == ["running", "completion"]
    completion = recorder.calls[-1]
    assert completion.state is state is run.state


def test_on_completion_fires_after_on_commit(flavour: Flavour) -> None:
    order: list[str] = []
    t = flavour.task(
        returns_one,
        on_commit=[lambda txn: order.append("commit")],
        on_completion=[lambda task, run, state: order.append("completion")],
    )

    flavour.run(t)

    assert order == ["commit", "completion"]


def test_on_completion_fires_for_a_returned_custom_completed_state(flavour: Flavour) -> None:
    recorder = Recorder()

    def custom() -> State:
        return State(StateType.COMPLETED, name="Custom", data=3)

    t = flavour.task(custom, **recorder.all())

    flavour.run(t)

    assert [(c.hook, c.state.name) for c in recorder.calls][-1] == ("completion", "Custom")


# --- on_failure -----------------------------------------------------------------------------


def test_on_failure_fires_once_at_the_end_not_for_retried_attempts(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(always_fails, retries=2, **recorder.all())

    state, _ = flavour.run_state(t)

    failures = [c for c in recorder.calls if c.hook == "failure"]
    assert len(failures) == 1
    assert failures[0].state is state
    assert failures[0].run_count == 3


def test_on_failure_fires_for_a_timeout(flavour: Flavour) -> None:
    recorder = Recorder()

    def body() -> None:
        raise TimeoutError("late")

    t = flavour.task(body, **recorder.all())

    flavour.run_state(t)

    assert [(c.hook, c.state.name) for c in recorder.calls] == [
        ("running", "Running"),
        ("failure", "TimedOut"),
    ]


def test_on_failure_fires_for_a_returned_failed_state(flavour: Flavour) -> None:
    recorder = Recorder()

    def give_up() -> State:
        return Failed(message="no")

    t = flavour.task(give_up, **recorder.all())

    flavour.run_state(t)

    assert recorder.labels() == ["running", "failure"]


def test_no_failure_or_completion_hook_fires_for_a_crash(flavour: Flavour) -> None:
    # [ours] Unlike Prefect, on_running does not fire a second time while the crash unwinds.
    recorder = Recorder()

    def body() -> None:
        raise KeyboardInterrupt

    t = flavour.task(body, retries=2, **recorder.all())

    with pytest.raises(KeyboardInterrupt):
        flavour.run(t)

    assert recorder.labels() == ["running"]


def test_no_hook_fires_for_not_ready(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(returns_one, **recorder.all())

    state, _ = flavour.run_state(t, wait_for=[Failed()])

    assert state.name == "NotReady"
    assert recorder.calls == []


# --- how hooks are called -------------------------------------------------------------------


def test_hooks_run_in_registration_order(flavour: Flavour) -> None:
    order: list[int] = []

    def make(number: int) -> Callable[..., None]:
        return lambda task, run, state: order.append(number)

    t = flavour.task(returns_one, on_completion=[make(1), make(2), make(3)])

    flavour.run(t)

    assert order == [1, 2, 3]


def test_hooks_receive_the_task_the_live_run_and_the_state_entered(flavour: Flavour) -> None:
    recorder = Recorder()
    t = flavour.task(returns_one, **recorder.all())

    _, run = flavour.run_state(t)

    running, completion = recorder.calls
    assert running.task is t and completion.task is t
    assert running.task_run is run and completion.task_run is run
    assert running.state is run.state_history[1]
    assert completion.state is run.state_history[2]


def test_a_raising_hook_is_logged_with_the_run_id_and_changes_nothing(
    flavour: Flavour, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a completion hook that raises, followed by one that records
    after: list[str] = []

    def broken_hook(task: Task, task_run: TaskRun, state: State) -> None:
        raise RuntimeError("hook broke")

    t = flavour.task(
        returns_one,
        on_running=[broken_hook],
        on_completion=[broken_hook, lambda task, run, state: after.append(state.name)],
    )

    # When the task runs
    with caplog.at_level(logging.ERROR):
        state, run = flavour.run_state(t)

    # Then the run completed as if nothing happened, the next hook ran, and the error is logged
    assert run.history_names() == ["Pending", "Running", "Completed"]
    assert state.result() == 1
    assert after == ["Completed"]
    logged = [r for r in caplog.records if "broken_hook" in r.getMessage()]
    assert len(logged) == 2
    assert all(run.id in r.getMessage() and r.exc_info is not None for r in logged)


def test_async_hooks_are_awaited(flavour: Flavour) -> None:
    seen: list[str] = []

    async def async_hook(task: Task, task_run: TaskRun, state: State) -> None:
        await asyncio.sleep(0)
        seen.append(state.name)

    t = flavour.task(returns_one, on_running=[async_hook], on_completion=[async_hook])

    flavour.run(t)

    assert seen == ["Running", "Completed"]


def test_async_hooks_of_a_sync_task_are_awaited_under_a_running_loop() -> None:
    # Given a sync task with an async hook, called from inside an event loop
    seen: list[str] = []

    async def async_hook(task: Task, task_run: TaskRun, state: State) -> None:
        await asyncio.sleep(0)
        seen.append(state.name)

    @task(on_completion=[async_hook])
    def sync_task() -> int:
        return 5

    async def main() -> int:
        result: int = sync_task()
        return result

    # When it runs, Then the hook was awaited and the value came back
    assert asyncio.run(main()) == 5
    assert seen == ["Completed"]
