"""One cell of the fault matrix: a pool, a task kind and a Redis fault, run for real.

A cell starts two private Redis servers, a broker (which also holds the side counters, see
:mod:`tests.reliability.matrix_app`) that no fault touches, and the result backend the fault
hits (:mod:`tests.reliability.faults`), then a ``celery worker`` with the cell's pool. It
sends :data:`RUNS` runs, injects the fault once :data:`INJECT_AFTER` bodies have finished and
another run is unsettled (its body started, its Celery result not stored yet: the fault lands
in its body or in its writes), heals it :data:`FAULT_SECONDS` later, and waits (bounded)
until every run has a final Celery result or nothing moves any more. Then, per run:

- **lost**: no final Celery result (nor does one come after healing);
- **disagreeing**: Celery's result and the engine's run record tell different stories (no
  record, a record not final, Completed against FAILURE, another value than Celery's);
- **executed twice**: its body started more than once (the side counter);
- **unreported**: a run that failed, was lost or lost its record, whose id the worker never
  logged in an ERROR, WARNING or CRITICAL record (traceback included): a loss that cannot be
  prevented must at least be reported.

A run that ended FAILURE with a record that says so, and a log line naming it, is a reported
loss, not a problem: the fault may outlast what Celery's retry policy allows.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from celery_taskengine import get_task_run
from tests.reliability.faults import FAULTS, Backend, faulted_backend
from tests.reliability.harness import WorkerProcess, redis_server, wait_for, workers
from tests.reliability.matrix_app import expected_value, make_matrix_app

POOLS = ("prefork", "threads", "solo", "gevent")
KINDS = ("sync", "async", "generator")
#: Pool processes, threads or greenlets of the worker (solo has one, whatever it is told).
CONCURRENCY = {"prefork": 2, "threads": 2, "solo": 1, "gevent": 4}
#: Runs per cell: enough that some are before, in and after the fault.
RUNS = 8
#: How long each body sleeps (seconds): the batch outlasts the moment the fault comes.
BODY_SECONDS = 0.3
#: Bodies finished before the fault is injected.
INJECT_AFTER = 2
#: How long the fault lasts (seconds); Celery retries its backend writes for longer.
FAULT_SECONDS = 1.5
#: Seconds Redis keeps an unacknowledged message from other deliveries.
VISIBILITY_TIMEOUT = 4.0
#: After healing: seconds without any run reaching a final result before the rest are taken
#: as never finishing (longer than a redelivery after the visibility timeout).
STALL_SECONDS = 12.0
#: After healing: bound on waiting for every run (seconds).
DRAIN_TIMEOUT = 45.0
#: Bound on the batch getting to the fault (seconds).
BATCH_TIMEOUT = 60.0
FINAL = ("SUCCESS", "FAILURE", "REVOKED")
#: The header of a log record at a level that reports a problem.
REPORTED = re.compile(r"^\[[^\]]*: (ERROR|WARNING|CRITICAL)/")


@dataclass(frozen=True)
class Cell:
    pool: str
    kind: str
    fault: str

    @property
    def id(self) -> str:
        return f"{self.pool}-{self.kind}-{self.fault}"


@dataclass
class Run:
    """One run of a cell, as the caller, the engine and the side counters see it."""

    key: str
    task_id: str
    celery_state: str | None = None
    celery_result: Any = None
    record: Any = None  #: the engine's TaskRun, or None
    record_error: str = ""
    executions: int = 0
    reported: list[str] = field(default_factory=list)  #: worker log records naming the run
    #: Where its message was when the waiting ended: "queued", "unacknowledged" or "".
    message: str = ""


@dataclass
class CellOutcome:
    cell: Cell
    runs: list[Run] = field(default_factory=list)
    worker_exits: list[int] = field(default_factory=list)
    #: Bodies finished when the fault came, and runs whose body had started but whose Celery
    #: result was not stored yet (the fault hits those: in their body or in their writes).
    finished_at_fault: int = 0
    unsettled_at_fault: int = 0
    #: The worker's ERROR and CRITICAL log lines, once each (what went wrong, in its words).
    worker_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problems(self) -> dict[str, list[str]]:
        """What is wrong, by kind: ``lost``, ``disagreeing``, ``twice``, ``unreported``, and
        ``unproven`` if the fault came when no run was unsettled (it proves nothing then)."""
        found: dict[str, list[str]] = {"lost": [], "disagreeing": [], "twice": [], "unreported": []}
        if self.unsettled_at_fault == 0:
            found["unproven"] = ["no run had started and not ended when the fault came"]
        for run in self.runs:
            record = f"{_history(run)}{run.record_error}"
            said = (
                f"{run.task_id} (Celery {run.celery_state}, record {record}, "
                f"body executed {run.executions}x)"
            )
            disagreement = self._disagreement(run) if run.celery_state in FINAL else ""
            if run.celery_state not in FINAL:
                found["lost"].append(f"{said}: message {run.message or 'gone from the broker'}")
            elif disagreement:
                found["disagreeing"].append(f"{said}: {disagreement}")
            if run.executions > 1:
                found["twice"].append(said)
            if (run.celery_state != "SUCCESS" or disagreement) and not run.reported:
                found["unreported"].append(f"{said}: no ERROR/WARNING line names it")
        return {kind: problems for kind, problems in found.items() if problems}

    def _disagreement(self, run: Run) -> str:
        record = run.record
        if record is None or record.state is None:
            return "no run record"
        if not record.state.is_final():
            return "the record is not final"
        if run.celery_state == "SUCCESS":
            if record.state.name != "Completed":
                return "Celery says SUCCESS"
            expected = expected_value(self.cell.kind, run.key, run.executions)
            if run.celery_result != expected:
                return f"Celery holds {run.celery_result}, the last execution gave {expected}"
            if self.cell.kind != "generator" and record.state.data != run.celery_result:
                return f"the record holds {record.state.data}, Celery {run.celery_result}"
        elif record.state.is_completed():
            return f"Celery says {run.celery_state}: {run.celery_result}"
        return ""

    def summary(self) -> str:
        problems = self.problems()
        states = [run.celery_state for run in self.runs]
        return (
            f"cell={self.cell.id} runs={len(self.runs)} succeeded={states.count('SUCCESS')} "
            f"failed={states.count('FAILURE')} lost={len(problems.get('lost', []))} "
            f"disagreeing={len(problems.get('disagreeing', []))} "
            f"executed_twice={len(problems.get('twice', []))} "
            f"unreported={len(problems.get('unreported', []))} "
            f"worker_exits={self.worker_exits} finished_at_fault={self.finished_at_fault} "
            f"unsettled_at_fault={self.unsettled_at_fault} "
            f"seconds={self.seconds:.1f}"
        )

    def report(self) -> str:
        """The problems, each run with the worker's log lines about it."""
        lines = [self.summary()]
        for kind, problems in self.problems().items():
            lines.append(f"{kind}:")
            lines += [f"  {problem}" for problem in problems]
        for run in self.runs:
            if run.reported:
                lines.append(f"worker log on {run.task_id}:")
                lines += [f"    {_gist(record, run.task_id)}" for record in run.reported[:3]]
        if self.worker_errors:
            lines.append("worker errors:")
            lines += [f"    {line[:300]}" for line in self.worker_errors[:12]]
        return "\n".join(lines)


