"""The worker side of the bridge: one Celery delivery runs the engine for one run.

It translates and decides nothing. In: Celery's request (task id = run id, the workflow's root
id for RUN_ID keys, the arguments). The engine runs with a worker environment: records go to
the app's result backend, delayed retries are deferred, revokes count as cancellation. Out:
the value (Completed, Cached), the stored exception (Failed, TimedOut; a crash re-raises by
itself), ``task.retry(countdown=...)`` for AwaitingRetry (same task id, same canvas links), or
Celery's ``Ignore`` once a cancellation is recorded.

A message whose run already has a record (a retry, a redelivery) continues that run; one whose
run is finished returns or raises the recorded outcome without calling the function again. A
message handed out twice at once runs once (see :mod:`~celery_taskengine._store.claims`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from celery import states as celery_states
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Ignore
from celery.signals import task_revoked

from celery_taskengine._celery.cancellation import revocation_check
from celery_taskengine._celery.celery_request import delivering
from celery_taskengine._celery.control_flow import HANDED_BACK, celery_control_state
from celery_taskengine._celery.engine_backend import CLAIM
from celery_taskengine._celery.events import StateEvents, task_events_enabled
from celery_taskengine._celery.message_age import may_be_duplicate
from celery_taskengine._celery.streaming import ItemChannel
from celery_taskengine._celery.worker_loop import run_on_worker_loop
from celery_taskengine._celery.worker_requeue import (
    handed_back_if_unreachable,
    rejected_if_unrecorded,
)
from celery_taskengine._celery.worker_retries import retry_later
from celery_taskengine._engine.observers import RunObserver, RunObservers, StateWrites
from celery_taskengine._engine.parameters import bind_parameters
from celery_taskengine._engine.run_core import RunEnvironment
from celery_taskengine._engine.task_run import TaskRun, new_task_run
from celery_taskengine._store.claims import CLAIM_TTL_SECONDS, Claim
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.renewer import renewer
from celery_taskengine._store.selection import store_for_app
from celery_taskengine._store.worker_records import Delivery, retry_patience
from celery_taskengine.states import State
from celery_taskengine.task_engine import runner_for

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task
    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["run_delivery"]

logger = logging.getLogger(__name__)


def run_delivery(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the engine for the delivery Celery is executing, and give Celery its outcome.

    A store that cannot be reached before the attempt starts hands the delivery back to the
    broker (see worker_requeue) instead of failing the run.
    """
    store = store_for_app(task.app)
    request = task.request
    parameters = bind_parameters(task.run, args, kwargs)
    claim = None
    if store.claims:
        claiming: Any = store  # claims are operations of such stores (see redis_claims.ClaimStore)
        with handed_back_if_unreachable(task, args, kwargs):
            claim = _claim_message(task, request, claiming)
            handled = _recorded_run(task, request, claiming) if claim is None else None
        if handled is not None:
            logger.info("%s: giving Celery the outcome another delivery recorded", request.id)
            return _outcome(task, _delivery(task, request, store, None), handled, [])
    try:
        delivery = _delivery(task, request, store, claim)
        with handed_back_if_unreachable(task, args, kwargs):
            run = _stored_run(task, delivery, store, parameters)
        with rejected_if_unrecorded(task):
            items = _run(task, delivery, store, run)
    finally:
        if claim is not None:
            renewer().release(claim)
    if claim is not None and claim.lost:
        raise Ignore()  # the delivery holding the claim gives Celery the outcome (logged)
    if claim is not None and run.state is not None and run.state.name in HANDED_BACK:
        freeing: Any = store
        freeing.free_claim(claim)  # the message's next delivery continues the run
    return _outcome(task, delivery, run, items)


def _stored_run(
    task: Task, delivery: Delivery, store: ResultStore, parameters: dict[str, Any]
) -> TaskRun:
    """The delivery's run: the recorded one to continue, if any, else a new one.

    The message says how many attempts came before (Celery's ``retries``): a run whose record
    is missing (expired, or kept by a store another process cannot see) starts counting
    there, so its retries can neither start over nor go on for ever.
    """
    run = None
    if delivery.may_continue:  # else no record can exist yet
        run = store.load_run(delivery.task_id)
    if run is None:
        run = new_task_run(task, parameters, delivery.task_id)
        run.run_count = max(run.run_count, delivery.retries)
    return run


