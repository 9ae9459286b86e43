"""Every test of Celery's suite the harness leaves out, with the reason (read by plugin.py).

Keys are test ids relative to Celery's ``t/integration/`` (``test_tasks.py::test_tasks::
test_wrong_arguments``); a class id leaves out the whole class, an id without its
``[parameters]`` every parametrization.
"""

from __future__ import annotations

#: Left out in every run, plain tasks and engine tasks alike: they fail here with plain tasks.
LEFT_OUT: dict[str, str] = {
    "test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_0": (
        "a race in the test: its task_received handler runs in the session worker's consumer "
        "thread and may set the flag before the test resets it right after .delay(); fails "
        "with plain tasks on this machine too (2 of 3 runs alone)"
    ),
    "test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": (
        "22 canvases of sleeping(2)/sleeping(4) tasks on the session worker's single process "
        "within a 20 s pytest timeout: times out with plain tasks on this machine too"
    ),
}

#: Left out only where Celery's tasks are engine tasks.
LEFT_OUT_WITH_ENGINE_TASKS: dict[str, str] = {
    "test_tasks.py::test_tasks::test_retry": (
        "reads result.status during the retry wait and expects Celery's RETRY; an engine task's "
        "backend state is the engine's (RUNNING, then AWAITING_RETRY with the exception: SPEC "
        "section 7, issue #14). With those names the rest of the test passes"
    ),
    "test_tasks.py::test_tasks::test_retry_with_unpickleable_exception": (
        "reads result.status during the retry wait and expects Celery's RETRY; an engine task's "
        "backend state is the engine's (RUNNING, then AWAITING_RETRY with the exception: SPEC "
        "section 7, issue #14). With those names the rest of the test passes"
    ),
}

#: Celery's tasks the plugin keeps plain although the engine accepts their options: their
#: body uses an idiom an engine task refuses (README, "Migrating from Celery").
KEPT_PLAIN: dict[str, str] = {
    "t.integration.tasks.retry_with_args_after_kwargs": (
        "self.retry(args=...) retries with other arguments; an engine run keeps its "
        "parameters (its record and cache key), so the engine refuses it"
    ),
    "t.integration.tasks.retry_with_kwargs_after_args": (
        "self.retry(kwargs=...) retries with other arguments; an engine run keeps its "
        "parameters (its record and cache key), so the engine refuses it"
    ),
}

#: Left out on one broker (``redis`` or ``amqp``), whatever the tasks.
LEFT_OUT_ON: dict[str, dict[str, str]] = {"redis": {}, "amqp": {}}
