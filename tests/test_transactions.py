"""Transactions (SPEC §6): commit and rollback hooks, nesting, commit modes, on a real Redis.

Tasks belong to a Celery app whose result backend is a private Redis database; user
transactions get that app's store explicitly, so what is (or is not) written is read back from
Redis itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import pytest

from celery_taskengine import task, transaction
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.states import Completed, Failed, State
from celery_taskengine.transactions import (
    AsyncTransaction,
    CommitMode,
    Transaction,
    TransactionState,
    get_transaction,
)


@pytest.fixture
def store(redis_app: Any) -> RedisStore:
    chosen = store_for_app(redis_app)
    assert isinstance(chosen, RedisStore)
    return chosen


def keyed(name: str) -> Callable[[Any, dict[str, Any]], str]:
    """A ``cache_key_fn`` giving the readable key ``<name>-<x>``."""
    return lambda context, parameters: f"{name}-{parameters['x']}"


def value_of(store: RedisStore, key: str) -> Any:
    """The value committed under ``key``; fails the test if there is none."""
    record = store.read(key)
    assert record is not None, f"nothing committed under {key!r}"
    return record.value


def call(t: Any, *args: Any, **kwargs: Any) -> Any:
    """``t(...)`` for sync and async tasks alike."""
    result = t(*args, **kwargs)
    return asyncio.run(result) if inspect.iscoroutine(result) else result


# -- commit hooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_hooks_run_in_the_same_order_for_sync_and_async_tasks(
    redis_app: Any, store: RedisStore, kind: str
) -> None:
    events: list[str] = []

    def on_running(t: Any, run: Any, state: State) -> None:
        events.append(f"on_running:{state.name}")

    def first_commit(txn: Transaction) -> None:
        events.append(f"on_commit:1:written={store.read(txn.key or '') is not None}")

    async def second_commit(txn: Transaction) -> None:
        events.append(f"on_commit:2:written={store.read(txn.key or '') is not None}")

    def on_completion(t: Any, run: Any, state: State) -> None:
        written = store.read("ordered-1") is not None
        events.append(f"on_completion:{state.name}:written={written}")

    options: dict[str, Any] = {
        "app": redis_app,
        "cache_key_fn": keyed("ordered"),
        "on_running": [on_running],
        "on_commit": [first_commit, second_commit],
        "on_completion": [on_completion],
        "name": f"tests.ordered.{kind}",
    }
    if kind == "sync":

        @task(**options)
        def work(x: int) -> int:
            events.append("fn")
            return x

    else:

        @task(**options)
        async def work(x: int) -> int:
            events.append("fn")
            return x

    assert call(work, 1) == 1
    assert call(work, 1) == 1

    assert events == [
        "on_running:Running",
        "fn",
        "on_commit:1:written=False",
        "on_commit:2:written=False",
        "on_completion:Completed:written=True",
        # the cache hit: no function call, no commit hooks
        "on_running:Running",
        "on_completion:Cached:written=True",
    ]


def test_commit_hooks_run_even_when_nothing_is_persisted(redis_app: Any) -> None:
    committed: list[str | None] = []

    @task(app=redis_app, on_commit=[lambda txn: committed.append(txn.key)])
    def plain(x: int) -> int:
        return x

    plain(1)
    plain(1)

    assert committed == [None, None]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_commit_hooks_do_not_run_for_raised_failures(redis_app: Any, kind: str) -> None:
    hooks: list[str] = []
    options: dict[str, Any] = {
        "app": redis_app,
        "cache_policy": INPUTS,
        "on_commit": [lambda txn: hooks.append("commit")],
        "on_rollback": [lambda txn: hooks.append("rollback")],
    }
    if kind == "sync":

        @task(**options)
        def broken(x: int) -> int:
            raise ValueError("broken")

    else:

        @task(**options)
        async def broken(x: int) -> int:
            raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        call(broken, 1)

    assert hooks == []  # the function raised before anything was staged


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_returned_failed_state_runs_rollback_hooks_in_reverse_and_no_commit_hooks(
    redis_app: Any, store: RedisStore, kind: str
) -> None:
    hooks: list[str] = []
    options: dict[str, Any] = {
        "app": redis_app,
        "cache_key_fn": keyed("refused"),
        "on_commit": [lambda txn: hooks.append("commit")],
        "on_rollback": [
            lambda txn: hooks.append("rollback:1"),
            lambda txn: hooks.append("rollback:2"),
        ],
    }
    if kind == "sync":

        @task(**options)
        def refuse(x: int) -> State:
            return Failed(message="refused")

    else:

        @task(**options)
        async def refuse(x: int) -> State:
            return Failed(message="refused")

    state = call(refuse, 1, return_state=True)

    assert state.name == "Failed"
    assert hooks == ["rollback:2", "rollback:1"]
    assert store.read("refused-1") is None


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_unserialisable_result_rolls_back_and_is_still_returned(
    redis_app: Any, store: RedisStore, kind: str
) -> None:
    hooks: list[str] = []
    options: dict[str, Any] = {
        "app": redis_app,
        "cache_key_fn": keyed("members"),
        "on_commit": [lambda txn: hooks.append("commit")],
        "on_rollback": [
            lambda txn: hooks.append("rollback:1"),
            lambda txn: hooks.append("rollback:2"),
        ],
    }
    if kind == "sync":

        @task(**options)
        def members(x: int) -> set[int]:
            return {x}

    else:

        @task(**options)
        async def members(x: int) -> set[int]:
            return {x}

    state = call(members, 1, return_state=True)

    assert (state.name, state.data) == ("Completed", {1})
    assert hooks == ["commit", "rollback:2", "rollback:1"]
    assert store.read("members-1") is None


def test_commit_hooks_run_once_for_a_run_that_succeeds_on_retry(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []
    attempts: list[int] = []

    @task(
        app=redis_app,
        cache_key_fn=keyed("retried"),
        retries=2,
        on_commit=[lambda txn: hooks.append("commit")],
        on_rollback=[lambda txn: hooks.append("rollback")],
    )
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise ConnectionError("first attempt fails")
        return x

    assert flaky(1) == 1

    assert len(attempts) == 2
    assert hooks == ["commit"]
    assert value_of(store, "retried-1") == 1


def test_a_raising_commit_hook_skips_the_write_and_rolls_back_but_the_task_completes(
    redis_app: Any, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    hooks: list[str] = []

    def explode(txn: Transaction) -> None:
        hooks.append("commit:explode")
        raise RuntimeError("commit hook failed")

    @task(
        app=redis_app,
        cache_key_fn=keyed("guarded"),
        on_commit=[explode, lambda txn: hooks.append("commit:skipped")],
        on_rollback=[lambda txn: hooks.append("rollback")],
        on_completion=[lambda t, run, state: hooks.append(f"completion:{state.name}")],
    )
    def guarded(x: int) -> dict[str, int]:
        return {"x": x}

    with caplog.at_level(logging.ERROR, logger="celery_taskengine"):
        state = guarded(1, return_state=True)

    assert (state.name, state.data) == ("Completed", {"x": 1})
    assert hooks == ["commit:explode", "rollback", "completion:Completed"]
    assert store.read("guarded-1") is None
    assert any("explode" in r.getMessage() for r in caplog.records)
    assert guarded(1, return_state=True).name == "Completed"  # nothing was cached


def test_a_raising_rollback_hook_is_logged_and_the_others_still_run(
    redis_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hooks: list[str] = []

    def explode(txn: Transaction) -> None:
        raise RuntimeError("rollback hook failed")

    @task(
        app=redis_app,
        cache_policy=INPUTS,
        on_rollback=[lambda txn: hooks.append("first"), explode],
    )
    def refuse(x: int) -> State:
        return Failed(message="refused")

    with caplog.at_level(logging.ERROR, logger="celery_taskengine"):
        assert refuse(1, return_state=True).name == "Failed"

    assert hooks == ["first"]
    assert any("explode" in r.getMessage() for r in caplog.records)


def test_values_set_on_transactions_are_visible_to_hooks(redis_app: Any, store: RedisStore) -> None:
    seen: dict[str, Any] = {}

    def on_commit(txn: Transaction) -> None:
        seen["from_task"] = txn.get("row_id")
        seen["from_enclosing"] = txn.get("batch")
        seen["missing"] = txn.get("nothing", "default")

    @task(app=redis_app, cache_key_fn=keyed("insert"), on_commit=[on_commit])
    def insert(x: int) -> int:
        current = get_transaction()
        assert current is not None and current.key == f"insert-{x}"
        current.set("row_id", 100 + x)
        return x

    with transaction(store=store) as outer:
        outer.set("batch", "b-1")
        insert(1)

    assert seen == {"from_task": 101, "from_enclosing": "b-1", "missing": "default"}


# -- nesting ---------------------------------------------------------------------------------


def call_in_a_thread(fn: Callable[[], Any]) -> Any:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=30)


@pytest.mark.parametrize(
    ("outer_options", "caller"),
    [
        ({}, lambda fn: fn()),
        ({"timeout_seconds": 30}, lambda fn: fn()),  # SIGALRM on the main thread
        ({"timeout_seconds": 30}, call_in_a_thread),  # a helper thread, as in a threads pool
    ],
    ids=["plain", "timeout-main-thread", "timeout-other-thread"],
)
def test_an_inner_task_inside_an_outer_task_writes_when_the_outer_commits(
    redis_app: Any,
    store: RedisStore,
    outer_options: dict[str, Any],
    caller: Callable[[Callable[[], Any]], Any],
) -> None:
    inner_calls: list[int] = []
    observed: dict[str, Any] = {}

    @task(app=redis_app, cache_key_fn=keyed("inner"))
    def inner(x: int) -> int:
        inner_calls.append(x)
        return x * 2

    @task(app=redis_app, **outer_options)
    def outer(x: int) -> list[str]:
        names = [inner(x, return_state=True).name for _ in range(2)]
        observed["written_inside"] = store.read(f"inner-{x}") is not None
        return names

    assert caller(lambda: outer(3)) == ["Completed", "Completed"]
    assert observed == {"written_inside": False}
    assert inner_calls == [3, 3]
    record = store.read("inner-3")
    assert record is not None and record.value == 6


def test_an_eager_transaction_commits_an_inner_task_at_once(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_key_fn=keyed("eager"))
    def inner(x: int) -> int:
        return x + 1

    with transaction(store=store, commit_mode=CommitMode.EAGER):
        names = [inner(1, return_state=True).name for _ in range(2)]
        written_inside = store.read("eager-1") is not None

    assert names == ["Completed", "Cached"]
    assert written_inside


def test_a_lazy_transaction_writes_its_tasks_results_when_it_commits(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_key_fn=keyed("lazy"))
    def inner(x: int) -> int:
        return x + 1

    with transaction(store=store) as txn:
        names = [inner(1, return_state=True).name for _ in range(2)]
        written_inside = store.read("lazy-1") is not None

    assert names == ["Completed", "Completed"]
    assert not written_inside
    assert txn.is_committed()
    assert store.read("lazy-1") is not None


def test_a_commit_mode_off_transaction_rolls_its_tasks_back(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []

    @task(app=redis_app, cache_key_fn=keyed("off"), on_rollback=[lambda txn: hooks.append("rb")])
    def inner(x: int) -> int:
        return x

    with transaction(store=store, commit_mode=CommitMode.OFF) as txn:
        inner(1)

    assert txn.is_rolled_back()
    assert hooks == ["rb"]
    assert store.read("off-1") is None


def rollback_by_raising(txn: Transaction) -> None:
    raise RuntimeError("abort the batch")


def rollback_by_calling(txn: Transaction) -> None:
    txn.rollback()


@pytest.mark.parametrize("abort", [rollback_by_raising, rollback_by_calling])
def test_rolling_back_an_enclosing_transaction_rolls_back_its_tasks(
    redis_app: Any, store: RedisStore, abort: Callable[[Transaction], None]
) -> None:
    hooks: list[str] = []

    def hook(name: str) -> Callable[[Transaction], None]:
        return lambda txn: hooks.append(f"{name}:{txn.key}")

    @task(
        app=redis_app,
        cache_key_fn=keyed("step"),
        on_commit=[hook("commit")],
        on_rollback=[hook("rollback:a"), hook("rollback:b")],
    )
    def step(x: int) -> int:
        return x

    raising = abort is rollback_by_raising
    expectation = pytest.raises(RuntimeError, match="abort") if raising else nullcontext()
    with expectation, transaction(store=store) as txn:
        step(1)
        step(2)
        abort(txn)

    assert txn.is_rolled_back()
    assert hooks == [
        "rollback:b:step-2",
        "rollback:a:step-2",
        "rollback:b:step-1",
        "rollback:a:step-1",
    ]
    assert store.iter_keys() == []


def test_a_task_in_a_rolled_back_transaction_keeps_its_completed_state(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_key_fn=keyed("kept"))
    def step(x: int) -> int:
        return x

    with transaction(store=store) as txn:
        state = step(1, return_state=True)
        txn.rollback()

    assert state.name == "Completed"
    assert state.data == 1


def test_a_failing_inner_task_does_not_roll_back_its_caller(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_key_fn=keyed("fails"))
    def fails(x: int) -> int:
        raise ValueError("inner failure")

    @task(app=redis_app, cache_key_fn=keyed("ok"))
    def ok(x: int) -> int:
        return x

    with transaction(store=store) as txn:
        ok(1)
        with pytest.raises(ValueError):
            fails(1)

    assert txn.is_committed()
    assert store.iter_keys() == ["ok-1"]


def test_a_nested_transaction_is_a_child_of_the_enclosing_one(store: RedisStore) -> None:
    with transaction("outer-key", store=store) as outer:
        with transaction("inner-key") as inner:
            inner.stage("inner value")
        assert inner.parent is outer
        assert inner.store is store
        assert store.read("inner-key") is None
        outer.stage("outer value")

    assert outer.is_committed() and inner.is_committed()
    assert [value_of(store, k) for k in ("inner-key", "outer-key")] == [
        "inner value",
        "outer value",
    ]


def test_a_transaction_finding_a_committed_record_is_committed_from_the_start(
    store: RedisStore,
) -> None:
    store.write("known", {"v": 1}, serializer="json", expires_in=None)

    with transaction("known", store=store) as txn:
        assert txn.is_committed()
        assert txn.read() == {"v": 1}
        txn.stage({"v": 2})  # ignored: the key is already committed

    assert value_of(store, "known") == {"v": 1}


def test_an_overwriting_transaction_replaces_the_record(store: RedisStore) -> None:
    store.write("known", "old", serializer="json", expires_in=None)

    with transaction("known", store=store, overwrite=True) as txn:
        assert not txn.is_committed()
        txn.stage("new")

    assert value_of(store, "known") == "new"


def test_transaction_state_moves_through_its_lifecycle(store: RedisStore) -> None:
    txn = transaction("life", store=store)
    assert txn.state is TransactionState.PENDING
    with txn:
        assert txn.is_active() and not txn.is_staged()
        txn.stage(1)
        assert txn.is_staged()
    assert txn.is_committed()
    assert get_transaction() is None


# -- async transactions ----------------------------------------------------------------------


def test_async_with_transaction_nests_async_tasks_lazily(redis_app: Any, store: RedisStore) -> None:
    hooks: list[str] = []

    @task(
        app=redis_app,
        cache_key_fn=keyed("async-inner"),
        on_commit=[lambda txn: hooks.append("commit")],
    )
    async def inner(x: int) -> int:
        await asyncio.sleep(0)
        return x * 3

    async def scenario() -> tuple[list[str], bool, AsyncTransaction]:
        async with transaction(store=store) as txn:
            names = [(await inner(2, return_state=True)).name for _ in range(2)]
            written_inside = store.read("async-inner-2") is not None
        return names, written_inside, txn

    names, written_inside, txn = asyncio.run(scenario())

    assert names == ["Completed", "Completed"]
    assert not written_inside
    assert txn.is_committed()
    assert hooks == ["commit", "commit"]
    assert value_of(store, "async-inner-2") == 6


def test_an_eager_async_transaction_gives_completed_then_cached(
    redis_app: Any, store: RedisStore
) -> None:
    @task(app=redis_app, cache_key_fn=keyed("async-eager"))
    async def inner(x: int) -> int:
        return x

    async def scenario() -> list[str]:
        async with transaction(store=store, commit_mode=CommitMode.EAGER):
            return [(await inner(1, return_state=True)).name for _ in range(2)]

    assert asyncio.run(scenario()) == ["Completed", "Cached"]


def test_rolling_back_an_async_transaction_awaits_async_rollback_hooks(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []

    async def undo(txn: Transaction) -> None:
        await asyncio.sleep(0)
        hooks.append(f"undo:{txn.key}")

    @task(app=redis_app, cache_key_fn=keyed("async-undo"), on_rollback=[undo])
    async def step(x: int) -> int:
        return x

    async def scenario() -> None:
        async with transaction(store=store):
            await step(1)
            await step(2)
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        asyncio.run(scenario())

    assert hooks == ["undo:async-undo-2", "undo:async-undo-1"]
    assert store.iter_keys() == []


def test_an_async_transaction_commits_and_rolls_back_explicitly(store: RedisStore) -> None:
    hooks: list[str] = []

    async def scenario() -> tuple[bool, bool]:
        first = transaction("explicit-1", store=store)
        async with first:
            first.stage("one", on_commit=[lambda txn: hooks.append("commit")])
            committed = await first.acommit()
        second = transaction("explicit-2", store=store)
        async with second:
            second.stage("two", on_rollback=[lambda txn: hooks.append("rollback")])
            rolled_back = await second.arollback()
        return committed, rolled_back

    assert asyncio.run(scenario()) == (True, True)
    assert hooks == ["commit", "rollback"]
    assert store.iter_keys() == ["explicit-1"]


def test_a_returned_completed_state_is_committed(redis_app: Any, store: RedisStore) -> None:
    @task(app=redis_app, cache_key_fn=keyed("state"))
    def reports(x: int) -> State:
        return Completed(data=x)

    reports(4)

    assert value_of(store, "state-4") == 4


def test_a_child_that_cannot_be_written_rolls_back_the_enclosing_transaction(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []

    def undo(txn: Transaction) -> None:
        hooks.append(f"undo:{txn.key}")

    @task(app=redis_app, cache_key_fn=keyed("row"), on_rollback=[undo])
    def row(x: int) -> Any:
        return {x} if x == 2 else x  # a set cannot be written with JSON

    with transaction(store=store) as txn:
        row(1)
        row(2)
        row(3)
        txn.stage(None, on_commit=[lambda txn: hooks.append("outer-commit")])

    assert txn.is_rolled_back()
    assert hooks == ["undo:row-2", "undo:row-3"]  # row-1 was already written
    assert store.iter_keys() == ["row-1"]


def test_an_outer_task_that_raises_rolls_back_the_tasks_it_called(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []

    @task(
        app=redis_app,
        cache_key_fn=keyed("called"),
        on_rollback=[lambda txn: hooks.append(f"undo:{txn.key}")],
    )
    def called(x: int) -> int:
        return x

    @task(app=redis_app)
    def caller() -> None:
        called(1)
        raise RuntimeError("caller failed after its callee completed")

    state = caller(return_state=True)

    assert state.name == "Failed"
    assert hooks == ["undo:called-1"]
    assert store.iter_keys() == []


def test_an_outer_task_returning_a_failed_state_rolls_back_the_tasks_it_called(
    redis_app: Any, store: RedisStore
) -> None:
    hooks: list[str] = []

    @task(
        app=redis_app,
        cache_key_fn=keyed("callee"),
        on_rollback=[lambda txn: hooks.append(f"undo:{txn.key}")],
    )
    def callee(x: int) -> int:
        return x

    @task(app=redis_app, on_rollback=[lambda txn: hooks.append("undo:caller")])
    def caller() -> State:
        callee(1)
        return Failed(message="the caller gives up")

    assert caller(return_state=True).name == "Failed"
    assert hooks == ["undo:caller", "undo:callee-1"]
    assert store.iter_keys() == []


def test_transaction_without_a_store_uses_the_current_apps_backend(
    redis_app: Any, store: RedisStore
) -> None:
    from celery import current_app

    previous = current_app._get_current_object()
    redis_app.set_current()
    try:
        with transaction("on-the-current-app") as txn:
            txn.stage("value")
    finally:
        previous.set_current()

    assert txn.store is store
    assert value_of(store, "on-the-current-app") == "value"
