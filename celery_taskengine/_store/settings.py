"""What an app's configuration says about its store: the ``taskengine_store`` setting and the
defaults every store shares (the key namespace, how long run records live)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery_taskengine.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_RUN_EXPIRES",
    "configured_store_url",
    "count_setting",
    "run_expiry_seconds",
]

DEFAULT_NAMESPACE = "default"
#: Seconds a run record lives when the app gives no ``result_expires`` (Celery's default, 1 day).
DEFAULT_RUN_EXPIRES = 86_400.0


def configured_store_url(app: Celery) -> str | None:
    """The app's ``taskengine_store`` setting (``CELERY_TASKENGINE_STORE`` under Django's
    settings namespace), or ``None`` when the store follows the result backend."""
    setting = app.conf.get("taskengine_store")
    if setting is None or setting == "":
        return None
    if not isinstance(setting, str):
        raise ConfigurationError(f"taskengine_store must be a URL string, got {setting!r}")
    return setting


def run_expiry_seconds(expires: Any) -> float | None:
    """``result_expires`` in seconds: a timedelta or a number; ``None`` or 0 means never."""
    if expires is None:
        return None
    seconds = expires.total_seconds() if isinstance(expires, timedelta) else float(expires)
    return seconds if seconds > 0 else None


def count_setting(conf: Any, name: str, default: int) -> int:
    """The app's setting ``name``: a whole number, 0 or more (``default`` when unset)."""
    value = conf.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, got {value!r}")
    return value
