"""Claims and their renewer against a real Redis: tokens, bounded waits, lost claims.

The worker-level behaviour (a message completed elsewhere, a paused holder) is in
``test_reliability_claims``; these are the parts, one at a time.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_taskengine import task
from celery_taskengine._store.claims import Claim, claim_or_wait
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.renewer import renewer
from celery_taskengine.states import Pending, Running
from celery_taskengine.task_engine import new_task_run
from tests.workers import embedded_worker

pytestmark = pytest.mark.timeout(60)


def _claim(client: Any, ttl: float = 5.0, run_id: str = "run-1") -> Claim:
    return RedisStore(client).new_claim(run_id, 0, ttl)


def _wait(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- tokens ------------------------------------------------------------------------------------

_TOKEN_IN_A_CONTAINER = """
import os, socket
os.getpid = lambda: 1                      # every container's first process
socket.gethostname = lambda: "web"         # containers started from one compose file
from celery_taskengine._store.claims import new_token
print(new_token())
"""


def test_tokens_differ_between_containers_sharing_a_hostname_and_pid() -> None:
    command = [sys.executable, "-c", _TOKEN_IN_A_CONTAINER]
    tokens = [
        subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    ]

    assert tokens[0] != tokens[1]


def test_tokens_differ_between_claims_of_one_process(redis_client: Any) -> None:
    assert len({_claim(redis_client).token for _ in range(1000)}) == 1000


# -- waiting for a holder ------------------------------------------------------------------------


def test_a_duplicate_waits_only_until_a_dead_holders_claim_lapses(redis_client: Any) -> None:
    # Given: a holder that took its claim for half a second and died (never renewed).
    dead = _claim(redis_client, ttl=0.5)
    assert claim_or_wait(redis_client, dead, poll=0.01)
    # When: a duplicate with a long lifetime and a long poll comes.
    duplicate = _claim(redis_client, ttl=30.0)
    started = time.monotonic()
    assert claim_or_wait(redis_client, duplicate, poll=10.0)

    # Then: it took the run over when the dead holder's claim lapsed, not a poll later.
    assert time.monotonic() - started < 5.0
    assert redis_client.get(duplicate.key) == duplicate.token.encode()


def test_a_duplicate_takes_over_a_claim_that_can_never_lapse(redis_client: Any) -> None:
    # Given: a claim written without a lifetime (by hand, or an older version of the engine).
    duplicate = _claim(redis_client, ttl=0.5)
    redis_client.set(duplicate.key, "host/1/0")

    result: list[bool] = []
    waiter = threading.Thread(
        target=lambda: result.append(claim_or_wait(redis_client, duplicate, poll=0.05))
    )
    waiter.start()
    waiter.join(timeout=10)

    assert result == [True], "the duplicate waited for ever"
    assert redis_client.get(duplicate.key) == duplicate.token.encode()


def test_a_duplicate_waits_as_long_as_the_holder_renews(redis_client: Any) -> None:
    holder = _claim(redis_client, ttl=0.3)
    assert claim_or_wait(redis_client, holder, poll=0.01)
    renewer().hold(holder)
    result: list[bool] = []
    duplicate = _claim(redis_client, ttl=0.3)
    waiter = threading.Thread(
        target=lambda: result.append(claim_or_wait(redis_client, duplicate, poll=0.05)),
        daemon=True,
    )
    try:
        waiter.start()
        time.sleep(1.5)  # five lifetimes of the holder's claim
        assert result == [], "the duplicate took a live holder's run over"
        settle = holder.record_command("run-key", "{}", "0", settle=True)
        assert redis_client.execute_command(*settle) == 1
    finally:
        renewer().release(holder)
    waiter.join(timeout=5)

    assert result == [False]  # the holder finished: nothing left to do


# -- the renewer ---------------------------------------------------------------------------------


def test_the_renewer_survives_an_error_that_is_not_a_redis_error(
    redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a held claim whose first renewal raises something else than a RedisError.
    claim = _claim(redis_client, ttl=0.6, run_id="run-renewed")
    assert claim_or_wait(redis_client, claim, poll=0.01)
    calls: list[int] = []
    real_renew = claim.store.renew_claim

    def renew_claim(c: Claim) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug in a renewal")
        return real_renew(c)

    claim.store.renew_claim = renew_claim  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        renewer().hold(claim)
        try:
            # When: several lifetimes pass.
            time.sleep(2.0)
            # Then: the claim is still held and renewed, and the error was logged by run id.
            assert redis_client.get(claim.key) == claim.token.encode()
            assert len(calls) >= 3 and not claim.lost
        finally:
            renewer().release(claim)
    assert any(
        "run-renewed" in record.getMessage() and record.exc_info for record in caplog.records
    )


def test_a_renewal_that_finds_the_claim_taken_makes_the_attempt_stop_writing(
    redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    claim = _claim(redis_client, ttl=0.3, run_id="run-taken")
    assert claim_or_wait(redis_client, claim, poll=0.01)
    with caplog.at_level(logging.WARNING):
        renewer().hold(claim)
        try:
            redis_client.set(claim.key, "another-delivery", px=5000)  # taken over meanwhile
            assert _wait(
                lambda: any(
                    record.getMessage().startswith("run-taken: this delivery lost its claim")
                    for record in caplog.records
                )
            )
        finally:
            renewer().release(claim)

    assert claim.lost and not claim.confirm()


# -- fenced writes ---------------------------------------------------------------------------------


def test_a_cache_commit_under_a_lost_claim_writes_nothing(redis_client: Any) -> None:
    store = RedisStore(redis_client)
    claim = store.new_claim("run-cached", 0, 5.0)
    redis_client.set(claim.key, "another-delivery", px=5000)

    store.fenced_by(claim).write("k", 1, serializer="json", expires_in=60)

    assert store.read("k") is None
    assert claim.lost


def test_a_cache_commit_under_a_held_claim_is_written(redis_client: Any) -> None:
    store = RedisStore(redis_client)
    claim = store.new_claim("run-cached", 0, 5.0)
    assert store.take_claim(claim, poll=0.01)

    store.fenced_by(claim).write("k", 1, serializer="json", expires_in=60)

    assert store.read("k").value == 1
    assert not claim.lost and claim.is_sure()


def test_a_record_write_under_a_settled_claim_is_refused(redis_client: Any) -> None:
    holder, stale = _claim(redis_client), _claim(redis_client)
    assert claim_or_wait(redis_client, holder, poll=0.01)
    settle = holder.record_command("run", "holder", "0", settle=True)
    assert redis_client.execute_command(*settle) == 1

    late = stale.record_command("run", "stale", "0", settle=True)
    assert redis_client.execute_command(*late) == 0
    assert redis_client.get("run") == b"holder"


def test_a_first_delivery_claimed_with_a_round_trip_continues_a_run_a_dead_copy_left(
    redis_app: Celery, redis_client: Any
) -> None:
    counter = f"continued:{uuid.uuid4().hex}"

    @task(app=redis_app, name="claims.continued")
    def continued() -> int:
        return int(redis_client.incr(counter))

    # Given: a copy of the message ran first and died mid-run (its claim lapsed), leaving its
    # run Running.
    task_id = str(uuid.uuid4())
    run = new_task_run(continued, {}, task_id)
    for state in (Pending(), Running()):
        run.state = state
        run.state_history.append(state)
    RedisStore.for_app(redis_app).save_run(run)
    # When: the message comes with no send time (send_task), so it may be such a duplicate.
    with embedded_worker(redis_app):
        assert redis_app.send_task("claims.continued", task_id=task_id).get(timeout=10) == 1

    # Then: its delivery continued that run rather than starting another over it.
    history = RedisStore.for_app(redis_app).load_run(task_id).history_names()
    assert history[:2] == ["Pending", "Running"] and history[-1] == "Completed"
    assert "Crashed" in history, history
