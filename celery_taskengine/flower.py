"""Showing engine states in Flower, which builds its task list from Celery events only.

Engine states without a Celery twin go out as task events (``task-awaiting-retry``,
``task-retrying``, ``task-cached``, ``task-timed-out``, ...), so Flower shows them as task
states (``AWAITING-RETRY``, ``RETRYING``, ...) while they are current. A final Celery event
(``task-succeeded``/``task-failed``) then wins, as it must; to keep seeing *how* a task ended
(``Cached``, ``TimedOut``) and its attempt count, Flower must also show the events' extra
fields. Put this in the ``flowerconfig.py`` that ``celery flower --conf=...`` reads::

    from celery_taskengine.flower import show_engine_fields
    show_engine_fields()
"""

from __future__ import annotations

__all__ = ["ENGINE_FIELDS", "show_engine_fields"]

#: The event fields the engine adds: the engine state's name and the attempt number.
ENGINE_FIELDS = ("engine_state", "run_count")


def show_engine_fields() -> None:
    """Make Celery's event state (and so Flower's API and pages) carry the engine's fields."""
    from celery.events.state import Task

    for name in ENGINE_FIELDS:
        if name not in Task._fields:
            Task._fields = (*Task._fields, name)
        if not hasattr(Task, name):
            setattr(Task, name, None)  # plain Celery tasks have no such field: show None
