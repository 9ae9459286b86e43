"""The engine core driven step by step, with no I/O: every step it yields is read here.

:func:`play` is a driver of its own: it answers cache reads from a dict, keeps writes in it,
calls the (pure) task functions, hooks and key functions itself, and moves a fixed clock
forward on ``Sleep``. Randomness comes from a seeded generator. Each test asserts the exact
sequence of steps a run takes, so "read the cache" and "run a hook" are told apart without
executing anything that touches a store.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from celery_taskengine._celery.options import TaskOptions, build_options
from celery_taskengine._engine.run_core import RunCore, RunEnvironment
from celery_taskengine._engine.steps import (
    Advance,
    CallTask,
    CheckCancelled,
    CloseItems,
    ComputeKey,
    Emit,
    ReadCache,
    Record,
    ReleaseLock,
    RunHook,
    Sleep,
    Step,
    TakeLock,
    WriteCache,
)
from celery_taskengine._engine.task_run import new_task_run
from celery_taskengine._store.protocol import ResultRecord
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import TaskRunTimeoutError
from celery_taskengine.states import Failed, State

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
STORE = "the-store"  # only named in cache steps: play() answers them from its dict


class ReadsAhead:
    """A store that can send a read ahead (``start_read``): the core may ask it to."""

    def start_read(self, key: str) -> Any:
        raise AssertionError("play() answers every read itself")


@dataclass
class PlainTask:
    """The core's view of a task (the EngineTask protocol), with validated real options."""

    fn: Callable[..., Any]
    engine_options: TaskOptions
    name: str = "tests.core"

    def source_text(self) -> str:
        return "def f(): ..."


@dataclass
class Play:
    """What a run did: its steps (described), the items it emitted, and how it ended."""

    steps: list[tuple[Any, ...]] = field(default_factory=list)
    final: State | None = None
    raised: BaseException | None = None


def make_core(
    fn: Callable[..., Any],
    parameters: dict[str, Any] | None = None,
    *,
    is_generator: bool = False,
    is_cancelled: Callable[[], bool] | None = None,
    store: Any = STORE,
    **options: Any,
) -> RunCore:
    task = PlainTask(fn, build_options(fn, options))
    run = new_task_run(task, dict(parameters or {}), "run-1")
    clock = FixedClock()
    env = RunEnvironment(
        store=store,
        is_cancelled=is_cancelled,
        clock=clock.now,
        monotonic=clock.monotonic,
        rng=random.Random(7),
    )
    core = RunCore(task, run, env, is_generator=is_generator)
    core.clock = clock  # type: ignore[attr-defined]
    return core


class FixedClock:
    def __init__(self) -> None:
        self.elapsed = 0.0

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed


def play(core: RunCore, cache: dict[str, Any] | None = None) -> Play:
    """Carry out ``core.run_to_end()`` without I/O, noting every step."""
    cache = {} if cache is None else cache
    result = Play()
    routine = core.run_to_end()
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = routine.send(send) if error is None else routine.throw(error)
        except StopIteration as stop:
            result.final = stop.value
            return result
        except BaseException as exc:
            result.raised = exc
            return result
        result.steps.append(describe(step))
        send, error = None, None
        try:
            send = carry_out(step, core, cache)
        except BaseException as exc:
            error = exc


def carry_out(step: Step, core: RunCore, cache: dict[str, Any]) -> Any:
    if isinstance(step, ReadCache):
        return None if step.ahead else cache.get(step.key)
    if isinstance(step, WriteCache):
        cache[step.key] = ResultRecord(step.key, step.value, step.serializer, T0)
        return None
    if isinstance(step, TakeLock):
        return "lease"
    if isinstance(step, ComputeKey):
        return step.fn(*step.args, **step.kwargs)
    if isinstance(step, RunHook):
        return step.hook(*step.args)
    if isinstance(step, CheckCancelled):
        return step.check()
    if isinstance(step, CallTask):
        return step.fn(*step.args, **step.kwargs)
    if isinstance(step, Advance):
        try:
            return False, next(step.iterator)
        except StopIteration as stop:
            return True, stop.value
    if isinstance(step, Sleep):
        core.clock.elapsed += step.seconds  # type: ignore[attr-defined]
        return None
    return None  # Record, Emit, ReleaseLock, CloseItems: nothing to answer


