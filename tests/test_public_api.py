"""The public API (SPEC §1): names users import, reference signatures and method names."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import pytest

import celery_taskengine
from celery_taskengine import task
from celery_taskengine.task_engine import AsyncTaskRunEngine, BaseTaskRunEngine, SyncTaskRunEngine

#: SPEC §1's import block, module by module. ``stream`` comes with the Celery bridge and is
#: checked on its own below, so that this list holds while the bridge is being built.
SPEC_IMPORTS: dict[str, list[str]] = {
    "celery_taskengine": [
        "task",
        "Task",
        "get_task_run",
        "transaction",
        "exponential_backoff",
        "current_task_run",
        "shared_task",
    ],
    "celery_taskengine.task_engine": [
        "run_task",
        "run_task_sync",
        "run_task_async",
        "run_generator_task_sync",
        "run_generator_task_async",
        "BaseTaskRunEngine",
        "SyncTaskRunEngine",
        "AsyncTaskRunEngine",
        "TaskRunTimeoutError",
    ],
    "celery_taskengine.states": [
        "State",
        "StateType",
        "Pending",
        "Running",
        "Completed",
        "Failed",
        "Crashed",
        "Cancelled",
        "Scheduled",
        "AwaitingRetry",
        "Retrying",
        "TimedOut",
        "Cached",
    ],
    "celery_taskengine.cache_policies": [
        "CachePolicy",
        "INPUTS",
        "TASK_SOURCE",
        "RUN_ID",
        "NO_CACHE",
        "DEFAULT",
    ],
    "celery_taskengine.transactions": [
        "Transaction",
        "AsyncTransaction",
        "IsolationLevel",
        "CommitMode",
    ],
    "celery_taskengine.errors": [
        "TaskEngineError",
        "ConfigurationError",
        "ReservedArgumentError",
        "FailedRun",
        "CrashedRun",
        "CancelledRun",
        "UnfinishedRun",
    ],
}

ENGINE_METHODS = [
    "asset_context",
    "begin_run",
    "call_hooks",
    "call_task_fn",
    "can_retry",
    "client",
    "handle_crash",
    "handle_exception",
    "handle_retry",
    "handle_success",
    "handle_timeout",
    "initialize_run",
    "result",
    "run_context",
    "set_state",
    "setup_run_context",
    "start",
    "transaction_context",
    "wait_until_ready",
]

BASE_METHODS = [
    "compute_transaction_key",
    "handle_rollback",
    "is_cancelled",
    "is_running",
    "log_finished_message",
    "record_terminal_state_timing",
    "state",
]

RUNNERS = [
    "run_task",
    "run_task_sync",
    "run_task_async",
    "run_generator_task_sync",
    "run_generator_task_async",
]

REFERENCE_SIGNATURE = [
    ("task", inspect.Parameter.empty),
    ("task_run_id", None),
    ("task_run", None),
    ("parameters", None),
    ("wait_for", None),
    ("return_type", "result"),
    ("dependencies", None),
    ("context", None),
]


def isort_order(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


# --- the package ----------------------------------------------------------------------------


def test_the_package_all_is_sorted_and_every_name_exists() -> None:
    names = celery_taskengine.__all__

    assert names == sorted(names, key=isort_order)
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(celery_taskengine, name), name


@pytest.mark.parametrize("module", sorted(SPEC_IMPORTS))
def test_every_name_of_the_spec_import_block_is_importable(module: str) -> None:
    imported = importlib.import_module(module)

    missing = [name for name in SPEC_IMPORTS[module] if not hasattr(imported, name)]
    assert missing == []


def test_the_spec_import_block_runs_verbatim_apart_from_stream() -> None:
    namespace: dict[str, Any] = {}
    exec(
        "from celery_taskengine import (task, Task, get_task_run, transaction,\n"
        "    exponential_backoff)\n"
        "from celery_taskengine.task_engine import (run_task, run_task_sync, run_task_async,\n"
        "    run_generator_task_sync, run_generator_task_async, BaseTaskRunEngine,\n"
        "    SyncTaskRunEngine, AsyncTaskRunEngine, TaskRunTimeoutError)\n"
        "from celery_taskengine.states import (State, StateType, Pending, Running, Completed,\n"
        "    Failed, Crashed, Cancelled, Scheduled, AwaitingRetry, Retrying, TimedOut, Cached)\n"
        "from celery_taskengine.cache_policies import (CachePolicy, INPUTS, TASK_SOURCE,\n"
        "    RUN_ID, NO_CACHE, DEFAULT)\n"
        "from celery_taskengine.transactions import (Transaction, AsyncTransaction,\n"
        "    IsolationLevel, CommitMode)\n",
        namespace,
    )

    assert namespace["TaskRunTimeoutError"] is celery_taskengine.TaskRunTimeoutError
    assert issubclass(namespace["TaskRunTimeoutError"], TimeoutError)


def test_stream_is_exported_once_the_bridge_provides_it() -> None:
    stream = getattr(celery_taskengine, "stream", None)
    if stream is None:
        pytest.skip("celery_taskengine.stream is added with the Celery bridge")
    assert callable(stream)
    assert "stream" in celery_taskengine.__all__


def test_current_task_run_is_the_live_run_inside_a_run_and_none_outside() -> None:
    seen: list[Any] = []

    @task
    def inside() -> None:
        run = celery_taskengine.current_task_run()
        seen.extend([run, run.state_name if run is not None else None])

    state = inside(return_state=True)

    assert celery_taskengine.current_task_run() is None
    assert seen[0] is not None and seen[1] == "Running"
    assert celery_taskengine.get_task_run(seen[0].id).state == state
    assert celery_taskengine.shared_task is celery_taskengine.task


@pytest.mark.parametrize(
    "module",
    [
        "celery_taskengine.states",
        "celery_taskengine.task_engine",
        "celery_taskengine.transactions",
        "celery_taskengine._celery.options",
        "celery_taskengine._engine.retry_policy",
        "celery_taskengine._engine.timeouts",
        "celery_taskengine._engine.parameters",
        "celery_taskengine._engine.run_scope",
        "celery_taskengine._engine.run_core",
        "celery_taskengine._engine.drivers",
        "celery_taskengine._celery.task",
        "celery_taskengine._celery.celery_retries",
        "celery_taskengine._celery.celery_request",
        "celery_taskengine._celery.shared_tasks",
    ],
)
def test_each_engine_module_exports_only_names_it_has(module: str) -> None:
    imported = importlib.import_module(module)

    assert all(hasattr(imported, name) for name in imported.__all__)


# --- the engine classes ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", [SyncTaskRunEngine, AsyncTaskRunEngine])
@pytest.mark.parametrize("method", ENGINE_METHODS + BASE_METHODS)
def test_both_engines_have_the_reference_methods(engine: type, method: str) -> None:
    assert issubclass(engine, BaseTaskRunEngine)
    assert hasattr(engine, method)


@pytest.mark.parametrize("method", BASE_METHODS)
def test_the_base_engine_has_the_shared_methods(method: str) -> None:
    assert hasattr(BaseTaskRunEngine, method)


@pytest.mark.parametrize("method", [m for m in ENGINE_METHODS if m not in ("client", "result")])
def test_the_async_engine_methods_are_async(method: str) -> None:
    attribute = getattr(AsyncTaskRunEngine, method)
    # An async context manager factory is a plain function that wraps an async generator.
    target = inspect.unwrap(attribute)
    assert inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target)


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_runners_have_the_reference_signature(runner: str) -> None:
    from celery_taskengine import task_engine

    signature = inspect.signature(getattr(task_engine, runner))

    assert [(p.name, p.default) for p in signature.parameters.values()] == REFERENCE_SIGNATURE
    assert all(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()
    )


def test_the_engine_client_before_start_raises() -> None:
    @task
    def idle() -> None:
        return None

    with pytest.raises(RuntimeError, match=r"^Engine has not started\.$"):
        _ = SyncTaskRunEngine(idle, {}).client
    with pytest.raises(RuntimeError, match=r"^Engine has not started\.$"):
        _ = AsyncTaskRunEngine(idle, {}).client


def test_the_engine_client_after_a_run_is_the_store() -> None:
    @task
    def idle() -> None:
        return None

    @task
    async def idle_async() -> None:
        return None

    sync_engine = SyncTaskRunEngine(idle, {})
    sync_engine.run()
    async_engine = AsyncTaskRunEngine(idle_async, {}, is_async=True)
    asyncio.run(async_engine.run())

    assert sync_engine.client is not None
    assert async_engine.client is not None


def test_the_engine_shells_drive_a_run_step_by_step() -> None:
    # Given an engine used through the reference's method names, not run()
    @task
    def add(x: int, y: int) -> int:
        return x + y

    engine = SyncTaskRunEngine(add, {"x": 1, "y": 2})

    # When the run is started and the function called inside a transaction
    with engine.start():
        assert engine.is_running()
        with engine.run_context(), engine.transaction_context() as txn:
            engine.call_task_fn(txn)

    # Then the engine ends Completed with the value
    assert engine.state.name == "Completed"
    assert engine.result() == 3
    assert engine.task_run.history_names() == ["Pending", "Running", "Completed"]
