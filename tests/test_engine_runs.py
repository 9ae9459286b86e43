"""Running tasks locally: ``run_task`` dispatch, run records, run names, tags and log_prints."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest

from celery_taskengine import CancelledRun, Task, TaskRun, get_task_run, task
from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine.states import (
    Completed,
    Crashed,
    Failed,
    Pending,
    Running,
    State,
    StateType,
)
from celery_taskengine.task_engine import SyncTaskRunEngine, run_task, run_task_sync

PRINT_LOGGER = "celery_taskengine.task_runs"


def capture_run(seen: list[TaskRun]) -> dict[str, Any]:
    """An on_completion hook option that keeps the run it was called for."""

    def hook(task: Task, task_run: TaskRun, state: State) -> None:
        seen.append(task_run)

    return {"on_completion": [hook]}


# --- run_task picks the runner the function needs -------------------------------------------


def test_run_task_runs_a_plain_function_to_its_value() -> None:
    @task
    def plain(x: int) -> int:
        return x + 1

    assert run_task(plain, parameters={"x": 1}) == 2


def test_run_task_gives_a_coroutine_for_an_async_function() -> None:
    @task
    async def coro(x: int) -> int:
        return x + 1

    pending = run_task(coro, parameters={"x": 1})

    assert inspect.iscoroutine(pending)
    assert asyncio.run(pending) == 2


def test_run_task_gives_an_iterator_for_a_generator_function() -> None:
    @task
    def gen() -> Iterator[int]:
        yield 1

    items = run_task(gen)

    assert inspect.isgenerator(items)
    assert list(items) == [1]


def test_run_task_gives_an_async_iterator_for_an_async_generator_function() -> None:
    @task
    async def agen() -> AsyncIterator[int]:
        yield 1

    items: Any = run_task(agen)

    assert inspect.isasyncgen(items)

    async def collect() -> list[Any]:
        return [item async for item in items]

    assert asyncio.run(collect()) == [1]


def test_calling_an_async_task_gives_a_coroutine_of_its_value_or_state() -> None:
    @task
    async def coro() -> str:
        return "value"

    assert asyncio.run(coro()) == "value"
    state = asyncio.run(coro(return_state=True))
    assert isinstance(state, State) and state.name == "Completed"


# --- the run record -------------------------------------------------------------------------


def test_the_engine_run_record_is_the_one_get_task_run_returns() -> None:
    @task(tags=["a", "b"])
    def add(x: int, y: int) -> int:
        return x + y

    engine = SyncTaskRunEngine(add, {"x": 1, "y": 2})
    final = engine.run()

    run = engine.task_run
    assert get_task_run(run.id) is run
    assert run.state is final and final.result() == 3
    assert run.task_name == add.name
    assert run.parameters == {"x": 1, "y": 2}
    assert run.tags == frozenset({"a", "b"})


def test_a_given_task_run_id_becomes_the_run_id() -> None:
    @task
    def noop() -> None:
        return None

    run_id = str(uuid.uuid4())
    run_task_sync(noop, task_run_id=run_id)

    run = get_task_run(run_id)
    assert run is not None and run.id == run_id


def test_get_task_run_of_an_unknown_id_is_none() -> None:
    assert get_task_run(str(uuid.uuid4())) is None


def test_call_parameters_include_defaults() -> None:
    seen: list[TaskRun] = []

    @task(**capture_run(seen))
    def with_default(a: int, b: int = 2) -> int:
        return a + b

    assert with_default(1) == 3
    assert seen[0].parameters == {"a": 1, "b": 2}


def test_the_current_run_is_visible_inside_the_function() -> None:
    inside: list[TaskRun | None] = []

    @task
    def look() -> None:
        inside.append(current_task_run())

    engine = SyncTaskRunEngine(look, {})
    engine.run()

    assert inside == [engine.task_run]
    assert current_task_run() is None


def test_a_set_cancel_event_cancels_the_run_before_the_function_runs() -> None:
    # Given a cancel event that is already set
    calls: list[int] = []

    @task
    def never() -> None:
        calls.append(1)

    cancel = threading.Event()
    cancel.set()

    # When the task runs, Then it is cancelled without calling the function
    state = run_task_sync(never, return_type="state", context={"cancel_event": cancel})
    assert state.type is StateType.CANCELLED
    with pytest.raises(CancelledRun):
        run_task_sync(never, context={"cancel_event": cancel})
    assert calls == []


# --- a run handed in (a redelivered message continues the same run) -------------------------


def test_a_finished_run_handed_in_is_not_executed_again() -> None:
    # Given a run that already completed
    calls: list[int] = []

    @task
    def once(x: int) -> int:
        calls.append(x)
        return x * 10

    run_id = str(uuid.uuid4())
    run_task_sync(once, parameters={"x": 1}, task_run_id=run_id)
    run = get_task_run(run_id)
    assert run is not None

    # When the engine is handed that run again
    again = run_task_sync(once, task_run=run)

    # Then the function is not called a second time, and the run's value comes back
    assert again == 10
    assert calls == [1]
    assert run.history_names() == ["Pending", "Running", "Completed"]


def _run_in(task_name: str, *states: State) -> TaskRun:
    run = TaskRun(id=str(uuid.uuid4()), name="r", task_name=task_name, parameters={"x": 2})
    for state in states:
        run.state = state
        run.state_history.append(state)
    run.run_count = sum(1 for state in states if state.is_running())
    return run


def test_a_run_left_running_by_a_dead_process_is_marked_crashed_and_retried() -> None:
    @task
    def resumes(x: int) -> int:
        return x + 1

    run = _run_in(resumes.name, Pending(), Running())

    state = run_task_sync(resumes, task_run=run, return_type="state")

    assert state.result() == 3
    assert run.history_names() == ["Pending", "Running", "Crashed", "Retrying", "Completed"]
    assert run.run_count == 2


def test_a_crashed_run_handed_in_continues_as_retrying() -> None:
    @task
    def resumes(x: int) -> int:
        return x + 1

    run = _run_in(resumes.name, Pending(), Running(), Crashed())

    assert run_task_sync(resumes, task_run=run) == 3
    assert run.history_names() == ["Pending", "Running", "Crashed", "Retrying", "Completed"]


def test_wait_for_may_be_a_single_state() -> None:
    @task
    def waits() -> str:
        return "ran"

    assert run_task_sync(waits, wait_for=Completed()) == "ran"
    assert run_task_sync(waits, wait_for=Failed(), return_type="state").name == "NotReady"


# --- task_run_name --------------------------------------------------------------------------


def test_task_run_name_template_is_formatted_with_the_parameters() -> None:
    seen: list[TaskRun] = []

    @task(task_run_name="add-{x}-{y}", **capture_run(seen))
    def add(x: int, y: int = 2) -> int:
        return x + y

    add(1)

    assert seen[0].name == "add-1-2"


def test_task_run_name_callable_without_arguments_is_called() -> None:
    seen: list[TaskRun] = []

    @task(task_run_name=lambda: "fixed-name", **capture_run(seen))
    def named() -> None:
        return None

    named()

    assert seen[0].name == "fixed-name"


def test_task_run_name_callable_with_parameters_gets_them() -> None:
    seen: list[TaskRun] = []
    given: list[dict[str, Any]] = []

    def name_from(parameters: dict[str, Any]) -> str:
        given.append(parameters)
        return f"job-{parameters['job']}"

    @task(task_run_name=name_from, **capture_run(seen))
    def job(job: str) -> None:
        return None

    job("j7")

    assert given == [{"job": "j7"}]
    assert seen[0].name == "job-j7"


def test_task_run_name_callable_returning_a_non_str_raises_type_error() -> None:
    @task(task_run_name=lambda: 3)
    def badly_named() -> None:
        return None

    with pytest.raises(TypeError, match="task_run_name"):
        badly_named()


@pytest.mark.parametrize("return_type", ["result", "state"])
def test_a_missing_template_key_raises_key_error_before_running(
    return_type: Literal["result", "state"],
) -> None:
    # Given a run name template naming a parameter the task does not have
    calls: list[int] = []

    @task(task_run_name="run-{missing}")
    def misnamed(x: int) -> None:
        calls.append(1)

    run_id = str(uuid.uuid4())

    # When it runs, Then KeyError reaches the caller and the run never left Pending
    with pytest.raises(KeyError, match="missing"):
        run_task_sync(misnamed, parameters={"x": 1}, task_run_id=run_id, return_type=return_type)
    run = get_task_run(run_id)
    assert run is not None
    assert run.history_names() == ["Pending"]
    assert calls == []


# --- tags -----------------------------------------------------------------------------------


def test_tags_are_on_the_run_hooks_see() -> None:
    seen: list[TaskRun] = []

    @task(tags=["etl", "nightly"], **capture_run(seen))
    def tagged() -> None:
        return None

    tagged()

    assert seen[0].tags == frozenset({"etl", "nightly"})


# --- log_prints -----------------------------------------------------------------------------


def test_log_prints_sends_print_to_the_task_run_logger(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    @task(log_prints=True)
    def chatty() -> None:
        print("hello from the task")

    with caplog.at_level(logging.INFO, logger=PRINT_LOGGER):
        chatty()

    records = [r for r in caplog.records if r.name == PRINT_LOGGER]
    assert any("hello from the task" in r.getMessage() for r in records)
    assert "hello from the task" not in capsys.readouterr().out


def test_log_prints_works_in_async_tasks(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    @task(log_prints=True)
    async def chatty() -> None:
        await asyncio.sleep(0)
        print("hello from the coroutine")

    with caplog.at_level(logging.INFO, logger=PRINT_LOGGER):
        asyncio.run(chatty())

    assert any("hello from the coroutine" in r.getMessage() for r in caplog.records)
    assert "hello from the coroutine" not in capsys.readouterr().out


def test_log_prints_records_carry_the_run_id(caplog: pytest.LogCaptureFixture) -> None:
    @task(log_prints=True)
    def chatty() -> None:
        print("marked")

    engine = SyncTaskRunEngine(chatty, {})
    with caplog.at_level(logging.INFO, logger=PRINT_LOGGER):
        engine.run()

    [record] = [r for r in caplog.records if "marked" in r.getMessage()]
    assert engine.task_run.id in record.getMessage()


def test_without_log_prints_print_goes_to_stdout(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    @task
    def chatty() -> None:
        print("plain output")

    with caplog.at_level(logging.INFO, logger=PRINT_LOGGER):
        chatty()

    assert "plain output" in capsys.readouterr().out
    assert not any("plain output" in r.getMessage() for r in caplog.records)


def test_log_prints_does_not_capture_other_threads(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a log_prints task that starts a thread which prints
    @task(log_prints=True)
    def spawns() -> None:
        thread = threading.Thread(target=print, args=("from another thread",))
        thread.start()
        thread.join(timeout=5)

    # When it runs
    with caplog.at_level(logging.INFO, logger=PRINT_LOGGER):
        spawns()

    # Then that thread's print went to stdout, not to the task's log
    assert "from another thread" in capsys.readouterr().out
    assert not any("from another thread" in r.getMessage() for r in caplog.records)
