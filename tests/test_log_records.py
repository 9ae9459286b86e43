"""The engine's log records cross processes: their arguments are text, never live objects.

Celery's own test worker forwards its pool processes' records whole through a queue
(``logging.handlers.QueueHandler``, pickled); a record holding a run's state pickled the run's
exception with it, and an exception that cannot be unpickled killed the listener, so no record
of any later task reached the parent (Celery's ``test_trace_log_arguments`` after
``test_fail_with_unpickleable_exception``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_taskengine import task


class NeedsTwoArguments(Exception):
    """Pickles, but cannot be unpickled: ``__init__`` wants two arguments, ``args`` has one."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} {second}")


@pytest.fixture
def app() -> Iterator[Celery]:
    own = Celery("log-records-tests", set_as_current=False)
    yield own
    own.close()


def test_engine_log_records_survive_a_pickle_round_trip_whatever_the_run_raised(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    @task(app=app, name="log_records.fails")
    def fails() -> None:
        raise NeedsTwoArguments("a", "b")

    with caplog.at_level(logging.INFO, logger="celery_taskengine"):
        fails(return_state=True)

    records = [r for r in caplog.records if r.name.startswith("celery_taskengine")]
    assert any("finished in state" in r.getMessage() for r in records)
    for record in records:
        copy = pickle.loads(pickle.dumps(record))  # what a QueueHandler's listener gets
        assert copy.getMessage() == record.getMessage()
