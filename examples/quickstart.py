"""The embedded quickstart, runnable with no Redis: ``python examples/quickstart.py``.

It is :mod:`celery_taskengine._tools.demo` (also ``celery-taskengine demo`` and ``make demo``): an
in-process worker on kombu's in-memory broker, a retry with backoff, a cache hit and a
timeout, each printed as a timeline of the states its run went through.
"""

from __future__ import annotations

from celery_taskengine._tools import demo

if __name__ == "__main__":
    raise SystemExit(demo.main())
