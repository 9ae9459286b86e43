"""Which runs ``runs ls --task T --state S`` means, the same in every store.

A task is given in full (``shop.tasks.fetch_invoice``) or as its last dotted part
(``fetch_invoice``); a state by name (``TimedOut``) or type (``FAILED``), in any case, with
``-``, ``_`` and spaces ignored. Stores with an index keep the keys these functions compute.
"""

from __future__ import annotations

from celery_taskengine._engine.task_run import TaskRun

__all__ = ["run_matches", "short_task_name", "squash", "state_matches", "task_matches"]


def squash(text: str) -> str:
    """``text`` as state filters compare it: lower case, without ``-``, ``_`` and spaces."""
    return text.replace("-", "").replace("_", "").replace(" ", "").lower()


def short_task_name(task_name: str) -> str:
    """The last dotted part of a task name."""
    return task_name.rsplit(".", 1)[-1]


def task_matches(task_name: str | None, wanted: str) -> bool:
    """Whether ``task_name`` is ``wanted``, given in full or as its last dotted part."""
    if task_name is None:
        return False
    return task_name == wanted or short_task_name(task_name) == wanted


def state_matches(run: TaskRun, wanted: str) -> bool:
    """Whether the run's state has the name or type ``wanted``."""
    if run.state is None:
        return False
    target = squash(wanted)
    return target in (squash(run.state.name), squash(run.state.type.value))


def run_matches(run: TaskRun, task: str | None, state: str | None) -> bool:
    """Whether ``run`` passes both filters (``None``: no filter)."""
    return (task is None or task_matches(run.task_name, task)) and (
        state is None or state_matches(run, state)
    )
