"""The engine's behaviour, once: a task run as a pure state machine that yields steps.

Nothing here calls user code, sleeps, reads a clock or touches a store directly: it yields
:mod:`~celery_taskengine._engine.steps` for a driver to carry out, and time and randomness
come from the :class:`RunEnvironment`. The routines are named after the reference engine's methods
(``begin_run``, ``handle_retry``, ...) so the sync and async engine shells map onto them.

The decisions are split by concept: state entry (:mod:`~celery_taskengine._engine.core_states`),
outcomes and retries (:mod:`~celery_taskengine._engine.core_outcomes`), cache keys and transactions
(:mod:`~celery_taskengine._engine.core_cache`); this module holds the run's course and one attempt.
Importing it imports no Celery, kombu, Redis or anyio (``tests/test_layers.py`` checks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.core_cache import CacheSteps, key_plan
from celery_taskengine._engine.core_env import EngineTask, RunEnvironment
from celery_taskengine._engine.core_outcomes import Outcomes
from celery_taskengine._engine.parameters import call_arguments
from celery_taskengine._engine.pydantic_args import dump_result, validate_parameters
from celery_taskengine._engine.steps import (
    Advance,
    CallTask,
    CheckCancelled,
    CloseItems,
    Emit,
    GeneratorClosed,
    Sleep,
    Steps,
)
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.errors import InvalidArguments, TaskRunTimeoutError
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery_taskengine._store.protocol import ResultRecord
    from celery_taskengine.transactions import Transaction

__all__ = ["EngineTask", "RunCore", "RunEnvironment"]

_ACTIVE = (StateType.RUNNING, StateType.SCHEDULED)
_INTERRUPTED_MESSAGE = "The process running this attempt stopped before it finished."


class RunCore(Outcomes, CacheSteps):
    """One task run's decisions: which state comes next and which step to take."""

    def __init__(
        self,
        task: EngineTask,
        run: TaskRun,
        env: RunEnvironment,
        *,
        wait_for: Iterable[Any] | None = None,
        is_async: bool = False,
        is_generator: bool = False,
    ) -> None:
        self.task = task
        self.options = task.engine_options
        self.keys = key_plan(self.options)
        self.run = run
        self.env = env
        self.wait_for = wait_for
        self.is_async = is_async
        self.is_generator = is_generator
        self.call_parameters = run.parameters
        self.invalid_inputs = None
        if self.options.pydantic is not None:
            try:
                self.call_parameters = validate_parameters(task, run.parameters)
            except ValueError as exc:  # pydantic's ValidationError
                self.invalid_inputs = InvalidArguments(str(exc))
                self.invalid_inputs.__cause__ = exc

    # -- the whole run -----------------------------------------------------------------------
    def run_to_end(self) -> Steps[State]:
        """Every attempt of the run, until a final state (or AwaitingRetry when deferring)."""
        try:
            if not (yield from self.start(read_early=True)):
                return self.state
            run = self.run  # its state is set from Pending on: no property on this path
            while run.state.type in _ACTIVE:  # type: ignore[union-attr]
                if run.state.type is StateType.SCHEDULED:  # type: ignore[union-attr]
                    if self.env.defer_retries:
                        return self.state
                    yield from self.wait_until_ready()
                yield from self.attempt()
            if self.options.on_completion or self.options.on_failure:
                yield from self.call_hooks(self.state)
            self.log_finished_message()
        except (GeneratorExit, Exception):
            raise  # an error of the run's own, or the caller closing it: not a crash
        except BaseException as exc:
            if self.run.state is not None and not self.state.is_final():
                yield from self.handle_crash(exc)
            raise
        return self.state

    def initialize_run(self) -> Steps[None]:
        """Enter Pending for a new run (a run handed in keeps its history)."""
        if self.run.state is None:
            yield self.enter_state(self._new(StateType.PENDING, "Pending"), first=True)

    def start(self, *, read_early: bool = False) -> Steps[bool]:
        """Resolve inputs and enter Running; ``False`` when the run must not execute now.

        ``read_early``: send the first attempt's cache read ahead (see _may_read_ahead); only
        for a caller that goes on to the attempt, which reads the answer. A new run's path
        (Pending, then Running) is written out here: every run takes it, so it costs no
        routine of its own (``initialize_run``, ``begin_run``) on the way.
        """
        ahead = read_early and self.keys.ahead and self._may_read_ahead()
        if self.run.state is None:
            if ahead and self._inputs_are_values():  # the key is known already
                yield from self._read_ahead()
                ahead = False
            yield self.enter_state(self._new(StateType.PENDING, "Pending"), first=True)
        elif not self.state.is_pending():
            return (yield from self._resume())
        self._check_configuration()
        not_ready = self._resolve_inputs()
        if not_ready is not None:
            yield self.enter_state(not_ready)
            return False
        if ahead:
            yield from self._read_ahead()
        if self.options.task_run_name is not None:
            self.run.name = yield from self._render_run_name()
        self.run.run_count += 1
        yield self.enter_state(self._new(StateType.RUNNING, "Running"))
        if self.options.on_running:
            yield from self.call_hooks(self.state)
        return True

    def _resume(self) -> Steps[bool]:
        """A run handed in past Pending (a redelivery, a retry's delivery): go on, or not."""
        state = self.state
        if state.is_final() and not state.is_crashed():
            return False  # a redelivered message for a finished run: never execute twice
        if state.is_running():
            crashed = self._new(StateType.CRASHED, "Crashed", _INTERRUPTED_MESSAGE)
            yield self.enter_state(crashed)
        if self.state.is_crashed():
            yield from self.enter_running(retrying=True)
        elif self.state.is_scheduled():
            # A run handed back in AwaitingRetry (in a worker: the retry's delivery) goes on
            # now, even when deferring: its delay was already spent on the broker.
            yield from self.wait_until_ready()
        return True

    def begin_run(self) -> Steps[None]:
        yield from self.enter_running(retrying=False)

    def wait_until_ready(self) -> Steps[None]:
        """Sleep until an AwaitingRetry's scheduled time, then enter Retrying."""
        scheduled = self.state.scheduled_time
        if scheduled is not None:
            wait = (scheduled - self.env.clock()).total_seconds()
            if wait > 0:
                yield Sleep(wait, reason="retry")
        yield from self.enter_running(retrying=True)

    # -- one attempt -------------------------------------------------------------------------
    def attempt(self) -> Steps[None]:
        """Read the cache or call the function once, and move to the state that follows."""
        if (self.env.is_cancelled is not None or self.invalid_inputs is not None) and (
            yield from self._ends_before_call()
        ):
            return
        hit: ResultRecord | None = None
        txn: Transaction | None
        if self.is_generator or self.keys.keyless:  # no key: no look-up routine either
            txn = self._transaction(None)
            txn.enter()
        else:
            hit, txn = yield from self._look_up()
        try:
            if hit is not None:
                yield self.enter_state(self._new(StateType.COMPLETED, "Cached", data=hit.value))
                if txn is not None and not txn.leave_quietly(None):
                    yield from txn.exit_steps(None)
                return
            if self.is_generator or self.options.pydantic is not None:
                result = yield from self.call_task_fn()
            else:  # call_task_fn's plain case, one generator less on every run's path
                result = yield self._call_step()
        except Exception as exc:
            yield from self._after_error(txn, exc)
            return
        except GeneratorExit:
            if txn is not None:
                txn.abandon()
            raise
        except BaseException as exc:
            yield from self._leave_transaction(txn, exc)
            raise
        assert txn is not None, "a miss always opens a transaction"
        yield from self.handle_success(result, txn)
        if not txn.leave_quietly(None):
            yield from txn.exit_steps(None)

    def _after_error(self, txn: Transaction | None, exc: Exception) -> Steps[None]:
        yield from self._leave_transaction(txn, exc)
        if isinstance(exc, TimeoutError):
            yield from self.handle_timeout(exc)
        else:
            yield from self.handle_exception(exc)

    def _ends_before_call(self) -> Steps[bool]:
        """A cancelled run, or inputs that cannot fit: the attempt ends before any call."""
        if self.env.is_cancelled is not None and (yield CheckCancelled(self.env.is_cancelled)):
            message = "The task run was cancelled."
            yield self.enter_state(self._new(StateType.CANCELLED, "Cancelled", message))
            return True
        if self.invalid_inputs is not None:
            yield from self._fail(self.invalid_inputs)
            return True
        return False

    def _call_step(self) -> CallTask:
        args, kwargs = call_arguments(self.task.fn, self.call_parameters)
        return CallTask(
            self.task.fn, args, kwargs, self.options.timeout_seconds, self._scope, self.is_async
        )

    def call_task_fn(self) -> Steps[Any]:
        """Call the function (a generator task also drains its items here)."""
        call = self._call_step()
        if not self.is_generator:
            value = yield call
            return value if self.options.pydantic is None else dump_result(self.task, value)
        call.timeout = None  # creating a generator runs none of its body
        call.is_async = False  # and an async generator object is iterated, never awaited
        iterator = yield call
        return (yield from self._drain(iterator))

    def _drain(self, iterator: Any) -> Steps[Any]:
        timeout = self.options.timeout_seconds
        deadline = None if timeout is None else self.env.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - self.env.monotonic()
            if remaining is not None and remaining <= 0:
                raise TaskRunTimeoutError(timeout or 0.0)
            try:
                done, value = yield Advance(iterator, remaining, self._scope, self.is_async)
            except TaskRunTimeoutError:
                # The step was bounded by what was left; the run's limit is the task's.
                raise TaskRunTimeoutError(timeout or 0.0) from None
            if done:
                return value
            try:
                yield Emit(value)
            except GeneratorClosed:
                yield CloseItems(iterator, self.is_async)
                return None
