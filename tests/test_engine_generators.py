"""Generator tasks run locally: items as they are produced, the return value, failures, close."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import pytest

from celery_taskengine import Task, get_task_run, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import State
from celery_taskengine.task_engine import (
    TaskRunTimeoutError,
    run_generator_task_async,
    run_generator_task_sync,
)


def run_of(run_id: str) -> TaskRun:
    run = get_task_run(run_id)
    assert run is not None
    return run


def completion_recorder(seen: list[str]) -> dict[str, Any]:
    def hook(task: Task, task_run: TaskRun, state: State) -> None:
        seen.append(state.name)

    return {"on_completion": [hook], "on_failure": [hook]}


# --- sync generators ------------------------------------------------------------------------


def test_a_sync_generator_task_yields_its_items_and_returns_its_value() -> None:
    @task
    def count(n: int) -> Generator[int, None, str]:
        yield from range(n)
        return "done"

    run_id = str(uuid.uuid4())
    items = run_generator_task_sync(count, parameters={"n": 3}, task_run_id=run_id)

    collected = []
    with pytest.raises(StopIteration) as stop:
        while True:
            collected.append(next(items))

    assert collected == [0, 1, 2]
    assert stop.value.value == "done"
    assert run_of(run_id).history_names() == ["Pending", "Running", "Completed"]


def test_items_come_out_as_the_task_produces_them() -> None:
    # Given a generator that records how far it got
    progress: list[int] = []

    @task
    def produce() -> Iterator[int]:
        for i in range(3):
            progress.append(i)
            yield i

    items = run_generator_task_sync(produce)

    # When the caller takes the first item, Then the task has produced only that one
    assert next(items) == 0
    assert progress == [0]
    assert list(items) == [1, 2]


def test_calling_a_generator_task_gives_an_iterator_over_its_items() -> None:
    @task
    def letters() -> Iterator[str]:
        yield "a"
        yield "b"

    assert list(letters()) == ["a", "b"]


def test_a_generator_task_rejects_return_type_state_when_iteration_starts() -> None:
    @task
    def one() -> Iterator[int]:
        yield 1

    items = run_generator_task_sync(one, return_type="state")

    with pytest.raises(ValueError, match="The return_type for a generator task must be 'result'"):
        next(items)


def test_a_failing_generator_raises_after_the_items_it_yielded() -> None:
    @task
    def breaks() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("broken stream")

    run_id = str(uuid.uuid4())
    items = run_generator_task_sync(breaks, task_run_id=run_id)

    assert next(items) == 1
    assert next(items) == 2
    with pytest.raises(ValueError, match="broken stream"):
        next(items)
    run = run_of(run_id)
    assert run.history_names() == ["Pending", "Running", "Failed"]


def test_closing_a_generator_early_completes_the_run_and_calls_on_completion() -> None:
    # Given a long generator task with a completion hook
    seen: list[str] = []
    closed: list[bool] = []

    @task(**completion_recorder(seen))
    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    run_id = str(uuid.uuid4())
    items = run_generator_task_sync(endless, task_run_id=run_id)

    # When the caller stops after two items
    assert [next(items), next(items)] == [0, 1]
    items.close()

    # Then the user's generator was closed and the run completed
    assert closed == [True]
    assert run_of(run_id).history_names() == ["Pending", "Running", "Completed"]
    assert seen == ["Completed"]


def test_a_generator_that_overruns_its_timeout_ends_timed_out() -> None:
    @task(timeout_seconds=0.2)
    def slow() -> Iterator[int]:
        while True:
            time.sleep(0.05)
            yield 1

    run_id = str(uuid.uuid4())
    with pytest.raises(TaskRunTimeoutError) as info:
        for _ in run_generator_task_sync(slow, task_run_id=run_id):
            pass

    # The limit is the task's, for all items together, and the messages say so
    assert str(info.value) == "Scope timed out after 0.2 second(s)."
    run = run_of(run_id)
    assert run.history_names() == ["Pending", "Running", "TimedOut"]
    assert run.state is not None
    assert run.state.message == "Task run exceeded timeout of 0.2 second(s)"


# --- async generators -----------------------------------------------------------------------


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


def test_an_async_generator_task_yields_its_items() -> None:
    @task
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    run_id = str(uuid.uuid4())

    items = asyncio.run(
        collect(run_generator_task_async(count, parameters={"n": 3}, task_run_id=run_id))
    )

    assert items == [0, 1, 2]
    assert run_of(run_id).history_names() == ["Pending", "Running", "Completed"]


def test_an_async_generator_that_overruns_its_timeout_ends_timed_out() -> None:
    @task(timeout_seconds=0.2)
    async def slow() -> AsyncIterator[int]:
        while True:
            await asyncio.sleep(0.05)
            yield 1

    run_id = str(uuid.uuid4())

    with pytest.raises(TaskRunTimeoutError) as info:
        asyncio.run(collect(run_generator_task_async(slow, task_run_id=run_id)))

    assert str(info.value) == "Scope timed out after 0.2 second(s)."
    run = run_of(run_id)
    assert run.history_names() == ["Pending", "Running", "TimedOut"]
    assert run.state is not None
    assert run.state.message == "Task run exceeded timeout of 0.2 second(s)"


def test_an_async_generator_task_rejects_return_type_state() -> None:
    @task
    async def one() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(ValueError, match="must be 'result'"):
        asyncio.run(collect(run_generator_task_async(one, return_type="state")))


def test_a_failing_async_generator_raises_after_its_items() -> None:
    @task
    async def breaks() -> AsyncIterator[int]:
        yield 1
        raise ValueError("broken stream")

    received: list[int] = []

    async def consume() -> None:
        async for item in run_generator_task_async(breaks):
            received.append(item)

    with pytest.raises(ValueError, match="broken stream"):
        asyncio.run(consume())
    assert received == [1]


def test_closing_an_async_generator_early_completes_the_run() -> None:
    seen: list[str] = []

    @task(**completion_recorder(seen))
    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    run_id = str(uuid.uuid4())

    async def take_two() -> list[int]:
        items = run_generator_task_async(endless, task_run_id=run_id)
        taken = [await items.__anext__(), await items.__anext__()]
        await items.aclose()
        return taken

    assert asyncio.run(take_two()) == [0, 1]
    assert run_of(run_id).history_names() == ["Pending", "Running", "Completed"]
    assert seen == ["Completed"]
