"""Store operations wait out a Redis outage for the backend's retry policy, then give up.

The policy itself is checked with a stand-in operation (no Redis, no real waiting beyond the
backoff's first steps); the store against a private redis-server that is stopped and started
again while an operation waits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.retrying import Patience, patience_from_policy
from celery_taskengine.errors import StoreUnavailableError
from tests.reliability.harness import redis_server

pytestmark = pytest.mark.timeout(60)


class Flaky:
    """An operation that fails with ``error`` its first ``failures`` calls."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answered"


def test_an_outage_shorter_than_the_patience_is_waited_out_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    operation = Flaky(3, redis.exceptions.ConnectionError("refused"))

    with caplog.at_level(logging.WARNING, logger="celery_taskengine._store.retrying"):
        value = Patience(5.0, 0.2).call(operation, what="loading its run", run_id="run-1")

    assert value == "answered"
    assert operation.calls == 4
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert unreachable[0].getMessage().startswith("run-1: ")


def test_an_outage_longer_than_the_patience_raises_the_outage_error() -> None:
    operation = Flaky(10_000, redis.exceptions.TimeoutError("timed out"))

    with pytest.raises(redis.exceptions.TimeoutError):
        Patience(0.3, 0.1).call(operation, what="a read")
    assert operation.calls > 2  # it did retry, with backoff, until the patience was spent


def test_an_error_redis_answers_is_not_an_outage_and_is_not_retried() -> None:
    operation = Flaky(1, redis.exceptions.ResponseError("OOM command not allowed"))

    with pytest.raises(redis.exceptions.ResponseError):
        Patience(5.0).call(operation, what="a write")
    assert operation.calls == 1


def test_patience_follows_celerys_backend_retry_policy() -> None:
    assert patience_from_policy(None) == Patience(20.0, 1.0)
    assert patience_from_policy({"max_retries": 3, "interval_max": 0.5}) == Patience(1.5, 0.5)
    # Celery retries for ever: the engine waits as long as Celery's default, then hands back
    assert patience_from_policy({"max_retries": None}).seconds == 20.0


@pytest.mark.parametrize(
    "operation",
    ["load_run", "acquire_lock", "lock_holder", "read", "write"],
)
def test_store_operations_wait_out_a_redis_restart(tmp_path: Path, operation: str) -> None:
    with redis_server(tmp_path) as server:
        client = redis.Redis.from_url(f"{server.url}/0")
        store = RedisStore(client, patience=Patience(15.0, 0.5))
        calls = {
            "load_run": lambda: store.load_run("some-run"),
            "acquire_lock": lambda: store.acquire_lock("k", "holder", 10.0),
            "lock_holder": lambda: store.lock_holder("k"),
            "read": lambda: store.read("k"),
            "write": lambda: store.write("k", 1, serializer="json", expires_in=60.0),
        }
        outcome: list[object] = []
        server.stop()
        waiting = threading.Thread(target=lambda: outcome.append(_outcome_of(calls[operation])))
        waiting.start()
        time.sleep(1.5)
        server.start()  # from this thread: the server dies with the thread that started it
        waiting.join(30)
        client.close()
        assert outcome and not isinstance(outcome[0], Exception), outcome


def _outcome_of(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:
        return exc


def test_a_store_operation_gives_up_once_the_patience_is_spent(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = redis.Redis.from_url(f"{server.url}/0")
        store = RedisStore(client, patience=Patience(0.5, 0.1))
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            store.load_run("some-run")
        assert time.monotonic() - started < 10  # a bound, not a timing: it did give up
        client.close()
