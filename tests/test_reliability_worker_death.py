"""Worker death for real: SIGKILL of prefork pool processes and of whole workers mid-run.

The tasks are ``acks_late`` with ``reject_on_worker_lost``, so a message whose worker died is
delivered again: at once when only a pool process died (Celery requeues it), after the
visibility timeout (3 s here) when the whole worker died and a new one starts. SPEC §7: the
next delivery finds the run Running, records it Crashed, and continues it (Retrying); no
committed result is lost or duplicated.

What "exactly once" honestly means with at-least-once delivery: a body killed before its
transaction commits has run, and runs again on the next delivery. So the tests count every
body execution (a Redis INCR keyed by the run's input, inside the function) and prove, per
input (see ``tests.reliability.checks.check_committed_once``): one committed result, produced
by the last execution that started (none ran after the commit), every other execution ended
by a kill that the history records as Crashed, and a later call with the same input answered
from that one committed record.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.checks import check_committed_once
from tests.reliability.harness import (
    STORE_KINDS,
    WorkerProcess,
    counter,
    reliability_app,
    result_backend,
    wait_for,
    workers,
)

pytestmark = pytest.mark.timeout(300)

#: Body durations (seconds), so kills land before, in and after the body of runs.
SLEEPS = (0.02, 0.1, 0.3, 0.6)
CHILD_KILL_RUNS = 100
MAX_CHILD_KILLS = 80
WORKER_KILL_RUNS = 30
WORKER_KILL_ROUNDS = 8
#: Messages kombu's Redis transport may lose to a whole-worker SIGKILL before any worker
#: received them (see checks.CommitFigures.lost_by_broker), of WORKER_KILL_RUNS: seen 1.
MAX_LOST_BY_BROKER = 2
#: How long the kill rounds wait for a body to start before they stop (a restored message
#: starts within the visibility timeout, 3 s, plus kombu's 10 s restore cycle).
KILL_PACE_SECONDS = 30.0
#: Bound on waiting for a run's result (kills and restarts included).
RESULT_TIMEOUT = 90.0


@pytest.fixture(params=STORE_KINDS)
def rel(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> Iterator[tuple[Any, Any]]:
    """The app, with results (and the engine's store) on Redis or on a database."""
    backend = result_backend(request.param, redis_url, tmp_path)
    with reliability_app(redis_url, backend=backend, visibility_timeout=3) as app_and_tasks:
        yield app_and_tasks


def send_runs(tasks: Any, count: int, rng: random.Random) -> list[tuple[str, float, Any]]:
    runs = []
    for _ in range(count):
        key, sleep = uuid.uuid4().hex, rng.choice(SLEEPS)
        runs.append((key, sleep, tasks.work.delay(key, sleep)))
    return runs


def executions(app: Any, runs: list[tuple[str, float, Any]]) -> int:
    return sum(counter(app, f"exec:{key}") for key, _sleep, _result in runs)


def test_runs_whose_pool_process_is_sigkilled_are_recorded_crashed_and_commit_once(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    rng = random.Random()
    worker = WorkerProcess(app, tmp_path, concurrency=2)
    with workers(worker):
        runs = send_runs(tasks, CHILD_KILL_RUNS, rng)
        # When: pool processes are SIGKILLed at random moments while the runs go through.
        kills = 0
        while kills < MAX_CHILD_KILLS and not all(r.ready() for _k, _s, r in runs):
            time.sleep(rng.uniform(0.1, 0.4))
            children = worker.children()
            if children and worker.kill_child(rng.choice(children)):
                kills += 1
        # Then: every run ends, continued after its crash, with one committed result.
        figures = check_committed_once(app, tasks, runs, RESULT_TIMEOUT)
        log = worker.log_text()

    print(f"\npool-process kills={kills} {figures.summary()}")
    assert not figures.problems, "\n".join(figures.problems)
    assert figures.crashed_runs > 0, f"no kill landed in a run ({kills} kills): nothing proven"
    assert "WorkerLostError" in log or "exited with 'signal 9" in log, "Celery saw no lost child"


def _another_body_starts(app: Any, runs: list[tuple[str, float, Any]], started: int) -> bool:
    """Whether a body starts (or every run ends) within KILL_PACE_SECONDS."""
    try:
        wait_for(
            lambda: executions(app, runs) > started or all(r.ready() for _k, _s, r in runs),
            KILL_PACE_SECONDS,
            "another body to start",
        )
    except AssertionError:
        return False
    return True


def test_runs_whose_whole_worker_is_sigkilled_continue_after_a_restart_and_commit_once(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    rng = random.Random()
    worker = WorkerProcess(app, tmp_path, concurrency=2)
    with workers(worker):
        runs = send_runs(tasks, WORKER_KILL_RUNS, rng)
        # When: the whole worker (main process and pool) is SIGKILLed mid-run, then restarted.
        for _round in range(WORKER_KILL_ROUNDS):
            started = executions(app, runs)
            if all(r.ready() for _k, _s, r in runs):
                break
            # A run may also end without a new body (from its record or the cache); when no
            # body starts for a while, only runs the broker lost can be left: stop killing and
            # let the check below judge every run.
            if not _another_body_starts(app, runs, started):
                break
            time.sleep(rng.uniform(0.0, 0.4))
            worker.kill()
            worker.start()
        # Then: every run ends, continued after its crash, with one committed result (a
        # message the broker lost before any worker received it is counted, see checks).
        figures = check_committed_once(app, tasks, runs, RESULT_TIMEOUT, [worker.log])

    print(f"\nwhole-worker kills={worker.starts - 1} {figures.summary()}")
    assert not figures.problems, "\n".join(figures.problems)
    assert len(figures.lost_by_broker) <= MAX_LOST_BY_BROKER, figures.summary()
    assert figures.crashed_runs > 0, "no kill landed in a run: nothing proven"