def describe(step: Step) -> tuple[Any, ...]:
    """A step as a short tuple: its kind and what tells it apart."""
    if isinstance(step, Record):
        return ("Record", step.state.name) + (("first",) if step.first else ())
    if isinstance(step, ReadCache):
        return ("ReadCache", step.key) + (("ahead",) if step.ahead else ())
    if isinstance(step, WriteCache):
        return ("WriteCache", step.key, step.value)
    if isinstance(step, RunHook):
        return ("RunHook", step.kind)
    if isinstance(step, CallTask):
        return ("CallTask", step.fn.__name__, step.timeout)
    if isinstance(step, Sleep):
        return ("Sleep", round(step.seconds, 6), step.reason)
    if isinstance(step, Emit):
        return ("Emit", step.item)
    if isinstance(step, TakeLock | ReleaseLock | ComputeKey | CheckCancelled | Advance):
        return (type(step).__name__,)
    if isinstance(step, CloseItems):
        return ("CloseItems",)
    raise AssertionError(f"unknown step {step!r}")


def add(x: int, y: int) -> int:
    return x + y


def test_a_success_is_pending_running_call_completed() -> None:
    core = make_core(add, {"x": 1, "y": 2})

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "add", None),
        ("Record", "Completed"),
    ]
    assert outcome.final is not None and outcome.final.data == 3


def test_a_failure_retries_after_each_delay_of_the_list_then_fails() -> None:
    def flaky() -> None:
        raise ConnectionError("down")

    core = make_core(flaky, retries=2, retry_delay_seconds=[1, 10])

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "flaky", None),
        ("Record", "AwaitingRetry"),
        ("Sleep", 1.0, "retry"),
        ("Record", "Retrying"),
        ("CallTask", "flaky", None),
        ("Record", "AwaitingRetry"),
        ("Sleep", 10.0, "retry"),
        ("Record", "Retrying"),
        ("CallTask", "flaky", None),
        ("Record", "Failed"),
    ]
    assert core.run.run_count == 3
    # The fixed clock moved only by the sleeps: the second AwaitingRetry is due at +11s.
    scheduled = [s.scheduled_time for s in core.run.state_history if s.name == "AwaitingRetry"]
    assert scheduled == [T0 + timedelta(seconds=1), T0 + timedelta(seconds=11)]


def test_retry_jitter_comes_from_the_environments_seeded_generator() -> None:
    def flaky() -> None:
        raise ConnectionError("down")

    sleeps = []
    for _ in range(2):
        core = make_core(flaky, retries=2, retry_delay_seconds=10, retry_jitter_factor=0.5)
        sleeps.append([s for s in play(core).steps if s[0] == "Sleep"])

    assert sleeps[0] == sleeps[1]  # the same seed, the same delays
    assert len(sleeps[0]) == 2
    assert all(5.0 <= seconds <= 15.0 for _, seconds, _ in sleeps[0])
    assert sleeps[0][0] != sleeps[0][1]


def test_a_retry_condition_veto_fails_the_run_without_a_retry() -> None:
    asked: list[str] = []

    def never(task: Any, run: Any, state: State) -> bool:
        asked.append(state.name)
        return False

    def flaky() -> None:
        raise ConnectionError("down")

    core = make_core(flaky, retries=3, retry_condition_fn=never)

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "flaky", None),
        ("RunHook", "retry_condition_fn"),
        ("Record", "Failed"),
    ]
    assert asked == ["Failed"]


def test_a_timeout_bounds_the_call_and_ends_in_timed_out() -> None:
    def slow() -> None:
        raise TaskRunTimeoutError(5.0)  # what a driver throws in at the deadline

    core = make_core(slow, timeout_seconds=5)

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "slow", 5.0),
        ("Record", "TimedOut"),
    ]
    assert outcome.final is not None and outcome.final.is_failed()


def test_a_crash_enters_crashed_and_lets_the_interrupt_through() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    core = make_core(interrupted, retries=3)

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "interrupted", None),
        ("Record", "Crashed"),
    ]
    assert isinstance(outcome.raised, KeyboardInterrupt)


def read_key(outcome: Play) -> str:
    """The key the run's first cache read asked for."""
    return next(step[1] for step in outcome.steps if step[0] == "ReadCache")


def test_a_cache_hit_reads_ahead_and_never_calls_the_function() -> None:
    key = read_key(play(make_core(add, {"x": 1, "y": 2}, cache_policy=INPUTS)))
    cache = {key: ResultRecord(key, 3, "json", T0)}
    core = make_core(add, {"x": 1, "y": 2}, cache_policy=INPUTS, store=ReadsAhead())

    outcome = play(core, cache)

    # INPUTS is a built-in policy: its key is a hash computed in place, not a user step.
    assert outcome.steps == [
        ("ReadCache", key, "ahead"),
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("ReadCache", key),
        ("Record", "Cached"),
    ]
    assert key.startswith("tests.core/")
    assert outcome.final is not None and outcome.final.data == 3


