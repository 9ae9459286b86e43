"""What is true while a task function runs: the current run, and where ``print`` goes.

``log_prints`` is done by a ``print`` that consults a context variable, so it is safe with
threads and event loops (redirecting ``sys.stdout`` would capture every thread's output).
"""

from __future__ import annotations

import builtins
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery_taskengine.task_run import TaskRun

__all__ = ["current_task_run", "run_scope"]

print_logger = logging.getLogger("celery_taskengine.task_runs")

_current_run: ContextVar[TaskRun | None] = ContextVar("taskengine_run", default=None)
_prints_to_log: ContextVar[TaskRun | None] = ContextVar("taskengine_log_prints", default=None)
_builtin_print = builtins.print


def current_task_run() -> TaskRun | None:
    """The run whose function is executing in this context, if any."""
    return _current_run.get()


@contextmanager
def run_scope(run: TaskRun, *, log_prints: bool = False) -> Iterator[None]:
    """Make ``run`` current (and route prints to the log) for the duration of one call."""
    run_token = _current_run.set(run)
    print_token = _prints_to_log.set(run if log_prints else None)
    if log_prints:
        _install_print()
    try:
        yield
    finally:
        _prints_to_log.reset(print_token)
        _current_run.reset(run_token)


def _print(*args: Any, **kwargs: Any) -> None:
    run = _prints_to_log.get()
    if run is None or kwargs.get("file") not in (None,):
        _builtin_print(*args, **kwargs)
        return
    buffer = io.StringIO()
    _builtin_print(*args, **{**kwargs, "file": buffer})
    print_logger.info("%s: %s", run.id, buffer.getvalue().rstrip("\n"))


def _install_print() -> None:
    if builtins.print is not _print:
        builtins.print = _print
