"""``pydantic=True`` on engine tasks (Celery 5.5's option): arguments validated into their
annotated models before the engine runs, returned models dumped, cache keys over the models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel, ValidationError

from celery_taskengine import get_task_run, task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import InvalidArguments
from tests.workers import embedded_worker


@pytest.fixture
def app() -> Celery:
    return Celery("pydantic-local", set_as_current=False)  # no backend: runs stay here


class Item(BaseModel):
    sku: str
    qty: int = 1


class Receipt(BaseModel):
    sku: str
    total: int


def test_a_local_call_validates_arguments_and_dumps_the_returned_model(app: Celery) -> None:
    seen: list[Any] = []

    @task(app=app, pydantic=True)
    def price(item: Item, unit: int) -> Receipt:
        seen.append(item)
        return Receipt(sku=item.sku, total=item.qty * unit)

    assert price({"sku": "a", "qty": "3"}, 5) == {"sku": "a", "total": 15}
    assert price(Item(sku="b"), 2) == {"sku": "b", "total": 2}
    assert seen == [Item(sku="a", qty=3), Item(sku="b", qty=1)]


def test_an_invalid_argument_fails_the_run_once_without_calling_or_retrying(app: Celery) -> None:
    calls: list[Any] = []

    @task(app=app, pydantic=True, retries=3, retry_delay_seconds=0)
    def ship(item: Item) -> str:
        calls.append(item)
        return "shipped"

    state = ship({"sku": "a", "qty": "many"}, return_state=True)
    assert state.is_failed() and calls == []
    assert "1 validation error for Item" in (state.message or "")
    with pytest.raises(InvalidArguments) as raised:
        state.result()
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value.__cause__, ValidationError)
    with pytest.raises(InvalidArguments, match="sku"):
        ship({"qty": 2})


def test_pydantic_strict_refuses_what_lax_mode_converts(app: Celery) -> None:
    @task(app=app, pydantic=True, pydantic_strict=True)
    def strict(item: Item) -> int:
        return item.qty

    with pytest.raises(InvalidArguments):
        strict({"sku": "a", "qty": "3"})
    assert strict({"sku": "a", "qty": 3}) == 3


def test_delay_refuses_invalid_arguments_before_publishing(redis_app: Celery) -> None:
    @task(app=redis_app, pydantic=True)
    def ship(item: Item) -> str:
        return "shipped"

    with pytest.raises(ValidationError, match="sku"):
        ship.delay({"qty": 2})


@pytest.fixture
def pydantic_app(redis_app_factory: Callable[..., Celery]) -> Celery:
    return redis_app_factory()


def test_in_a_worker_models_travel_as_json_and_come_back_dumped(pydantic_app: Celery) -> None:
    app = pydantic_app
    received: list[Any] = []

    @task(app=app, name="pyd.price", pydantic=True)
    def price(item: Item, unit: int) -> Receipt:
        received.append(item)
        return Receipt(sku=item.sku, total=item.qty * unit)

    with embedded_worker(app, pool="threads", concurrency=2):
        # a model passed to .delay() is sent as its JSON dump and validated back in the worker
        assert price.delay(Item(sku="a", qty=2), 5).get(timeout=20) == {"sku": "a", "total": 10}
        assert price.delay({"sku": "b"}, unit=3).get(timeout=20) == {"sku": "b", "total": 3}
    assert received == [Item(sku="a", qty=2), Item(sku="b", qty=1)]


def test_in_a_worker_an_invalid_argument_is_a_failed_run_never_retried(
    pydantic_app: Celery,
) -> None:
    app = pydantic_app
    calls: list[Any] = []

    @task(app=app, name="pyd.ship", pydantic=True, retries=2, retry_delay_seconds=1)
    def ship(item: Item) -> str:
        calls.append(item)
        return "shipped"

    with embedded_worker(app, pool="threads", concurrency=1):
        # by name, .delay()'s check does not run: the worker's does
        result = app.send_task("pyd.ship", args=[{"sku": "a", "qty": "many"}])
        with pytest.raises(InvalidArguments, match="validation error for Item") as raised:
            result.get(timeout=20)
    assert "qty" in str(raised.value) and calls == []
    run = get_task_run(result.id, app=app)
    assert run is not None and run.history_names() == ["Pending", "Running", "Failed"]
    assert run.run_count == 1


def test_cache_keys_hash_the_validated_models(pydantic_app: Celery) -> None:
    app = pydantic_app
    calls: list[Item] = []

    @task(app=app, name="pyd.cached", pydantic=True, cache_policy=INPUTS)
    def reserve(item: Item) -> int:
        calls.append(item)
        return item.qty

    with embedded_worker(app, pool="threads", concurrency=1):
        first = reserve.delay({"sku": "a", "qty": 1})
        assert first.get(timeout=20) == 1
        # the same model however it is written: a default left out, a model, a string number
        for same in ({"sku": "a"}, Item(sku="a"), {"sku": "a", "qty": "1"}):
            again = reserve.delay(same)
            assert again.get(timeout=20) == 1
            run = get_task_run(again.id, app=app)
            assert run is not None and run.state is not None and run.state.name == "Cached"
        assert reserve.delay({"sku": "a", "qty": 2}).get(timeout=20) == 2
    assert calls == [Item(sku="a", qty=1), Item(sku="a", qty=2)]
