"""The pytest plugin of the inner run: Celery's tasks as engine tasks, tests left out, a report.

Loaded with ``-p tests.celery_suite.plugin`` before Celery's conftest imports its tasks module.
With ``CTE_CELERY_SUITE_TASKS=engine``, ``celery.shared_task`` is replaced by a decorator that
makes each task an engine task (``celery_taskengine.task`` with the same options) on every app,
as ``shared_task`` does, wherever the engine accepts the task's options; a task whose options
the engine refuses stays a plain Celery task, and the report says which and why. With
``plain`` Celery's tasks are left as they are (the baseline).

Tests listed in :mod:`tests.celery_suite.left_out` are skipped with their reason. The outcome
of every test and the tasks substituted go to the JSON file ``CTE_CELERY_SUITE_REPORT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import celery
import pytest
from celery import Celery
from celery import _state as celery_state
from celery.local import Proxy

import celery_taskengine
from tests.celery_suite import left_out

TASKS = os.environ.get("CTE_CELERY_SUITE_TASKS", "engine")
BROKER = os.environ.get("CTE_CELERY_SUITE_BROKER", "redis")
REPORT = os.environ.get("CTE_CELERY_SUITE_REPORT")

_engine_tasks: list[str] = []
_plain_tasks: dict[str, str] = {}
_outcomes: dict[str, str] = {}
_celery_shared_task = celery.shared_task
#: Validates a task's options without registering it anywhere Celery's tests look.
_probe_app = Celery("cte-suite-probe", set_as_current=False)


def engine_shared_task(*args: Any, **options: Any) -> Any:
    """``shared_task`` making engine tasks: ``@shared_task`` and ``@shared_task(**options)``."""
    if len(args) == 1 and callable(args[0]) and not options:
        return _shared(args[0], {})
    return lambda fun: _shared(fun, options)


def _shared(fun: Callable[..., Any], options: dict[str, Any]) -> Any:
    name = options.get("name") or f"{fun.__module__}.{fun.__name__}"
    try:
        celery_taskengine.task(app=_probe_app, **options)(fun)
    except (TypeError, ValueError) as refused:
        _plain_tasks[name] = str(refused)
        return _celery_shared_task(**options)(fun)
    _engine_tasks.append(name)

    def build(app: Celery) -> Any:
        return celery_taskengine.task(app=app, **options)(fun)

    celery_state.connect_on_app_finalize(build)
    for app in celery_state._get_active_apps():
        if app.finalized:
            with app._finalize_mutex:
                build(app)

    def current() -> Any:
        app = celery_state.get_current_app()
        return app.tasks[options.get("name") or app.gen_task_name(fun.__name__, fun.__module__)]

    return Proxy(current)


if TASKS == "engine":
    celery.shared_task = engine_shared_task


def _reason(nodeid: str) -> str | None:
    """Why ``nodeid`` is left out in this run, if it is."""
    short = nodeid.removeprefix("t/integration/")
    tables = [left_out.LEFT_OUT, left_out.LEFT_OUT_ON.get(BROKER, {})]
    if TASKS == "engine":
        tables.append(left_out.LEFT_OUT_WITH_ENGINE_TASKS)
    base = short.split("[", 1)[0]
    for table in tables:
        for key, reason in table.items():
            if short == key or base == key or short.startswith(key + "::"):
                return reason
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = _reason(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"left out: {reason}"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The test's outcome: its call's, unless setup or teardown did not pass (an error)."""
    settled = _outcomes.get(report.nodeid) in ("failed", "error")
    if (report.when == "call" or report.outcome != "passed") and not settled:
        failed = "failed" if report.when == "call" else "error"
        _outcomes[report.nodeid] = report.outcome if report.outcome != "failed" else failed


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT is None:
        return
    document = {
        "tasks": TASKS,
        "broker": BROKER,
        "engine_tasks": sorted(_engine_tasks),
        "plain_tasks": dict(sorted(_plain_tasks.items())),
        "outcomes": dict(sorted(_outcomes.items())),
    }
    with open(REPORT, "w") as out:
        json.dump(document, out, indent=1)