def _run(task: Task, delivery: Delivery, store: ResultStore, run: TaskRun) -> list[Any]:
    """Let the engine run ``run``; the items it yielded."""
    channel = None
    if task.fn_kind in ("generator", "async_generator") and store.shared:
        channel = ItemChannel(task.app, store, delivery.task_id)
    try:
        with delivering(delivery.request):  # seen by the run's other threads (celery_request)
            return _execute(task, delivery, store, run, channel)
    finally:
        lost = delivery.claim is not None and delivery.claim.lost
        if channel is not None and run.state is not None and run.state.is_final() and not lost:
            channel.close()


def _claim_message(task: Task, request: Any, store: RedisStore) -> Claim | None:
    """This delivery's claim on its message (see claims), held by the process's renewer until
    the delivery ends; ``None`` when another delivery handled the message.

    A message that may have been handed out before claims with a round trip, waiting for a
    live holder; a young message's first delivery takes its claim with its Running record.
    """
    ttl = float(task.app.conf.get("taskengine_claim_ttl") or CLAIM_TTL_SECONDS)
    claim = store.new_claim(str(request.id), int(request.retries or 0), ttl)
    if may_be_duplicate(task.app, request):
        if not store.take_claim(claim, poll=ttl / 10, patience=retry_patience(task.app)):
            return None
    else:  # no other delivery can exist (see message_age): no need to wait for an answer
        claim.assumed_at = time.monotonic()
    setattr(request, CLAIM, claim)  # Celery's stored result is fenced too (engine_backend)
    renewer().hold(claim)
    return claim


def _recorded_run(task: Task, request: Any, store: RedisStore) -> TaskRun:
    """Another delivery of this message wrote its outcome (its claim says done). If Celery
    stored it too, nothing is left to do (``Ignore``); if that delivery's process died in
    between, its recorded run, whose outcome Celery gets now (a value, the stored exception,
    or the recorded retry sent again; the next message's claim dedupes a second one)."""
    task_id = str(request.id)
    status = store.call(lambda: task.backend.get_state(task_id), "reading its state", task_id)
    if status in celery_states.READY_STATES or status in ("RETRY", "AWAITING_RETRY"):
        logger.info("%s: handled by another delivery of its message", request.id)
        raise Ignore()
    run = store.load_run(task_id)
    if run is None or run.state is None or not (run.state.is_final() or run.state.is_scheduled()):
        raise Ignore()
    return run


def _redelivered(request: Any) -> bool:
    return bool((request.delivery_info or {}).get("redelivered"))


def _delivery(task: Task, request: Any, store: ResultStore, claim: Claim | None) -> Delivery:
    return Delivery(
        task_id=str(request.id),
        workflow_id=_workflow_id(request),
        hostname=request.hostname,
        retries=int(request.retries or 0),
        redelivered=_redelivered(request),
        send_events=bool(task.send_events) and task_events_enabled(task.app),
        piggyback=_may_piggyback(task, request, store),
        claim=claim,
        ignores_result=bool(get_actual_ignore_result(task, request)),
        acks_late=bool(task.acks_late),
        result_follows=_result_follows(task, request),
        request=request,
    )


def _result_follows(task: Task, request: Any) -> bool:
    """Whether Celery stores the delivery's outcome as soon as it returns (see Delivery)."""
    if request.is_eager or task.acks_late or get_actual_ignore_result(task, request):
        return False
    return task.fn_kind in ("function", "coroutine")


def _workflow_id(request: Any) -> str:
    """The id RUN_ID keys use: the workflow's root id (a chain's first task); for members of a
    group or chord header that is their own id, so their group's id stands in."""
    root = request.root_id
    if root and root != request.id:
        return str(root)
    return str(request.group or request.id)


def _may_piggyback(task: Task, request: Any, store: ResultStore) -> bool:
    """Whether records may ride on Celery's next backend command (see record_channel).

    Only where that command surely follows on this thread's connection: a single-threaded
    process, a function recorded in this thread (not on the async loop), a result Celery
    stores (not ignored, not eager), on the backend the records use.
    """
    if request.is_eager or threading.current_thread() is not threading.main_thread():
        return False
    if task.fn_kind not in ("function", "generator") or get_actual_ignore_result(task, request):
        return False
    same_backend = _same_backend.get(task)
    if same_backend is None:
        same_backend = store.rides_with(task.backend)
        _same_backend[task] = same_backend
    return same_backend


#: Whether a task's backend is the one its records go to (a fork keeps both the same).
_same_backend: weakref.WeakKeyDictionary[Task, bool] = weakref.WeakKeyDictionary()


