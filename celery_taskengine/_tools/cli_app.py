"""The command line's Celery app, found as ``celery -A`` finds it, and its one kind of error."""

from __future__ import annotations

import os

from celery import Celery
from celery.app.utils import find_app

__all__ = ["APP_ENV_VAR", "CommandError", "load_app"]

#: The environment variable naming the app when ``-A`` is not given.
APP_ENV_VAR = "CELERY_TASKENGINE_APP"


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def load_app(spec: str | None) -> Celery:
    """The Celery app named by ``spec`` (else ``$CELERY_TASKENGINE_APP``), found as ``celery -A``.

    Raises :class:`CommandError` when no app is named or it cannot be loaded.
    """
    spec = spec or os.environ.get(APP_ENV_VAR)
    if not spec:
        raise CommandError(
            f"no Celery app given: pass -A/--app (e.g. -A proj or -A proj.celery:app) "
            f"or set {APP_ENV_VAR}"
        )
    try:
        app = find_app(spec)
    except Exception as exc:  # an import runs user code: anything may come out of it
        raise CommandError(
            f"cannot load the Celery app {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(app, Celery):
        raise CommandError(f"{spec!r} is a {type(app).__name__}, not a Celery app")
    return app
