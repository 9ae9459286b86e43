"""Claims and their renewer against real stores: tokens, bounded waits, lost claims.

The waits, renewals and fenced writes run over Redis and the SQL store on SQLite, PostgreSQL
and MariaDB (the same semantics on each). The worker-level behaviour (a message completed
elsewhere, a paused holder) is in ``test_reliability_claims``; these are the parts, one at a
time.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_taskengine import task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.claims import Claim
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.renewer import Renewer, renewer
from celery_taskengine.states import Completed, Pending, Running
from celery_taskengine.task_engine import new_task_run
from tests.test_store_contract import MARIADB_URL, POSTGRES_URL, _sql_store
from tests.workers import embedded_worker

pytestmark = pytest.mark.timeout(60)


class Claims:
    """A store with claims, and what the tests do to its claims behind its back."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.sql = not isinstance(store, RedisStore)

    def claim(self, ttl: float = 5.0, run_id: str = "run-1") -> Claim:
        claim: Claim = self.store.new_claim(run_id, 0, ttl)
        return claim

    def take(self, claim: Claim, poll: float) -> bool:
        return bool(self.store.take_claim(claim, poll=poll))

    def set_holder(self, claim: Claim, holder: str, ttl: float | None) -> None:
        """Write ``holder`` into ``claim``'s place, living ``ttl`` s (``None``: for ever)."""
        if not self.sql:
            self.store.client.set(claim.key, holder, px=None if ttl is None else int(ttl * 1000))
            return
        from sqlalchemy import delete

        from celery_taskengine._store import sql_schema

        c = sql_schema.claims.c
        expires = None if ttl is None else time.time() + ttl
        row = {"namespace": self.store.namespace, "key": claim.key}
        with self.store.engine.begin() as conn:
            conn.execute(delete(sql_schema.claims).where(*(c[k] == v for k, v in row.items())))
            conn.execute(
                sql_schema.claims.insert(), {**row, "holder": holder, "expires_at": expires}
            )

    def holder(self, claim: Claim) -> str | None:
        if not self.sql:
            value = self.store.client.get(claim.key)
            return None if value is None else value.decode()
        holder: str | None = self.store.claim_holder(claim.run_id, 0)
        return holder

    def settle(self, claim: Claim, document: str) -> bool:
        """Write a run record under ``claim`` and its done marker; whether it was written."""
        if not self.sql:
            command = claim.record_command("run", document, "0", settle=True)
            return bool(self.store.client.execute_command(*command))
        return bool(self.store.save_run_fenced(_run("run", document), claim, settle=True))

    def run_record(self) -> str | None:
        if not self.sql:
            value = self.store.client.get("run")
            return None if value is None else value.decode()
        run = self.store.load_run("run")
        return None if run is None else str(run.name)


def _run(run_id: str, name: str) -> TaskRun:
    history = [Pending(), Running(), Completed(data=1)]
    return TaskRun(
        id=run_id,
        name=name,
        task_name="t",
        run_count=1,
        state=history[-1],
        state_history=history,
    )


@pytest.fixture(params=["redis", "sqlite", "postgresql", "mariadb"])
def claims(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Claims]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
        yield Claims(RedisStore(client, namespace=namespace))
        return
    urls = {"sqlite": f"sqlite:///{tmp_path / 'claims.db'}", "postgresql": POSTGRES_URL}
    store = _sql_store(urls.get(request.param, MARIADB_URL), namespace)
    try:
        yield Claims(store)
    finally:
        store.close()


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


def test_a_duplicate_waits_only_until_a_dead_holders_claim_lapses(claims: Claims) -> None:
    # Given: a holder that took its claim for half a second and died (never renewed).
    dead = claims.claim(ttl=0.5)
    assert claims.take(dead, poll=0.01)
    # When: a duplicate with a long lifetime and a long poll comes.
    duplicate = claims.claim(ttl=30.0)
    started = time.monotonic()
    assert claims.take(duplicate, poll=10.0)

    # Then: it took the run over when the dead holder's claim lapsed, not a poll later.
    assert time.monotonic() - started < 5.0
    assert claims.holder(duplicate) == duplicate.token


