"""What the worker-death tests prove about each run of ``rel.work``, and their figures."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as NoResultInTime

from celery_taskengine._celery.producer import CachedResult
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import StateType
from tests.reliability.harness import counter, history_problems, load_run


@dataclass
class CommitFigures:
    """What happened to a batch of ``rel.work`` runs."""

    runs: int = 0
    #: Runs whose history shows a Crashed attempt (a kill landed in them).
    crashed_runs: int = 0
    #: Executions of a function body whose result was not the committed one: each was
    #: interrupted by a kill (before its commit) and shows up as a Crashed state.
    uncommitted_executions: int = 0
    #: Runs that ended Cached: their result had been committed by an attempt that was killed
    #: after the commit, and the continuing delivery read it back instead of running again.
    cached_after_crash: int = 0
    #: Runs whose message no worker received again after the last kill: kombu's Redis
    #: transport pops a message before it records it as unacknowledged, so a SIGKILL in
    #: between loses it for plain Celery tasks too (celery/celery#7950, celery/kombu#305);
    #: the first delivery or a redelivery after a crash, no engine code saw the lost copy.
    lost_by_broker: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"runs={self.runs} runs_with_crash={self.crashed_runs} "
            f"uncommitted_executions={self.uncommitted_executions} "
            f"cached_after_crash={self.cached_after_crash} "
            f"lost=0 duplicates_after_commit=0 lost_by_broker={len(self.lost_by_broker)}"
        )


def check_committed_once(
    app: Celery,
    tasks: Any,
    runs: list[tuple[str, float, Any]],
    timeout: float,
    worker_logs: Sequence[Path] = (),
) -> CommitFigures:
    """Check every ``(key, sleep, AsyncResult)`` of ``rel.work``; collect what is wrong.

    A run without a result within ``timeout`` (one wait for all the runs) is a problem, unless
    ``worker_logs`` (given where whole workers are SIGKILLed on a Redis broker) show that every
    receipt of its message started a body and its record shows the last attempt cut short: the
    copy restored after the last kill never reached a worker, and it is counted in
    ``lost_by_broker``.

    For each run, with ``exec`` the number of times its body started:

    - ``.get()`` returns a value, the record is final (Completed or Cached) with a legal history
      and holds that value: no run is lost;
    - the value names execution number ``exec``: no body ran after the one whose result was
      committed (a later one would have incremented ``exec``);
    - every other execution (``exec - 1``) was cut short by a kill before its commit, and
      each such kill is in the history as Crashed, followed by Retrying: the run continued;
    - calling again with the same inputs is answered from the committed record, with the same
      value, without running the body: exactly one committed result per input.
    """
    figures = CommitFigures(runs=len(runs))
    deadline = time.monotonic() + timeout  # for all of them: runs lost cost it once, not each
    for key, sleep, result in runs:
        try:
            value = result.get(timeout=max(1.0, deadline - time.monotonic()))
        except NoResultInTime as exc:
            run, executions = load_run(app, result.id), counter(app, f"exec:{key}")
            if worker_logs and _lost_after_a_kill(run, result.id, executions, worker_logs):
                figures.lost_by_broker.append(result.id)
                continue
            history = run.history_names() if run is not None else None
            meta = app.backend.get_task_meta(result.id)
            shown = {name: meta.get(name) for name in ("status", "result", "retries")}
            raise AssertionError(
                f"{key}: no result in {timeout:.0f} s; run {result.id}: record {history}, "
                f"Celery's meta {shown}, {executions} executions"
            ) from exc
        run = load_run(app, result.id)
        problems = history_problems(run, result.id)
        if run is None:
            figures.problems += problems
            continue
        names = run.history_names()
        executions = counter(app, f"exec:{key}")
        crashed = names.count("Crashed")
        if value.get("key") != key or value.get("execution") != executions:
            problems.append(f"{key}: value {value} but {executions} executions: {names}")
        if run.state is None or run.state.name not in ("Completed", "Cached"):
            problems.append(f"{key}: ended {names}")
        elif run.state.data != value:
            problems.append(f"{key}: record holds {run.state.data}, .get() gave {value}")
        if crashed < executions - 1:
            problems.append(f"{key}: {executions} executions, {crashed} Crashed: {names}")
        for before, after in itertools.pairwise(names):
            if before == "Crashed" and after != "Retrying":
                problems.append(f"{key}: Crashed not followed by Retrying: {names}")
        if run.run_count != 1 + crashed:
            problems.append(f"{key}: run_count {run.run_count} for {names}")
        if names[-1] == "Cached" and crashed == 0:
            problems.append(f"{key}: Cached without a crash: {names}")
        again = tasks.work.delay(key, sleep)
        if not isinstance(again, CachedResult) or again.get(timeout=timeout) != value:
            answer = again.get(timeout=timeout)
            problems.append(
                f"{key}: the committed record does not hold {value}: a second call gave "
                f"{answer} ({type(again).__name__}), after {names}"
            )
        if counter(app, f"exec:{key}") != executions:
            problems.append(f"{key}: calling again ran the body")
        figures.problems += problems
        figures.crashed_runs += crashed > 0
        figures.uncommitted_executions += executions - 1
        figures.cached_after_crash += names[-1] == "Cached"
    return figures


def _lost_after_a_kill(
    run: TaskRun | None, run_id: str, executions: int, worker_logs: Sequence[Path]
) -> bool:
    """Whether the message can only have been lost by the broker: every receipt started a
    body, and the run's record shows its last attempt cut short (or no attempt at all), so a
    kill ended the last delivery and the copy restored after it never reached a worker."""
    cut_short = run is None or run.state is None or run.state.type is StateType.RUNNING
    return cut_short and receipts(run_id, worker_logs) <= executions


def receipts(run_id: str, worker_logs: Sequence[Path]) -> int:
    """How many times workers received ``run_id``'s message: Celery logs each message it
    receives at INFO (``Task name[id] received``), once kombu recorded it as unacknowledged."""
    marker = f"[{run_id}] received"
    return sum(
        1
        for log in worker_logs
        for line in log.read_text(errors="replace").splitlines()
        if marker in line
    )
