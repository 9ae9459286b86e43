"""The writer thread of writes a delivery need not wait for: dropped if superseded before it
starts them, waited for once started, in order, and a failure logged with its run id."""

from __future__ import annotations

import logging
import threading

import pytest

from celery_taskengine._store.deferred_writes import DeferredWrites

pytestmark = pytest.mark.timeout(30)


def test_a_write_settled_before_it_is_due_is_dropped() -> None:
    writes = DeferredWrites(delay=0.5)
    made: list[str] = []
    job = writes.submit("run-1", lambda: made.append("running"))
    writes.settle(job)
    later = writes.submit("run-1", lambda: made.append("later"))
    done = threading.Event()
    writes.submit("run-1", done.set)
    assert done.wait(5)
    writes.settle(later)
    assert made == ["later"]


def test_settling_a_started_write_waits_until_it_is_made() -> None:
    writes = DeferredWrites(delay=0.0)
    started, release = threading.Event(), threading.Event()
    made: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(5)
        made.append("running")

    job = writes.submit("run-2", slow)
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    writes.settle(job)  # returns only once the write is made
    assert made == ["running"]


def test_writes_are_made_in_the_order_they_came() -> None:
    writes = DeferredWrites(delay=0.01)
    made: list[int] = []
    for i in range(20):
        writes.submit(f"run-{i}", lambda i=i: made.append(i))  # type: ignore[misc]
    done = threading.Event()
    writes.submit("last", done.set)
    assert done.wait(5)
    assert made == list(range(20))


def test_a_failed_write_is_logged_with_its_run_id(caplog: pytest.LogCaptureFixture) -> None:
    writes = DeferredWrites(delay=0.0)

    def refused() -> None:
        raise RuntimeError("database refused")

    with caplog.at_level(logging.ERROR, logger="celery_taskengine._store.deferred_writes"):
        job = writes.submit("run-3", refused)
        done = threading.Event()
        writes.submit("run-4", done.set)
        assert done.wait(5)
        writes.settle(job)
    assert any("run-3" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