def _execute(
    task: Task,
    delivery: Delivery,
    store: ResultStore,
    run: TaskRun,
    channel: ItemChannel | None,
) -> list[Any]:
    """Run the engine on ``run`` with the runner the function needs; the items it yielded.

    For generator tasks the items are those of the last attempt (the list ``.get()`` returns);
    each one is also published to ``channel`` as it comes.
    """
    items: list[Any] = []
    publish = _publisher(channel, delivery.claim)
    observers = _observers(task, delivery, store, items)
    env = _environment(task, delivery, store, observers)
    context = {"environment": env}
    kind = task.fn_kind
    runner = runner_for(kind)
    try:
        if kind == "function":
            runner(task, task_run=run, return_type="state", context=context)
        elif kind == "coroutine":
            run_on_worker_loop(runner(task, task_run=run, return_type="state", context=context))
        elif kind == "generator":
            _drain(runner(task, task_run=run, context=context), run, publish, items)
        else:
            agenerator = runner(task, task_run=run, context=context)
            run_on_worker_loop(_drain_async(agenerator, run, publish, items))
    finally:
        observers.end(run)
    return items


def _environment(
    task: Task, delivery: Delivery, store: ResultStore, observers: RunObservers
) -> RunEnvironment:
    """Where a delivery's run executes: the store (whose cache commits are fenced by the
    delivery's claim, where it has one), its observers, retries deferred to the broker,
    revokes as cancellation."""
    if store.claims:
        claiming: Any = store
        store = claiming.fenced_by(delivery.claim)  # cache commits only while the claim holds
    return RunEnvironment(
        store=store,
        observers=observers,
        key_run_id=delivery.workflow_id,
        defer_retries=True,
        is_cancelled=revocation_check(delivery.task_id, store),
        across_processes=True,
        ends_attempt=celery_control_state,  # Reject, Ignore: Celery's, never retried
    )


def _observers(
    task: Task, delivery: Delivery, store: ResultStore, items: list[Any]
) -> RunObservers:
    """A delivery's observers: the store's (run record, claim, Celery's task meta; their
    commands for a state go out together), a generator's items reset by each attempt, and
    events for states Celery has no event for."""
    observers = [*store.worker_observers(task.app, delivery), _ItemsOfLastAttempt(items)]
    if delivery.send_events:
        observers.append(StateEvents(task.app, delivery.hostname, delivery.task_id))
    return RunObservers(observers)


class _ItemsOfLastAttempt(RunObserver):
    """A generator's items are those of its last attempt: a new attempt starts afresh."""

    __slots__ = ("items",)
    writes_batch = False

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def on_attempt(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        self.items.clear()


def _publisher(channel: ItemChannel | None, claim: Claim | None) -> Publish | None:
    """How a generator's items are published as they come: not at all once the delivery lost
    its claim (the run's new holder publishes its own)."""
    if channel is None or claim is None:
        return None if channel is None else channel.publish
    items = channel

    def publish(item: Any) -> None:
        if not claim.lost:
            items.publish(item)

    return publish


Publish = Callable[[Any], None]


def _drain(items: Iterator[Any], run: TaskRun, publish: Publish | None, out: list[Any]) -> None:
    try:
        for item in items:
            out.append(item)
            if publish is not None:
                publish(item)
    except Exception:
        if not _ended_in_failure(run):
            raise  # not the task's own failure (that one is raised from the run's state)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


async def _drain_async(
    items: AsyncIterator[Any], run: TaskRun, publish: Publish | None, out: list[Any]
) -> None:
    try:
        async for item in items:
            out.append(item)
            if publish is not None:
                publish(item)
    except Exception:
        if not _ended_in_failure(run):
            raise
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def _ended_in_failure(run: TaskRun) -> bool:
    return run.state is not None and run.state.is_final() and not run.state.is_completed()


def _outcome(task: Task, delivery: Delivery, run: TaskRun, items: list[Any]) -> Any:
    """The run's state as Celery understands it: a value, an exception, a retry, or Ignore."""
    state = run.state
    assert state is not None, "the engine always enters a state"
    if state.is_scheduled():
        retry_later(task, run)  # raises Celery's Retry
    if state.is_completed():
        return items if task.fn_kind in ("generator", "async_generator") else state.data
    if state.is_cancelled():
        _report_cancelled(task, delivery, state)
        raise Ignore()
    return state.result()  # raises the stored exception (or why there is none)


def _report_cancelled(task: Task, delivery: Delivery, state: State) -> None:
    """The engine saw a revoke between attempts: store REVOKED and announce it, as Celery does."""
    logger.info("%s: %s", delivery.task_id, state.message)
    task.backend.mark_as_revoked(delivery.task_id, "revoked", request=task.request)
    if delivery.send_events:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    task_revoked.send(task, request=task.request, terminated=False, signum=None, expired=False)
