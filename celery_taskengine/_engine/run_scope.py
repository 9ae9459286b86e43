"""What is true while a task function runs: the current run, and where ``print`` goes.

``log_prints`` is done by a ``print`` that consults a context variable, so it is safe with
threads and event loops (redirecting ``sys.stdout`` would capture every thread's output).
"""

from __future__ import annotations

import builtins
import io
import logging
from contextvars import ContextVar, Token
from typing import Any

from celery_taskengine._engine.task_run import TaskRun

__all__ = ["current_task_run", "run_scope"]

print_logger = logging.getLogger("celery_taskengine.task_runs")

_current_run: ContextVar[TaskRun | None] = ContextVar("taskengine_run", default=None)
_prints_to_log: ContextVar[TaskRun | None] = ContextVar("taskengine_log_prints", default=None)
_builtin_print = builtins.print


def current_task_run() -> TaskRun | None:
    """The run whose function is executing in this context, if any."""
    return _current_run.get()


class run_scope:
    """Make ``run`` current (and route prints to the log) for the duration of one call.

    A plain class rather than ``@contextmanager``: it is entered on every attempt.
    """

    __slots__ = ("_log_prints", "_print_token", "_run", "_run_token")
    _run_token: Token[TaskRun | None]
    _print_token: Token[TaskRun | None]

    def __init__(self, run: TaskRun, *, log_prints: bool = False) -> None:
        self._run = run
        self._log_prints = log_prints

    def __enter__(self) -> None:
        self._run_token = _current_run.set(self._run)
        if self._log_prints:
            _install_print()
            self._print_token = _prints_to_log.set(self._run)

    def __exit__(self, *exc_info: object) -> None:
        if self._log_prints:
            _prints_to_log.reset(self._print_token)
        _current_run.reset(self._run_token)


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
