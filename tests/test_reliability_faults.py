"""Broker and backend faults for real: Redis restarted, or its connections killed, mid-batch.

Each scenario starts a Redis server of its own (append-only, so a restart is an outage, not a
wipe; the shared test server is never touched), a prefork worker with three processes, and
sends 500 tiny runs. While they go through, Redis fails twice (at about 20 % and 60 % done):
either it is stopped and started again one second later, or every normal client connection
is killed (``CLIENT KILL TYPE normal``). Redis is both broker and result backend, so the
worker's consumer, its pool processes' backend writes and the caller's result listener all
lose their connections.

What must hold (SPEC §7, the issue): every ``.get()`` returns the run's value or raises a clear
error (none hangs: a bounded wait tells a lost run apart), a failed state write is retried or
surfaces as such an error (named in the worker's log), and afterwards every run record exists,
is final, has a legal history and agrees with what the caller was told. A focused test
drops the connections between two runs, where a lost record write once hid every time.

One loss is not the engine's: kombu's Redis transport takes a message with BRPOP and only then
records it as unacknowledged, so a connection killed in between loses a message no worker
ever saw (celery/kombu#305, celery/celery#4354). Such runs are identified precisely (never
received, not queued, not unacknowledged, no record, backend PENDING) and reported in the
summary line instead of failing the test; every other unanswered run fails it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError

from tests.reliability.harness import (
    RedisServer,
    WorkerProcess,
    history_problems,
    load_run,
    outcome_of,
    redis_server,
    reliability_app,
    wait_for,
    workers,
)
from tests.reliability.worker_app import make_app

pytestmark = pytest.mark.timeout(180)

RUNS = 500
CONCURRENCY = 3
#: How long each run's body sleeps (seconds): the batch takes a few seconds, faults land in it.
BODY_SECONDS = 0.01
#: Fractions of the batch done when Redis fails.
FAULT_POINTS = (0.2, 0.6)
#: Bound on collecting every result after the faults (seconds, for the whole batch).
COLLECT_TIMEOUT = 90.0
#: Seconds without a run getting ready after which the rest are taken as never answering:
#: longer than a worker restart plus the visibility timeout and its sweep (3 + 0.5 s).
STALL_SECONDS = 15.0


@dataclass
class Outcome:
    """What the caller saw of each run, and what the records say afterwards."""

    fault: str
    task_ids: list[str] = field(default_factory=list)
    values: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    records: dict[int, Any] = field(default_factory=dict)
    backend_states: dict[int, str] = field(default_factory=dict)
    #: Lost runs whose message is still in the queue or the unacked hash.
    in_broker: set[int] = field(default_factory=set)
    #: Exit codes of the worker each time it exited by itself (and was started again).
    worker_exits: list[int] = field(default_factory=list)
    worker_log: str = ""
    seconds: float = 0.0

    def lost_in_transport(self) -> list[int]:
        """Lost runs no worker ever received: popped from the queue by BRPOP, never recorded
        in kombu's unacked hash (the connection died in between; celery/kombu#305)."""
        return [
            i
            for i in self.lost
            if i not in self.in_broker
            and self.records[i] is None
            and self.backend_states[i] == "PENDING"
            and f"[{self.task_ids[i]}] received" not in self.worker_log
        ]

    def _unfinished(self) -> list[bool]:
        return [
            run is not None and (run.state is None or not run.state.is_final())
            for run in self.records.values()
        ]

    def summary(self) -> str:
        return (
            f"fault={self.fault} x{len(FAULT_POINTS)} runs={len(self.task_ids)} "
            f"values={len(self.values)} clear_errors={len(self.errors)} "
            f"lost_after_reaching_a_worker={len(self.lost) - len(self.lost_in_transport())} "
            f"lost_by_the_redis_transport={len(self.lost_in_transport())} "
            f"no_record={sum(r is None for r in self.records.values())} "
            f"unfinished_record={sum(self._unfinished())} "
            f"worker_exits={self.worker_exits} "
            f"seconds={self.seconds:.1f}"
        )


def inject(fault: str, server: RedisServer) -> None:
    if fault == "restart":
        server.restart(down_for=1.0)
    else:
        client = redis.Redis(port=server.port)
        try:
            client.client_kill_filter(_type="normal")
        finally:
            client.close()


