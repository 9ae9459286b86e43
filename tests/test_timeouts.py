"""Timeouts (SPEC §4): each attempt is bounded, on the main thread, off it, and in async code.

No test asserts on elapsed time: "the caller got control back" is checked by joining the
caller's thread with a bound, and "the function was interrupted" by an event it sets on its way
out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_taskengine import TaskRun, task
from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine._engine.timeouts import await_with_timeout, call_with_timeout
from celery_taskengine.errors import TaskRunTimeoutError
from celery_taskengine.states import State
from celery_taskengine.task_engine import run_task_sync

needs_alarm = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no SIGALRM here")


@pytest.fixture
def free_alarm() -> Iterator[None]:
    """SIGALRM unclaimed for the test (pytest-timeout's signal method would hold it)."""
    previous = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, previous)


def run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn()`` in a thread; the box gets its value or error."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


class Signal(logging.Handler):
    """A log handler that sets an event when a record containing all ``texts`` arrives."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if all(text in message for text in self.texts):
            self.arrived.set()


# --- sync functions on the main thread ------------------------------------------------------


@needs_alarm
@pytest.mark.timeout(30, method="thread")
def test_a_sync_sleep_on_the_main_thread_is_interrupted_by_sigalrm(free_alarm: None) -> None:
    # Given a task that would sleep for 5 s, with a 0.3 s limit
    ran_on: list[threading.Thread] = []
    interrupted = threading.Event()

    @task(timeout_seconds=0.3)
    def sleeps() -> None:
        ran_on.append(threading.current_thread())
        try:
            time.sleep(5)
        finally:
            interrupted.set()

    # When it runs on the main thread
    state = sleeps(return_state=True)

    # Then the sleep itself was interrupted (no helper thread), and the run TimedOut
    assert state.name == "TimedOut"
    assert ran_on == [threading.main_thread()]
    assert interrupted.is_set()
    # and the alarm was handed back as it was found
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@needs_alarm
@pytest.mark.timeout(30, method="thread")
def test_someone_elses_alarm_handler_is_left_alone(free_alarm: None) -> None:
    # Given a SIGALRM handler that belongs to someone else
    fired: list[int] = []

    def theirs(signum: int, frame: object) -> None:
        fired.append(signum)

    signal.signal(signal.SIGALRM, theirs)

    @task(timeout_seconds=0.2)
    def slow() -> None:
        for _ in range(300):
            time.sleep(0.01)

    # When a task with a timeout runs, Then it still times out, and their handler was not used
    state = slow(return_state=True)
    assert state.name == "TimedOut"
    assert signal.getsignal(signal.SIGALRM) is theirs
    assert fired == []


# --- sync functions off the main thread -----------------------------------------------------


def test_off_the_main_thread_the_caller_gets_control_back_at_the_deadline() -> None:
    # Given a task blocked in a 3 s sleep (C code), with a 0.3 s limit
    @task(timeout_seconds=0.3)
    def blocked() -> None:
        time.sleep(3)

    # When a non-main thread runs it
    thread, box = run_in_thread(lambda: blocked(return_state=True))

    # Then that thread is back long before the sleep could have ended, with TimedOut
    thread.join(timeout=2)
    assert not thread.is_alive()
    state: State = box["value"]
    assert state.name == "TimedOut"
    assert state.message == "Task run exceeded timeout of 0.3 second(s)"


def test_off_the_main_thread_the_caller_sees_task_run_timeout_error() -> None:
    @task(timeout_seconds=0.3)
    def blocked() -> None:
        time.sleep(3)

    thread, box = run_in_thread(blocked)

    thread.join(timeout=2)
    assert not thread.is_alive()
    assert isinstance(box["error"], TaskRunTimeoutError)
    assert str(box["error"]) == "Scope timed out after 0.3 second(s)."


def test_a_call_stuck_in_c_code_is_abandoned_and_logged() -> None:
    # Given a task that blocks in C code for longer than its limit, off the main thread
    release = threading.Event()

    # (a limit long enough that the call is surely inside the blocking wait when it expires,
    # even on a loaded machine: an interruption before that would simply stop it)
    @task(timeout_seconds=0.6)
    def stuck() -> None:
        release.wait(10)

    run_id = str(uuid.uuid4())
    watcher = Signal(run_id, "cannot be interrupted", "abandoned")
    timeouts_logger = logging.getLogger("celery_taskengine._engine.timeouts")
    timeouts_logger.addHandler(watcher)
    try:
        # When it runs off the main thread
        thread, box = run_in_thread(
            lambda: run_task_sync(stuck, task_run_id=run_id, return_type="state")
        )
        thread.join(timeout=5)

        # Then the run ended TimedOut, and the stuck call was reported, with the run id
        assert box["value"].name == "TimedOut"
        assert watcher.arrived.wait(5)
    finally:
        timeouts_logger.removeHandler(watcher)
        release.set()


def test_a_busy_python_loop_off_the_main_thread_is_interrupted() -> None:
    # Given a task spinning in pure Python, which an asynchronous exception can stop
    left_the_loop = threading.Event()

    @task(timeout_seconds=0.2)
    def spins() -> None:
        counter = 0
        try:
            while True:
                counter += 1
        finally:
            left_the_loop.set()

    # When it runs off the main thread
    thread, box = run_in_thread(lambda: spins(return_state=True))
    thread.join(timeout=5)

    # Then it ends TimedOut and the loop really stopped
    assert box["value"].name == "TimedOut"
    assert left_the_loop.wait(5)


def test_the_run_stays_current_inside_a_timed_call_off_the_main_thread() -> None:
    seen: list[TaskRun | None] = []

    @task(timeout_seconds=5)
    def look() -> None:
        seen.append(current_task_run())

    thread, box = run_in_thread(lambda: look(return_state=True))
    thread.join(timeout=5)

    assert box["value"].name == "Completed"
    assert seen[0] is not None and seen[0].task_name == look.name


def test_a_quick_call_with_a_timeout_returns_its_value_and_raises_its_errors() -> None:
    error = ValueError("plain failure")

    def fails() -> None:
        raise error

    assert call_with_timeout(lambda x: x + 1, (1,), {}, 5.0) == 2
    with pytest.raises(ValueError) as info:
        call_with_timeout(fails, (), {}, 5.0)
    assert info.value is error

    thread, box = run_in_thread(lambda: call_with_timeout(fails, (), {}, 5.0))
    thread.join(timeout=5)
    assert box["error"] is error


def test_the_limit_applies_to_each_attempt_not_the_whole_run() -> None:
    # Given attempts that each take well under the limit, but together more than it
    calls: list[int] = []

    @task(timeout_seconds=0.5, retries=1)
    def twice() -> str:
        calls.append(1)
        time.sleep(0.3)
        if len(calls) == 1:
            raise ValueError("first attempt fails")
        return "second attempt"

    # When it runs, Then the second attempt gets its own full limit
    assert twice() == "second attempt"


# --- async functions ------------------------------------------------------------------------


def test_an_async_function_is_cancelled_at_the_deadline() -> None:
    # Given an async task awaiting for 5 s, with a 0.3 s limit
    cancelled = threading.Event()

    @task(timeout_seconds=0.3)
    async def waits() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # When it runs
    state = asyncio.run(waits(return_state=True))

    # Then the coroutine was cancelled and the run TimedOut
    assert cancelled.is_set()
    assert state.name == "TimedOut"
    assert state.message == "Task run exceeded timeout of 0.3 second(s)"
    assert isinstance(state.data, TaskRunTimeoutError)


def test_await_with_timeout_lets_a_user_timeout_error_through() -> None:
    async def own_timeout() -> None:
        raise TimeoutError("my own")

    async def main() -> None:
        await await_with_timeout(own_timeout(), 5.0)

    with pytest.raises(TimeoutError, match="my own") as info:
        asyncio.run(main())
    assert not isinstance(info.value, TaskRunTimeoutError)