def test_a_duplicate_takes_over_a_claim_that_can_never_lapse(claims: Claims) -> None:
    # Given: a claim written without a lifetime (by hand, or an older version of the engine).
    duplicate = claims.claim(ttl=0.5)
    claims.set_holder(duplicate, "host/1/0", ttl=None)

    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(claims.take(duplicate, poll=0.05)))
    waiter.start()
    waiter.join(timeout=10)

    assert result == [True], "the duplicate waited for ever"
    assert claims.holder(duplicate) == duplicate.token


def test_a_duplicate_waits_as_long_as_the_holder_renews(claims: Claims) -> None:
    holder = claims.claim(ttl=0.3)
    assert claims.take(holder, poll=0.01)
    renewer().hold(holder)
    result: list[bool] = []
    duplicate = claims.claim(ttl=0.3)
    waiter = threading.Thread(
        target=lambda: result.append(claims.take(duplicate, poll=0.05)), daemon=True
    )
    try:
        waiter.start()
        time.sleep(1.5)  # five lifetimes of the holder's claim
        assert result == [], "the duplicate took a live holder's run over"
        assert claims.settle(holder, "holder")
    finally:
        renewer().release(holder)
    waiter.join(timeout=5)

    assert result == [False]  # the holder finished: nothing left to do


# -- the renewer ---------------------------------------------------------------------------------


def test_the_renewer_survives_an_error_that_is_not_a_store_error(
    claims: Claims, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a held claim whose first renewal raises something else than a store's error.
    claim = claims.claim(ttl=0.6, run_id="run-renewed")
    assert claims.take(claim, poll=0.01)
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
            assert claims.holder(claim) == claim.token
            assert len(calls) >= 3 and not claim.lost
        finally:
            renewer().release(claim)
    assert any(
        "run-renewed" in record.getMessage() and record.exc_info for record in caplog.records
    )


def test_a_lease_due_before_the_renewer_wakes_is_renewed_on_time_without_waking_it_for_later_ones(
    claims: Claims,
) -> None:
    # Given: a claim renewed every 10 s, so the renewer sleeps until then.
    slow, fast = claims.claim(ttl=30.0, run_id="run-slow"), claims.claim(ttl=0.3, run_id="run-fast")
    assert claims.take(slow, poll=0.01) and claims.take(fast, poll=0.01)
    later = [claims.claim(ttl=60.0, run_id=f"run-later-{i}") for i in range(50)]
    process_renewer = Renewer()
    process_renewer.hold(slow)
    try:
        # When: a claim due sooner is held, then many due later than it.
        process_renewer.hold(fast)
        for claim in later:
            process_renewer.hold(claim)
        # Then: the sooner one is kept alive across several of its lifetimes.
        time.sleep(1.0)
        assert claims.holder(fast) == fast.token and not fast.lost
        assert fast.proven_at is not None and time.monotonic() - fast.proven_at < 0.3
    finally:
        for claim in (slow, fast, *later):
            process_renewer.release(claim)


def test_a_renewal_that_finds_the_claim_taken_makes_the_attempt_stop_writing(
    claims: Claims, caplog: pytest.LogCaptureFixture
) -> None:
    claim = claims.claim(ttl=0.3, run_id="run-taken")
    assert claims.take(claim, poll=0.01)
    with caplog.at_level(logging.WARNING):
        renewer().hold(claim)
        try:
            claims.set_holder(claim, "another-delivery", ttl=5.0)  # taken over meanwhile
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


def test_a_cache_commit_under_a_lost_claim_writes_nothing(claims: Claims) -> None:
    store = claims.store
    claim = store.new_claim("run-cached", 0, 5.0)
    claims.set_holder(claim, "another-delivery", ttl=5.0)

    store.fenced_by(claim).write("k", 1, serializer="json", expires_in=60)

    assert store.read("k") is None
    assert claim.lost


def test_a_cache_commit_under_a_held_claim_is_written(claims: Claims) -> None:
    store = claims.store
    claim = store.new_claim("run-cached", 0, 5.0)
    assert store.take_claim(claim, poll=0.01)

    store.fenced_by(claim).write("k", 1, serializer="json", expires_in=60)

    assert store.read("k").value == 1
    assert not claim.lost and claim.is_sure()


def test_a_record_write_under_a_settled_claim_is_refused(claims: Claims) -> None:
    holder, stale = claims.claim(), claims.claim()
    assert claims.take(holder, poll=0.01)
    assert claims.settle(holder, "holder")

    assert not claims.settle(stale, "stale")
    assert claims.run_record() == "holder"
    assert claims.holder(holder) == holder.done_value


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