def test_a_store_that_cannot_read_ahead_is_read_once_after_running() -> None:
    key = read_key(play(make_core(add, {"x": 1, "y": 2}, cache_policy=INPUTS)))
    cache = {key: ResultRecord(key, 3, "json", T0)}

    outcome = play(make_core(add, {"x": 1, "y": 2}, cache_policy=INPUTS), cache)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("ReadCache", key),
        ("Record", "Cached"),
    ]


def test_a_cache_key_fn_is_a_compute_step_and_never_read_ahead() -> None:
    def by_x(context: Any, parameters: dict[str, Any]) -> str:
        return f"x={parameters['x']}"

    core = make_core(add, {"x": 1, "y": 2}, cache_key_fn=by_x, store=ReadsAhead())

    outcome = play(core, {"x=1": ResultRecord("x=1", 3, "json", T0)})

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("ComputeKey",),
        ("ReadCache", "x=1"),
        ("Record", "Cached"),
    ]


def test_a_miss_calls_the_function_and_commits_its_value() -> None:
    committed: list[Any] = []
    cache: dict[str, Any] = {}

    core = make_core(
        add,
        {"x": 1, "y": 2},
        cache_policy=INPUTS,
        on_commit=[lambda t: committed.append(t)],
        store=ReadsAhead(),
    )
    outcome = play(core, cache)

    key = read_key(outcome)
    assert outcome.steps == [
        ("ReadCache", key, "ahead"),
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("ReadCache", key),
        ("CallTask", "add", None),
        ("Record", "Completed"),
        ("RunHook", "on_commit"),
        ("WriteCache", key, 3),
    ]
    assert list(cache) == [key] and len(committed) == 1


def test_a_failing_commit_hook_rolls_back_and_writes_nothing() -> None:
    def refuse(txn: Any) -> None:
        raise RuntimeError("no")

    rolled_back: list[Any] = []
    cache: dict[str, Any] = {}
    core = make_core(
        add,
        {"x": 1, "y": 2},
        cache_policy=INPUTS,
        on_commit=[refuse],
        on_rollback=[rolled_back.append],
    )

    outcome = play(core, cache)

    assert [s[0] for s in outcome.steps[-3:]] == ["Record", "RunHook", "RunHook"]
    assert outcome.steps[-2:] == [("RunHook", "on_commit"), ("RunHook", "on_rollback")]
    assert cache == {} and len(rolled_back) == 1
    assert outcome.final is not None and outcome.final.is_completed()


def test_an_upstream_run_that_did_not_complete_leaves_the_run_not_ready() -> None:
    core = make_core(add, {"x": Failed(), "y": 2})

    outcome = play(core)

    assert outcome.steps == [("Record", "Pending", "first"), ("Record", "NotReady")]
    assert core.run.run_count == 0


def test_a_cancelled_run_is_checked_before_its_attempt_and_never_called() -> None:
    core = make_core(add, {"x": 1, "y": 2}, is_cancelled=lambda: True)

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CheckCancelled",),
        ("Record", "Cancelled"),
    ]


def test_a_generators_items_are_emitted_one_advance_at_a_time() -> None:
    def count() -> Iterator[int]:
        yield 1
        yield 2
        return "done"  # type: ignore[return-value]

    core = make_core(count, is_generator=True, timeout_seconds=30)

    outcome = play(core)

    assert outcome.steps == [
        ("Record", "Pending", "first"),
        ("Record", "Running"),
        ("CallTask", "count", None),  # creating the generator runs none of it: no timeout
        ("Advance",),
        ("Emit", 1),
        ("Advance",),
        ("Emit", 2),
        ("Advance",),
        ("Record", "Completed"),
    ]
    assert outcome.final is not None and outcome.final.data == "done"


def test_a_task_run_name_callable_is_a_compute_step() -> None:
    core = make_core(add, {"x": 1, "y": 2}, task_run_name=lambda: "named")

    outcome = play(core)

    assert outcome.steps[:3] == [
        ("Record", "Pending", "first"),
        ("ComputeKey",),
        ("Record", "Running"),
    ]
    assert core.run.name == "named"


@pytest.mark.parametrize("defer", [True, False])
def test_deferring_retries_ends_the_call_in_awaiting_retry(defer: bool) -> None:
    def flaky() -> None:
        raise ConnectionError("down")

    core = make_core(flaky, retries=1, retry_delay_seconds=5)
    core.env.defer_retries = defer

    outcome = play(core)

    assert outcome.final is not None
    assert outcome.final.name == ("AwaitingRetry" if defer else "Failed")
    assert (("Sleep", 5.0, "retry") in outcome.steps) is not defer
