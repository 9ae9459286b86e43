"""The engine's behaviour, once: a task run as a pure state machine that yields steps.

Nothing here calls user code, sleeps, reads a clock or touches a store directly: it yields
:mod:`~celery_taskengine.steps` for a driver to carry out, and time and randomness come from the
:class:`RunEnvironment`. The routines are named after the reference engine's methods
(``begin_run``, ``handle_retry``, ...) so the sync and async engine shells map onto them.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from celery_taskengine import cache_policies as cp
from celery_taskengine._store.protocol import ResultRecord, ResultStore
from celery_taskengine.drivers import GeneratorClosed
from celery_taskengine.errors import (
    ConfigurationError,
    InvalidArguments,
    RetryRequested,
    TaskRunTimeoutError,
)
from celery_taskengine.options import TaskOptions
from celery_taskengine.parameters import call_arguments
from celery_taskengine.pydantic_args import dump_result, validate_parameters
from celery_taskengine.retry_policy import delay_for_retry, full_jitter, jittered
from celery_taskengine.run_scope import run_scope
from celery_taskengine.states import (
    TRANSITIONS as _TRANSITIONS,
)
from celery_taskengine.states import State, StateType, aggregate_states, delay_to, utcnow
from celery_taskengine.steps import Advance, CallTask, Emit, Invoke, Sleep, Steps
from celery_taskengine.task_run import TaskRun
from celery_taskengine.transactions import Transaction, effective_isolation

__all__ = ["EngineTask", "RunCore", "RunEnvironment"]

logger = logging.getLogger("celery_taskengine.task_runs")

_ACTIVE = (StateType.RUNNING, StateType.SCHEDULED)
#: Jitter needs no cryptographic quality; one generator per process avoids seeding per run.
_SHARED_RNG = random.Random()


class EngineTask(Protocol):
    """What the core needs to know of a task."""

    name: str
    engine_options: TaskOptions

    @property
    def fn(self) -> Callable[..., Any]: ...

    def source_text(self) -> str: ...


@dataclass(slots=True)
class RunEnvironment:
    """What the place a run executes in provides: storage, recording, clock and policy."""

    store: ResultStore
    #: Persist (and, in a worker, publish) the run after each state change; ``None`` when the
    #: store already holds the live run object (the in-memory store), so there is nothing to do.
    record: Callable[[TaskRun, State], None] | None
    #: The id RUN_ID keys use: the Celery workflow root id in a worker, else the run's own id.
    key_run_id: str | None = None
    #: In a worker, a delayed retry ends this call in AwaitingRetry; the bridge re-queues it.
    defer_retries: bool = False
    is_cancelled: Callable[[], bool] | None = None
    clock: Callable[[], datetime] = utcnow
    monotonic: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=lambda: _SHARED_RNG)
    #: Save the run once when it is created (stores that keep the live object).
    saves_on_create: bool = False
    #: Runs of this task execute in several processes (a worker pool), so its locks must be
    #: seen by all of them: an in-process store cannot serve SERIALIZABLE there.
    across_processes: bool = False
    #: In a worker: the state an exception raised by the function ends the attempt in, never
    #: retried (Celery's ``Reject``/``Ignore``, see control_flow); ``None``: a failure.
    ends_attempt: Callable[[Exception], State | None] | None = None


class RunCore:
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
        self.run = run
        self.env = env
        self.wait_for = wait_for
        self.is_async = is_async
        self.is_generator = is_generator
        #: The values the function is called with (upstream states resolved); a copy is made
        #: only when something is resolved.
        self.call_parameters: dict[str, Any] = run.parameters
        #: The first attempt's cache read, sent before Running (see _early_reader): its key and
        #: the pending answer; ``(None, None)`` when the key came out None.
        self._early_read: tuple[str, Any] | tuple[None, None] | None = None
        #: Why the arguments do not fit their models (``pydantic=True``): the run fails at
        #: its first attempt, never retried, since no attempt could pass.
        self.invalid_inputs: ValueError | None = None
        if self.options.pydantic is not None:
            try:
                self.call_parameters = validate_parameters(task, run.parameters)
            except ValueError as exc:  # pydantic's ValidationError
                self.invalid_inputs = InvalidArguments(str(exc))
                self.invalid_inputs.__cause__ = exc

    @property
    def state(self) -> State:
        assert self.run.state is not None, "the run has no state before initialize_run"
        return self.run.state

    # -- the whole run -----------------------------------------------------------------------
    def run_to_end(self) -> Steps[State]:
        """Every attempt of the run, until a final state (or AwaitingRetry when deferring)."""
        try:
            if not (yield from self.start(read_early=True)):
                return self.state
            while self.state.type in _ACTIVE:
                if self.state.is_scheduled():
                    if self.env.defer_retries:
                        return self.state
                    yield from self.wait_until_ready()
                yield from self.attempt()
            final = self.state
            if self.options.on_completion or self.options.on_failure:
                yield from self.call_hooks(final)
            self.log_finished_message()
        except (GeneratorExit, Exception):
            self._discard_early_read()
            raise
        except BaseException as exc:
            self._discard_early_read()
            if self.run.state is not None and not self.state.is_final():
                yield from self.handle_crash(exc)
            raise
        return self.state

    def initialize_run(self) -> Steps[None]:
        """Enter Pending for a new run (a run handed in keeps its history)."""
        if self.run.state is None:
            if self.env.saves_on_create:
                yield Invoke(self.env.store.save_run, (self.run,))
            if (step := self.enter_state(self._new(StateType.PENDING, "Pending"))) is not None:
                yield step

    def start(self, *, read_early: bool = False) -> Steps[bool]:
        """Resolve inputs and enter Running; ``False`` when the run must not execute now.

        ``read_early``: send the first attempt's cache read first (see _early_reader);
        only for a caller that goes on to the attempt, which reads the answer.
        """
        reader = self._early_reader() if read_early else None
        if self.run.state is None:
            if reader is not None and self._inputs_are_values():  # the key is known already
                yield from self._send_early_read(reader)
                reader = None
            yield from self.initialize_run()
        state = self.state
        if state.is_final() and not state.is_crashed():
            return False  # a redelivered message for a finished run: never execute twice
        if state.is_pending():
            self._check_configuration()
            not_ready = self._resolve_inputs()
            if not_ready is not None:
                if (step := self.enter_state(not_ready)) is not None:
                    yield step
                return False
            if reader is not None:
                yield from self._send_early_read(reader)
            self.run.name = self._render_run_name()
            yield from self.begin_run()
            return True
        if (
            state.is_running()
            and (
                step := self.enter_state(
                    self._new(StateType.CRASHED, "Crashed", _INTERRUPTED_MESSAGE)
                )
            )
            is not None
        ):
            yield step
        if self.state.is_crashed():
            yield from self.enter_running(retrying=True)
        elif self.state.is_scheduled():
            # A run handed back in AwaitingRetry (in a worker: the retry's delivery) goes on
            # now, even when deferring: its delay was already spent on the broker.
            yield from self.wait_until_ready()
        return True

    def begin_run(self) -> Steps[None]:
        yield from self.enter_running(retrying=False)

    def enter_running(self, *, retrying: bool) -> Steps[None]:
        self.run.run_count += 1
        name = "Retrying" if retrying else "Running"
        if (step := self.enter_state(self._new(StateType.RUNNING, name))) is not None:
            yield step
        if self.options.on_running:
            yield from self.call_hooks(self.state)

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
        if self.env.is_cancelled is not None and (yield Invoke(self.env.is_cancelled)):
            if (
                step := self.enter_state(
                    self._new(StateType.CANCELLED, "Cancelled", "The task run was cancelled.")
                )
            ) is not None:
                yield step
            return
        if self.invalid_inputs is not None:
            yield from self._fail(self.invalid_inputs)
            return
        hit, txn = yield from self._look_up()
        try:
            if hit is not None:
                cached = self._new(StateType.COMPLETED, "Cached", data=hit.value)
                if (step := self.enter_state(cached)) is not None:
                    yield step
                yield from self._leave_transaction(txn, None)
                return
            result = yield from self.call_task_fn()
        except Exception as exc:
            yield from self._leave_transaction(txn, exc)
            if isinstance(exc, TimeoutError):
                yield from self.handle_timeout(exc)
            else:
                yield from self.handle_exception(exc)
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
        yield from self._leave_transaction(txn, None)

    def _look_up(self) -> Steps[tuple[ResultRecord | None, Transaction | None]]:
        """The committed record under this attempt's key, if any, and its open transaction.

        READ_COMMITTED takes no lock and a hit runs nothing, so then the key is read before a
        transaction is opened: a hit needs none (``None``), and a miss's need not read again.
        """
        key: str | None
        read: Invoke | None
        early, self._early_read = self._early_read, None
        if early is not None:  # sent before Running (see _early_reader)
            key, pending = early
            read = Invoke(pending.result) if pending is not None else None
        else:
            key = None if self.is_generator else self.compute_transaction_key()
            plain = key is not None and self._reads_plainly()
            read = Invoke(self._key_store().read, (key,)) if plain else None
        if read is not None:
            hit: ResultRecord | None = yield read
            if hit is not None:
                return hit, None
        txn = self._transaction(key)
        if key is None:
            txn.enter()
        else:
            yield from txn.begin_steps(read=read is None)
        return (txn.record if txn.is_committed() else None), txn

    def _early_reader(self) -> Callable[[str], Any] | None:
        """How to send this run's first cache read early (the store's ``start_read``), if it
        may be: sent before Running is recorded, its answer travels while the engine works.

        Only where nothing in between could change the key or the record: a plain read
        (READ_COMMITTED, no refresh), no ``on_running`` hooks, no cancellation check, and a key
        that depends on the task and its inputs alone (no ``cache_key_fn`` or storage key
        template, which may look at the run). A store without ``start_read`` reads later.
        """
        options = self.options
        policy = options.cache_policy
        if policy is None or self.is_generator or self.invalid_inputs is not None:
            return None
        start_read: Callable[[str], Any] | None = getattr(self._key_store(), "start_read", None)
        if (
            start_read is None
            or options.on_running
            or self.env.is_cancelled is not None
            or options.result_storage_key is not None
            or not cp.keys_from_inputs_only(policy)
            or not self._reads_plainly()
        ):
            return None
        return start_read

    def _send_early_read(self, start_read: Callable[[str], Any]) -> Steps[None]:
        key = self.compute_transaction_key()
        if key is None:
            self._early_read = (None, None)  # no key (maybe with a warning): not computed again
        else:
            self._early_read = (key, (yield Invoke(start_read, (key,))))

    def _inputs_are_values(self) -> bool:
        """Whether the inputs need no resolving (no upstream states to wait for or unwrap)."""
        if self.wait_for:
            return False
        return not any(isinstance(value, State) for value in self.run.parameters.values())

    def _discard_early_read(self) -> None:
        """Give back an early read's connection that no attempt came to read (a local act)."""
        early, self._early_read = self._early_read, None
        if early is not None and early[1] is not None:
            early[1].discard()

    def _leave_transaction(
        self, txn: Transaction | None, error: BaseException | None
    ) -> Steps[None]:
        if txn is not None and not txn.leave_quietly(error):
            yield from txn.exit_steps(error)

    def _reads_plainly(self) -> bool:
        """Whether this attempt's transaction would only read its key: no lock, no refresh."""
        policy = self.options.cache_policy
        if self.options.refresh_cache:
            return False
        given = policy.isolation_level if policy is not None else None
        return effective_isolation(given) is cp.IsolationLevel.READ_COMMITTED

    def _key_store(self) -> ResultStore:
        """Where this task's records live: the policy's key_storage, else the run's store."""
        policy = self.options.cache_policy
        if policy is not None and policy.key_storage is not None:
            return policy.key_storage  # type: ignore[no-any-return]
        return self.env.store

    def transaction_context(self) -> Transaction:
        """The transaction for this attempt, keyed by the cache policy (or not at all)."""
        return self._transaction(None if self.is_generator else self.compute_transaction_key())

    def _transaction(self, key: str | None) -> Transaction:
        options = self.options
        policy = options.cache_policy
        return Transaction(
            key,
            store=self._key_store(),
            isolation_level=policy.isolation_level if policy is not None else None,
            overwrite=options.refresh_cache,
            write_on_commit=options.persist_result,
            serializer=options.result_serializer,
            expires_in=options.cache_expiration,
            task_name=self.task.name,
            lock_manager=policy.lock_manager if policy is not None else None,
        )

    def compute_transaction_key(self) -> str | None:
        options = self.options
        if not options.persist_result:
            return None  # nothing is written, so nothing can ever be read back
        context = cp.KeyContext(
            task_name=self.task.name,
            run_id=self.env.key_run_id or self.run.id,
            task_source=self.task.source_text,
            task_run=self.run,
        )
        # Upstream states are keyed by their values, as the function sees them: a State object
        # would hash its timestamp too, and an equal value from another run would never hit.
        return cp.compute_transaction_key(
            options.cache_policy,
            context,
            self.call_parameters,
            result_storage_key=options.result_storage_key,
        )

    def call_task_fn(self) -> Steps[Any]:
        """Call the function (a generator task also drains its items here)."""
        args, kwargs = call_arguments(self.task.fn, self.call_parameters)
        call = CallTask(
            self.task.fn, args, kwargs, self.options.timeout_seconds, self._scope, self.is_async
        )
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
                closer = iterator.aclose if self.is_async else iterator.close
                yield Invoke(closer)
                return None

    def _scope(self) -> Any:
        return run_scope(self.run, log_prints=self.options.log_prints)

    # -- outcomes ----------------------------------------------------------------------------
    def handle_success(self, result: Any, txn: Transaction) -> Steps[None]:
        returned = _returned_state(result)
        if returned is not None and returned.type in _NOT_AN_ENDING:
            # Entered as is, Pending is an illegal transition and Running/Scheduled call the
            # function again forever: a task returning one is a mistake, so the run fails.
            message = (
                f"Task run returned the non-final state {returned}; a task may return only "
                "a final state (Completed, Failed, Cancelled, Crashed) or Paused."
            )
            returned = self._new(StateType.FAILED, "Failed", message)
        if returned is None:
            txn.stage(result, self.options.on_commit, self.options.on_rollback)
            if (
                step := self.enter_state(self._new(StateType.COMPLETED, "Completed", data=result))
            ) is not None:
                yield step
            return
        if returned.is_completed():
            txn.stage(returned.data, self.options.on_commit, self.options.on_rollback)
            if (step := self.enter_state(returned)) is not None:
                yield step
            return
        txn.on_rollback_hooks.extend(self.options.on_rollback)
        yield from txn.rollback_steps()
        if returned.is_failed() and (yield from self.handle_retry(returned)):
            return
        if (step := self.enter_state(returned)) is not None:
            yield step

    def handle_exception(self, exc: Exception) -> Steps[None]:
        control = self.env.ends_attempt(exc) if self.env.ends_attempt is not None else None
        if control is not None:
            if (step := self.enter_state(control)) is not None:
                yield step
            return
        if (yield from self.handle_retry(exc)):
            return
        if isinstance(exc, RetryRequested) and isinstance(exc.exc, Exception):
            exc = exc.exc  # a retry asked for past the limit fails as Celery's does: with exc
        yield from self._fail(exc)

    def _fail(self, exc: Exception) -> Steps[None]:
        message = f"Task run encountered an exception {type(exc).__name__}: {exc}"
        if (
            step := self.enter_state(self._new(StateType.FAILED, "Failed", message, data=exc))
        ) is not None:
            yield step

    def handle_timeout(self, exc: TimeoutError) -> Steps[None]:
        if (yield from self.handle_retry(exc)):
            return
        if isinstance(exc, TaskRunTimeoutError):
            message = f"Task run exceeded timeout of {exc.timeout_seconds} second(s)"
        else:
            message = f"Task run failed due to timeout: {exc!r}"
        if (
            step := self.enter_state(self._new(StateType.FAILED, "TimedOut", message, data=exc))
        ) is not None:
            yield step

    def handle_crash(self, exc: BaseException) -> Steps[None]:
        message = _crash_message(exc)
        logger.error("%s: crashed: %s", self.run.id, message)
        if (
            step := self.enter_state(self._new(StateType.CRASHED, "Crashed", message, data=exc))
        ) is not None:
            yield step

    def handle_retry(self, exc_or_state: BaseException | State) -> Steps[bool]:
        """Schedule the next attempt if retries remain and the condition allows it."""
        if not (yield from self.can_retry(exc_or_state)):
            return False
        options = self.options
        retries_done = self.run.run_count - 1
        delay = self._retry_delay(exc_or_state, retries_done)
        logger.info(
            "%s: attempt %d failed (%s); retry %d/%d in %.3gs",
            self.run.id,
            self.run.run_count,
            _describe(exc_or_state),
            retries_done + 1,
            options.retries,
            delay,
        )
        if delay > 0:
            now = self.env.clock()
            awaiting = self._new(StateType.SCHEDULED, "AwaitingRetry", now=now)
            # Its data is why (an exception, or none): Celery's retry carries it to on_retry.
            reason = exc_or_state.data if isinstance(exc_or_state, State) else exc_or_state
            awaiting = State(
                awaiting.type,
                awaiting.name,
                None,
                now,
                scheduled_time=delay_to(now, delay),
                data=reason if isinstance(reason, BaseException) else None,
            )
            if (step := self.enter_state(awaiting)) is not None:
                yield step
        else:
            yield from self.enter_running(retrying=True)
        return True

    def _retry_delay(self, exc_or_state: BaseException | State, retries_done: int) -> float:
        """Seconds before the next attempt: the one ``self.retry()`` asked for, else the
        task's delay for this retry with its jitter."""
        if isinstance(exc_or_state, RetryRequested) and exc_or_state.delay is not None:
            return max(0.0, exc_or_state.delay)
        options = self.options
        delay = delay_for_retry(options.retry_delays, retries_done)
        if options.retry_full_jitter:
            return full_jitter(delay, self.env.rng)
        return jittered(delay, options.retry_jitter_factor, self.env.rng)

    def can_retry(self, exc_or_state: BaseException | State) -> Steps[bool]:
        limit = self.options.retries
        if isinstance(exc_or_state, RetryRequested) and exc_or_state.limit is not None:
            limit = exc_or_state.limit  # self.retry()'s own limit (Celery's max_retries)
        if self.run.run_count > limit:
            return False
        condition = self.options.retry_condition_fn
        if condition is None or isinstance(exc_or_state, RetryRequested):
            return True  # self.retry() is the task's own decision: no condition applies
        if isinstance(exc_or_state, State):
            seen = exc_or_state
        else:
            message = f"Task run encountered unexpected exception: {exc_or_state!r}"
            seen = self._new(StateType.FAILED, "Failed", message, data=exc_or_state)
        try:
            return bool((yield Invoke(condition, (self.task, self.run, seen))))
        except Exception:
            logger.exception("%s: retry_condition_fn raised; not retrying", self.run.id)
            return False

    # -- hooks and bookkeeping ---------------------------------------------------------------
    def call_hooks(self, state: State) -> Steps[None]:
        """Run the hooks for ``state``; a hook that raises is logged and changes nothing."""
        options = self.options
        if state.type is StateType.FAILED:
            hooks = options.on_failure
        elif state.type is StateType.COMPLETED:
            hooks = options.on_completion
        elif state.type is StateType.RUNNING:
            hooks = options.on_running
        else:
            return
        for hook in hooks:
            try:
                yield Invoke(hook, (self.task, self.run, state))
            except Exception:
                logger.exception(
                    "%s: an error was encountered while running hook %r",
                    self.run.id,
                    _hook_name(hook),
                )

    def set_state(self, state: State) -> Steps[State]:
        """Enter ``state``: check the transition, update the record, and persist it."""
        step = self.enter_state(state)
        if step is not None:
            yield step
        return state

    def enter_state(self, state: State) -> Invoke | None:
        """Enter ``state`` in the record; return the step that persists it, if one is needed.

        Not a routine of its own because it runs several times per run: the caller yields
        the step, which saves a generator per state on the hot path.
        """
        run = self.run
        current = run.state
        if current is not None and state.type not in _TRANSITIONS[current.type]:
            raise RuntimeError(f"illegal transition {current} -> {state} in run {run.id}")
        run.state = state
        run.state_history.append(state)
        if state.type is StateType.RUNNING and run.start_time is None:
            run.start_time = state.timestamp
        elif state.type in _FINAL:
            run.end_time = state.timestamp
        record = self.env.record
        return Invoke(record, (run, state)) if record is not None else None

    def log_finished_message(self) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info("%s: finished in state %s", self.run.id, self.state)

    def _new(
        self,
        kind: StateType,
        name: str,
        message: str | None = None,
        data: Any = None,
        now: datetime | None = None,
    ) -> State:
        return State(kind, name, message, now or self.env.clock(), None, data)

    def _check_configuration(self) -> None:
        policy = self.options.cache_policy
        if (
            policy is None
            or policy.isolation_level is not cp.IsolationLevel.SERIALIZABLE
            or not self.options.persist_result
        ):
            return
        locks = next(
            s for s in (policy.lock_manager, policy.key_storage, self.env.store) if s is not None
        )
        in_one_process = not getattr(locks, "shared", True)
        if not getattr(locks, "supports_locking", False) or (
            self.env.across_processes and in_one_process
        ):
            raise ConfigurationError(
                f"task {self.task.name!r} uses IsolationLevel.SERIALIZABLE, but its store "
                f"({type(locks).__name__}) cannot lock across processes; use a Redis result "
                "backend or configure the policy with a lock_manager that can"
            )

    def _resolve_inputs(self) -> State | None:
        """Replace upstream states by their values; NotReady if one did not complete."""
        for item in self.wait_for or ():
            if isinstance(item, State) and not item.is_completed():
                return self._not_ready(item)
        for name, value in self.run.parameters.items():
            if isinstance(value, State):
                if not value.is_completed():
                    return self._not_ready(value)
                if self.call_parameters is self.run.parameters:
                    self.call_parameters = dict(self.run.parameters)
                self.call_parameters[name] = value.data
        return None

    def _not_ready(self, upstream: State) -> State:
        message = f"Upstream task run in state {upstream.name!r} did not reach a 'COMPLETED' state."
        return self._new(StateType.PENDING, "NotReady", message)

    def _render_run_name(self) -> str:
        template = self.options.task_run_name
        if template is None:
            return self.run.name
        if isinstance(template, str):
            return template.format(**self.call_parameters)
        if "parameters" in inspect.signature(template).parameters:
            name = template(parameters=dict(self.call_parameters))
        else:
            name = template()
        if not isinstance(name, str):
            raise TypeError(f"task_run_name callable must return a str, got {type(name).__name__}")
        return name


_FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})
_NOT_AN_ENDING = frozenset({StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED})
_INTERRUPTED_MESSAGE = "The process running this attempt stopped before it finished."


def _returned_state(result: Any) -> State | None:
    if isinstance(result, State):
        return result
    if (
        isinstance(result, list | tuple | set)
        and result
        and all(isinstance(item, State) for item in result)
    ):
        return aggregate_states(result)
    return None


def _crash_message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "Execution was aborted by an interrupt signal."
    if isinstance(exc, SystemExit):
        return "Execution was aborted by Python system exit call."
    if type(exc).__name__ == "CancelledError":
        return "Execution was cancelled by the runtime environment."
    return f"Execution was interrupted by an unexpected exception: {type(exc).__name__}: {exc}"


def _describe(exc_or_state: BaseException | State) -> str:
    if isinstance(exc_or_state, State):
        return str(exc_or_state)
    return f"{type(exc_or_state).__name__}: {exc_or_state}"


def _hook_name(hook: Callable[..., Any]) -> str:
    inner = getattr(hook, "func", hook)
    return str(getattr(inner, "__name__", type(inner).__name__))
