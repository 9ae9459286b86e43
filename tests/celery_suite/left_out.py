"""Every test of Celery's suite the harness leaves out, with the reason (read by plugin.py).

Keys are test ids relative to Celery's ``t/integration/`` (``test_tasks.py::test_tasks::
test_wrong_arguments``); a class id leaves out the whole class, an id without its
``[parameters]`` every parametrization.
"""

from __future__ import annotations

#: Left out in every run, plain tasks and engine tasks alike.
LEFT_OUT: dict[str, str] = {}

#: Left out only where Celery's tasks are engine tasks.
LEFT_OUT_WITH_ENGINE_TASKS: dict[str, str] = {}

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
