"""Engine tasks defined without an app: registered with every app, resolved when used.

``@task`` without ``app=`` is Celery's ``@shared_task`` pattern (a reusable library's tasks,
imported before the project's app exists): every app registers the task when it is finalized
(a worker of any app knows it), and the decorated name is a proxy that resolves to the task
of the current app each time it is used. Until an app exists the current app is Celery's
unconfigured fallback app; a local run works there, but publishing from it is refused
(:func:`refuse_unconfigured_default`) instead of going to ``amqp://guest@localhost//``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from celery import Celery
from celery import _state as celery_state
from celery.local import Proxy

from celery_taskengine._celery.options import TaskOptions
from celery_taskengine.errors import ConfigurationError

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task

__all__ = ["is_unconfigured_default", "refuse_unconfigured_default", "shared_task"]

#: The latest definition under each name: re-decorating a name replaces it, as for ``app=``.
_definitions: dict[str, _Definition] = {}
_lock = threading.Lock()


class _Definition:
    """One decorated function, and the task built from it for each app."""

    def __init__(
        self,
        fn: Callable[..., Any],
        options: TaskOptions,
        celery_options: dict[str, Any],
        name: str | None,
        bind: bool,
        base: type[Task] | None,
        build: Callable[..., Task],
    ) -> None:
        self.build = build
        self.fn = fn
        self.base = base
        self.options = options
        self.celery_options = celery_options
        self.name = name
        self.bind = bind
        self.tasks: weakref.WeakKeyDictionary[Celery, Task] = weakref.WeakKeyDictionary()

    def for_app(self, app: Celery) -> Task:
        """This definition's task in ``app``, built and registered on first use."""
        found = self.tasks.get(app)
        if found is not None:
            return found
        name = self.name or app.gen_task_name(
            self.fn.__name__, getattr(self.fn, "__module__", None) or "__main__"
        )
        built = self.build(
            app, self.fn, self.options, self.celery_options, name=name, register=True,
            bind=self.bind, base=self.base,
        )  # fmt: skip
        self.tasks[app] = built
        return built

    def current(self) -> Task:
        """The task of the current app (Celery's rule, as for ``@shared_task``)."""
        return self.for_app(celery_state.get_current_app())


def shared_task(
    fn: Callable[..., Any],
    options: TaskOptions,
    celery_options: dict[str, Any],
    *,
    name: str | None,
    bind: bool,
    base: type[Task] | None = None,
    build: Callable[..., Task],
) -> Task:
    """Register ``fn`` with every app, now (finalized apps) and later (apps yet to finalize);
    a proxy to the current app's task. ``build`` makes the task for one app (``task.build_task``,
    passed in: that module imports this one)."""
    definition = _Definition(fn, options, celery_options, name, bind, base, build)
    key = name or f"{getattr(fn, '__module__', '__main__')}.{fn.__qualname__}"
    with _lock:
        _definitions[key] = definition
    for app in list(celery_state._get_active_apps()):
        if app.finalized:
            with app._finalize_mutex:
                definition.for_app(app)
    return cast("Task", Proxy(definition.current))


def _register_all(app: Celery) -> None:
    """Celery calls this when an app is finalized: it takes every shared engine task."""
    with _lock:
        definitions = list(_definitions.values())
    for definition in definitions:
        definition.for_app(app)


celery_state.connect_on_app_finalize(_register_all)


def is_unconfigured_default(app: Celery) -> bool:
    """Whether ``app`` is the app Celery makes up when none was created, left unconfigured."""
    return (
        app is celery_state.default_app
        and app.main == "default"
        and not app.set_as_current
        and not app.conf.broker_url
    )


def refuse_unconfigured_default(task: Task) -> None:
    """Raise ``ConfigurationError`` rather than publish ``task`` through Celery's made-up app
    (its broker would be ``amqp://guest@localhost//`` and no worker would know the task)."""
    if task.app is celery_state.default_app and is_unconfigured_default(task.app):
        raise ConfigurationError(
            f"task {task.name!r} has no Celery app to send it with: it was defined without "
            "app= and no app is current in this thread; create your Celery app before "
            "sending (call app.set_default() for other threads) or pass app= to @task"
        )
