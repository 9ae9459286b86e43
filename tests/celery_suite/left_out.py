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

#: Left out on one broker (``redis`` or ``amqp``), whatever the tasks.
LEFT_OUT_ON: dict[str, dict[str, str]] = {"redis": {}, "amqp": {}}