@pytest.fixture(scope="module", params=["restart", "client-kill"])
def outcome(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    """Run the batch once per fault kind (module-scoped: it takes seconds)."""
    fault: str = request.param
    workdir = tmp_path_factory.mktemp(f"faults-{fault}")
    with redis_server(workdir) as server:
        app, tasks = make_app(f"{server.url}/1", queue=f"rel-{uuid.uuid4().hex[:8]}")
        result_of: dict[int, Any] = {}
        seen = Outcome(fault)
        worker = WorkerProcess(app, workdir, concurrency=CONCURRENCY)
        try:
            with workers(worker):
                started = time.monotonic()
                for i in range(RUNS):
                    result_of[i] = tasks.tiny.delay(i, BODY_SECONDS)
                seen.task_ids = [result_of[i].id for i in range(RUNS)]
                for point in FAULT_POINTS:
                    supervise(
                        worker,
                        lambda point=point: done(result_of) >= point * RUNS,
                        f"{point:.0%} of the runs to finish",
                    )
                    inject(fault, server)
                with contextlib.suppress(AssertionError):  # what never ends is reported below
                    supervise(worker, finished_or_stalled(result_of), "every run to finish")
                collect(seen, result_of)
                seen.seconds = time.monotonic() - started
                seen.worker_exits = list(worker.exits)
            seen.records = {i: load_run(app, task_id) for i, task_id in enumerate(seen.task_ids)}
            seen.backend_states = {i: result_of[i].state for i in seen.lost}
            seen.worker_log = worker.log_text()
            seen.in_broker = {i for i in seen.lost if in_broker(app, seen.task_ids[i])}
        finally:
            app.close()
    print(f"\n{seen.summary()}")
    yield seen


def in_broker(app: Any, task_id: str) -> bool:
    """Whether ``task_id``'s message is still queued or delivered-but-unacknowledged."""
    client = app.backend.client
    needle = task_id.encode()
    queued = client.lrange(app.conf.task_default_queue, 0, -1)
    return any(needle in raw for raw in [*queued, *client.hvals("unacked")])


def done(result_of: dict[int, Any]) -> int:
    return sum(result.ready() for result in result_of.values())


def finished_or_stalled(result_of: dict[int, Any]) -> Any:
    """A condition: every run is ready, or none got ready for ``STALL_SECONDS``."""
    last = {"count": -1, "at": time.monotonic()}

    def check() -> bool:
        count, now = done(result_of), time.monotonic()
        if count != last["count"]:
            last.update(count=count, at=now)
        return count == RUNS or now - last["at"] > STALL_SECONDS

    return check


def supervise(worker: WorkerProcess, condition: Any, what: str) -> None:
    """Wait for ``condition``, starting the worker again whenever it exits by itself.

    Celery's consumer can die on a broker connection error (kombu 5.7: "Unrecoverable
    error: AttributeError(...'hostname')" while restoring unacked messages on close), and a
    process supervisor would restart it; the messages it held come back after the
    visibility timeout.
    """

    def check() -> bool:
        worker.restart_if_exited()
        return bool(condition())

    wait_for(check, COLLECT_TIMEOUT, what)


def collect(seen: Outcome, result_of: dict[int, Any]) -> None:
    for i, result in result_of.items():
        try:
            # Every run had its chance above: what is not ready now never answers.
            seen.values[i] = result.get(timeout=1.0 if not result.ready() else 10.0)
        except CeleryTimeoutError:
            seen.lost.append(i)
        except Exception as exc:
            seen.errors[i] = exc


def describe_lost(outcome: Outcome) -> str:
    lines = []
    for i in outcome.lost:
        task_id, run = outcome.task_ids[i], outcome.records[i]
        history = run.history_names() if run is not None else "no record"
        lines.append(f"run {i} {task_id}: backend {outcome.backend_states.get(i)}, {history}")
        lines += [f"    {line}" for line in outcome.worker_log.splitlines() if task_id in line]
    return "\n".join(lines)


def test_every_run_returns_its_value_or_raises_a_clear_error_logged_by_the_worker(
    outcome: Outcome,
) -> None:
    # Given: a message the Redis transport lost before any worker received it is out of the
    # engine's reach (kombu BRPOPs it, then records it as unacked: a connection killed in
    # between loses it); such runs are counted in the summary, any other loss fails.
    lost = [i for i in outcome.lost if i not in outcome.lost_in_transport()]
    assert not lost, f"runs never answered (silently lost):\n{describe_lost(outcome)}"
    wrong = {i: v for i, v in outcome.values.items() if v != 2 * i}
    assert not wrong, f"runs returned wrong values: {wrong}"
    for i, exc in outcome.errors.items():
        # A clear error says what failed: the result backend / broker connection.
        assert isinstance(exc, ConnectionError | redis.exceptions.ConnectionError), repr(exc)
        assert "Redis" in str(exc) or "redis" in str(exc), repr(exc)
        # ... and the worker logged it against the run, so the failed write is not silent.
        task_id = outcome.task_ids[i]
        assert f"[{task_id}] raised unexpected: {type(exc).__name__}" in outcome.worker_log


def test_after_the_faults_every_run_has_a_final_record_that_agrees_with_its_caller(
    outcome: Outcome,
) -> None:
    problems = []
    for i, task_id in enumerate(outcome.task_ids):
        run = outcome.records[i]
        if i in outcome.lost_in_transport():
            continue  # never reached a worker (see the module docstring)
        problems += history_problems(run, task_id)
        if run is None or run.state is None:
            continue
        if i in outcome.values and (
            run.state.name != "Completed" or run.state.data != outcome.values[i]
        ):
            problems.append(f"{task_id}: .get() gave {outcome.values[i]}, {run.history_names()}")
        if i in outcome.errors and run.state.is_completed():
            problems.append(f"{task_id}: caller got {outcome.errors[i]!r}, record Completed")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("fault", ["restart", "client-kill"])
def test_a_run_right_after_redis_dropped_the_workers_connections_ends_with_its_record(
    fault: str, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as server, reliability_app(f"{server.url}/1") as (app, tasks):
        worker = WorkerProcess(app, tmp_path, concurrency=1)
        with workers(worker):
            # Given: the pool process has used its backend connection, now idle.
            assert tasks.tiny.delay(1).get(timeout=30) == 2
            # When: Redis drops every connection, then the next run comes.
            inject(fault, server)
            result = tasks.tiny.delay(2)
            supervise(worker, result.ready, "the run after the fault to finish")
            outcome = outcome_of(result, timeout=10)
            run = load_run(app, result.id)

    # Then: the run completed, and its record says so.
    history = run.history_names() if run is not None else None
    assert history == ["Pending", "Running", "Completed"], f".get() gave {outcome!r}"
    assert outcome == 4