def _history(run: Run) -> Any:
    return run.record.history_names() if run.record is not None else None


def run_cell(cell: Cell, workdir: Path) -> CellOutcome:
    """Run ``cell`` for real and collect what every run ended as."""
    outcome = CellOutcome(cell)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(redis_server(_mkdir(workdir / "broker")))
        backend = stack.enter_context(faulted_backend(FAULTS[cell.fault], workdir / "backend"))
        queue = f"matrix-{uuid.uuid4().hex[:8]}"
        app, tasks = make_matrix_app(
            f"{broker.url}/0", backend.url, queue, visibility_timeout=VISIBILITY_TIMEOUT
        )
        stack.callback(app.close)
        side = stack.enter_context(contextlib.closing(redis.Redis.from_url(f"{broker.url}/1")))
        queues = stack.enter_context(contextlib.closing(redis.Redis.from_url(f"{broker.url}/0")))
        worker = WorkerProcess(
            app,
            workdir,
            pool=cell.pool,
            concurrency=CONCURRENCY[cell.pool],
            app_module="tests.reliability.matrix_app",
            env={
                "MATRIX_SIDE_URL": f"{broker.url}/1",
                "RELIABILITY_BACKEND_URL": backend.worker_url,
            },
        )
        with workers(worker):
            _through_the_fault(outcome, getattr(tasks, cell.kind), worker, backend, side)
            _locate_messages(outcome.runs, queues, queue)  # before a warm shutdown requeues them
        _collect(outcome, app, backend, side, worker.log_text())
    outcome.seconds = time.monotonic() - started
    return outcome


def _through_the_fault(
    outcome: CellOutcome, task: Any, worker: WorkerProcess, backend: Backend, side: Any
) -> None:
    """Send the batch, break the backend while bodies run, heal it, wait for the runs."""
    fault = FAULTS[outcome.cell.fault]
    outcome.runs = _send(task)
    outcome.finished_at_fault, outcome.unsettled_at_fault = supervise(
        worker,
        lambda: _ready_for_the_fault(backend, side, outcome.runs),
        BATCH_TIMEOUT,
        f"{INJECT_AFTER} bodies to finish, and another to start, before the fault",
    )
    fault.inject(backend)
    time.sleep(FAULT_SECONDS)  # the rest of the batch runs into the fault
    fault.heal(backend)
    with contextlib.suppress(AssertionError):  # what never ends is reported as lost
        supervise(
            worker,
            _final_or_stalled(backend, outcome.runs),
            DRAIN_TIMEOUT,
            "every run to end after healing",
        )
    outcome.worker_exits = list(worker.exits)


