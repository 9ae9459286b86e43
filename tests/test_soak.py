"""Soak: thousands of engine runs across two real worker processes, then an audit.

``SOAK_RUNS`` runs (default 2,000; the issue's full size is 20,000) of one task with retries
(delays 0.05 and 0.2 s, jittered), a 0.2 s timeout and an INPUTS cache, in a random mix: plain
successes, runs that fail once or twice and then succeed, runs that fail every attempt, runs
that time out once and then succeed, runs that time out every attempt, and runs that share
their inputs (cache hits). Afterwards every run must be final, as its mode predicts, with a
history legal under the transition table, and every Redis key the package created (``cte:*``)
and every Celery result key must expire (no key grows the database forever).

Run it alone with ``pytest -m soak tests/test_soak.py -s``; ``SOAK_SEED`` replays a mix.
"""

from __future__ import annotations

import collections
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_taskengine.errors import TaskRunTimeoutError
from tests.reliability.harness import (
    WorkerProcess,
    deliveries,
    history_problems,
    load_run,
    reliability_app,
    workers,
)
from tests.reliability.worker_app import (
    RESULT_EXPIRES,
    SOAK_CACHE_EXPIRATION,
    side,
)

SOAK_RUNS = int(os.environ.get("SOAK_RUNS", "2000"))
#: Runs sharing their inputs draw from this many distinct inputs (so most of them hit).
SHARED_INPUTS = 50
#: Bound on collecting the results once all are sent (seconds, for the whole batch).
RESULT_TIMEOUT = max(120.0, SOAK_RUNS / 50)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(max(300, SOAK_RUNS // 4))]


@dataclass(frozen=True)
class Mode:
    """How a run behaves (the task's arguments) and how it must end."""

    name: str
    weight: int
    failures: int = 0
    timeouts: int = 0
    final: tuple[str, ...] = ("Completed",)
    attempts: int = 1


MODES = (
    Mode("ok", 54),
    Mode("fails-once", 10, failures=1, attempts=2),
    Mode("fails-twice", 5, failures=2, attempts=3),
    Mode("fails-always", 5, failures=3, final=("Failed",), attempts=3),
    Mode("times-out-once", 3, timeouts=1, attempts=2),
    Mode("times-out-always", 3, timeouts=3, final=("TimedOut",), attempts=3),
    Mode("shared-inputs", 20, final=("Completed", "Cached")),
)


@pytest.fixture
def soak_app(redis_url: str) -> Iterator[tuple[Any, Any]]:
    # A visibility timeout well above the retry delays, as Celery's docs require (the
    # redelivery tests cover what happens below it).
    with reliability_app(redis_url, prefix="soak", visibility_timeout=60) as app_and_tasks:
        yield app_and_tasks


def test_thousands_of_runs_with_failures_retries_timeouts_and_cache_hits_all_end_cleanly(
    soak_app: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = soak_app
    seed = int(os.environ.get("SOAK_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    batch = uuid.uuid4().hex[:8]
    modes = rng.choices(MODES, weights=[m.weight for m in MODES], k=SOAK_RUNS)
    two = (WorkerProcess(app, tmp_path, concurrency=2, loglevel="warning") for _ in range(2))
    with workers(*two):
        started = time.monotonic()
        sent = []
        for mode in modes:
            if mode.name == "shared-inputs":
                token = f"{batch}-shared-{rng.randrange(SHARED_INPUTS)}"
            else:
                token = uuid.uuid4().hex
            sleep = rng.choice((0.0, 0.0, 0.002, 0.01))
            sent.append((mode, tasks.soak.delay(token, mode.failures, mode.timeouts, sleep)))
        deadline = time.monotonic() + RESULT_TIMEOUT
        outcomes = [outcome_of(mode, result, deadline) for mode, result in sent]
        seconds = time.monotonic() - started

    problems = [problem for problem in outcomes if problem]
    counts = collections.Counter()
    log = deliveries(app)
    for mode, result in sent:
        run = load_run(app, result.id)
        wrong = history_problems(run, result.id)
        if wrong:
            problems += [f"{mode.name} {p}, deliveries {log.started(result.id)}" for p in wrong]
        if run is None or run.state is None:
            continue
        if run.state.name not in mode.final or (
            mode.name != "shared-inputs" and run.run_count != mode.attempts
        ):
            problems.append(
                f"{mode.name} {result.id}: {run.history_names()}, run_count {run.run_count}, "
                f"deliveries {log.started(result.id)}"
            )
        counts["failed"] += run.state.name == "Failed"
        counts["timed_out"] += run.state.name == "TimedOut"
        counts["retried"] += run.run_count > 1
        counts["cached"] += run.state.name == "Cached"
    problems += expiry_problems(app)
    redelivered = sum(1 for row in log.starts if row[2])
    print(
        f"\nsoak: runs={SOAK_RUNS} failed={counts['failed']} retried={counts['retried']} "
        f"timed_out={counts['timed_out']} cached={counts['cached']} seconds={seconds:.1f} "
        f"deliveries={len(log.starts)} redelivered={redelivered} seed={seed}"
    )
    assert not problems, f"{len(problems)} problems (seed {seed}):\n" + "\n".join(problems[:30])


def outcome_of(mode: Mode, result: Any, deadline: float) -> str:
    """What is wrong with what ``.get()`` gave for a run of ``mode`` ('' if nothing)."""
    try:
        value = result.get(timeout=max(1.0, deadline - time.monotonic()))
    except CeleryTimeoutError:
        return f"{mode.name} {result.id}: never answered; backend says {result.state}"
    except ValueError as exc:
        return "" if mode.final == ("Failed",) else f"{mode.name} {result.id}: raised {exc!r}"
    except TaskRunTimeoutError as exc:
        return "" if mode.final == ("TimedOut",) else f"{mode.name} {result.id}: raised {exc!r}"
    if "Completed" not in mode.final or not isinstance(value, str):
        return f"{mode.name} {result.id}: returned {value!r}"
    return ""


def expiry_problems(app: Any) -> list[str]:
    """Keys of this package or of Celery's results that would never expire, or expire late."""
    client = side(app)
    limits = {
        b"celery-task-meta-": RESULT_EXPIRES,
        b"cte:default:run:": RESULT_EXPIRES,
        b"cte:default:claim:": RESULT_EXPIRES,  # "done" lives as long as the run record
        # The run index lives twice its runs' lifetime from its last refresh (run_index).
        b"cte:default:index:": 2 * RESULT_EXPIRES,
        b"cte:default:cache:": SOAK_CACHE_EXPIRATION,
    }
    problems, seen = [], collections.Counter()
    for key in client.scan_iter(count=1000):
        prefix = next((p for p in limits if key.startswith(p)), None)
        if prefix is None:
            if key.startswith(b"cte:"):
                problems.append(f"unexpected package key {key!r}")
            continue
        seen[prefix] += 1
        ttl = client.pttl(key)
        if not 0 < ttl <= limits[prefix] * 1000:
            problems.append(f"{key!r}: pttl {ttl} (limit {limits[prefix]} s)")
    if not seen[b"celery-task-meta-"] or not seen[b"cte:default:run:"]:
        problems.append(f"no result or run keys found: {dict(seen)}")
    return problems
