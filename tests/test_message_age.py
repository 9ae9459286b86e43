"""Which deliveries may be duplicates: retries, redeliveries, countdowns and old messages."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery, current_task
from celery.app.task import Context

from celery_taskengine import task
from celery_taskengine._celery.message_age import SENT_AT_HEADER, may_be_duplicate
from tests.workers import embedded_worker

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("broker", "age", "expected"),
    [
        ("redis://localhost/0", 0.0, False),
        ("redis://localhost/0", 50.0, True),  # past half the visibility timeout
        ("redis://localhost/0", None, True),  # no send time: sent by send_task
        ("redis+socket:///tmp/redis.sock", 50.0, True),
        ("amqp://localhost//", 5000.0, False),  # acknowledgements are real
    ],
)
def test_an_old_message_claims_with_a_round_trip_even_on_its_first_delivery(
    broker: str, age: float | None, expected: bool
) -> None:
    app = Celery("ages", broker=broker, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    headers = {} if age is None else {SENT_AT_HEADER: time.time() - age}
    request = Context(id="t", retries=0, delivery_info={}, eta=None, is_eager=False, **headers)

    assert may_be_duplicate(app, request) is expected


def test_a_message_carries_the_time_it_was_sent_to_the_worker(redis_app: Celery) -> None:
    @task(app=redis_app, name="claims.sent_at")
    def sent_at() -> Any:
        request = current_task.request
        return [getattr(request, SENT_AT_HEADER, None), may_be_duplicate(redis_app, request)]

    before = time.time()
    with embedded_worker(redis_app):
        stamp, duplicate = sent_at.delay().get(timeout=10)

    assert before <= stamp <= time.time()
    assert duplicate is False  # so it took its claim with its Running record


@pytest.mark.parametrize(
    "request_fields",
    [{"retries": 1}, {"delivery_info": {"redelivered": True}}, {"eta": "2026-01-01T00:00:00"}],
    ids=["retry", "redelivered", "countdown"],
)
def test_a_retry_a_redelivery_or_a_countdown_may_be_a_duplicate_whatever_its_age(
    request_fields: dict[str, Any],
) -> None:
    app = Celery("ages", broker="amqp://localhost//", set_as_current=False)
    fields = {"retries": 0, "delivery_info": {}, "eta": None, "is_eager": False, **request_fields}
    request = Context(id="t", **fields, **{SENT_AT_HEADER: time.time()})

    assert may_be_duplicate(app, request)