def supervise(
    worker: WorkerProcess, condition: Callable[[], Any], timeout: float, what: str
) -> Any:
    """Wait for ``condition`` and return its value, starting the worker again if it exits, as
    a supervisor would."""

    def check() -> Any:
        worker.restart_if_exited()
        return condition()

    return wait_for(check, timeout, what, poll=0.1)


def _send(task: Any) -> list[Run]:
    """Send the batch; the AsyncResults go at once, while the backend they unsubscribe on is up."""
    runs = []
    for _ in range(RUNS):
        key = uuid.uuid4().hex
        runs.append(Run(key, task.delay(key, BODY_SECONDS).id))
    return runs


def _ready_for_the_fault(backend: Backend, side: Any, runs: list[Run]) -> tuple[int, int] | None:
    """``(finished, unsettled)`` once :data:`INJECT_AFTER` bodies finished and some run is
    unsettled (its body started, its Celery result not stored yet); else ``None``."""
    keys = [run.key for run in runs]
    started = side.mget([f"exec:{key}" for key in keys])
    finished = _count(side, "finished", keys)
    with backend.admin() as admin:  # read after the counters: unsettled still, at this moment
        unsettled = sum(
            1
            for run, count in zip(runs, started, strict=True)
            if count is not None and _meta(admin, run.task_id)[0] not in FINAL
        )
    return (finished, unsettled) if finished >= INJECT_AFTER and unsettled else None


def _count(side: Any, counter: str, keys: list[str]) -> int:
    values = side.mget([f"{counter}:{key}" for key in keys])
    return sum(int(value) for value in values if value is not None)


def _final_or_stalled(backend: Backend, runs: list[Run]) -> Callable[[], bool]:
    last = {"count": -1, "at": time.monotonic()}

    def check() -> bool:
        try:
            with backend.admin() as admin:
                count = sum(_meta(admin, run.task_id)[0] in FINAL for run in runs)
        except redis.RedisError:
            return False  # the backend is still coming back
        now = time.monotonic()
        if count != last["count"]:
            last.update(count=count, at=now)
        return count == len(runs) or now - last["at"] > STALL_SECONDS

    return check


def _meta(client: Any, task_id: str) -> tuple[str | None, Any]:
    raw = client.get(f"celery-task-meta-{task_id}")
    if raw is None:
        return None, None
    meta = json.loads(raw)
    return meta.get("status"), meta.get("result")


def _locate_messages(runs: list[Run], broker: Any, queue: str) -> None:
    queued = b"".join(broker.lrange(queue, 0, -1))
    unacknowledged = b"".join(broker.hvals("unacked"))
    for run in runs:
        needle = run.task_id.encode()
        run.message = (
            "queued" if needle in queued else "unacknowledged" if needle in unacknowledged else ""
        )


def _collect(outcome: CellOutcome, app: Any, backend: Backend, side: Any, log: str) -> None:
    records = [record for record in _log_records(log) if REPORTED.match(record)]
    with backend.admin() as admin:
        for run in outcome.runs:
            run.celery_state, run.celery_result = _meta(admin, run.task_id)
            run.executions = int(side.get(f"exec:{run.key}") or 0)
            run.record, run.record_error = _load_record(app, run.task_id)
            run.reported = [record for record in records if run.task_id in record]
    errors = (line for line in log.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", line))
    outcome.worker_errors = list(dict.fromkeys(_without_ids(line, outcome.runs) for line in errors))


def _gist(record: str, task_id: str) -> str:
    """A log record's header, and the line naming ``task_id`` if that is another one."""
    header, *rest = record.splitlines()
    naming = next((line.strip() for line in rest if task_id in line), "")
    return f"{header[:200]}{' ... ' + naming[:200] if naming else ''}"


def _log_records(log: str) -> list[str]:
    """The worker's log records: a line with a ``[time: LEVEL/process]`` header and the lines
    after it (a traceback), joined, so that a run id anywhere in a traceback counts."""
    records: list[str] = []
    for line in log.splitlines():
        if line.startswith("[") or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def _without_ids(line: str, runs: list[Run]) -> str:
    """``line`` without its timestamp and run ids, so that repeated errors show once."""
    line = re.sub(r"^\[[^\]]*: ", "[", line)
    for run in runs:
        line = line.replace(run.task_id, "<id>")
    return line


def _load_record(app: Any, task_id: str) -> tuple[Any, str]:
    for _attempt in range(3):  # the app's pooled connections may have died with the fault
        try:
            return get_task_run(task_id, app=app), ""
        except Exception as exc:
            error = f": reading it raised {exc!r}"
            time.sleep(0.2)
    return None, error


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
