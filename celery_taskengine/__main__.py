"""``python -m celery_taskengine``: the same command line as ``celery-taskengine``."""

from __future__ import annotations

from celery_taskengine._tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
