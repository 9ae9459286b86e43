"""Celery's integration tests, taken from the source distribution of the installed Celery.

Nothing of Celery's test code lives in this repository: the sdist of the exact installed
version is downloaded once with pip (``pip download celery==X --no-binary :all:``) into a
cache directory, and the files the suite needs are extracted from it into a work directory
the inner pytest run imports them from (as the package ``t``, the name Celery's tests use).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

__all__ = ["SUITE_FILES", "cache_dir", "celery_version", "prepare"]

ROOT = Path(__file__).resolve().parents[2]
#: The files of Celery's source tree the suite runs: its two test modules, their tasks and
#: conftest, and the helpers they import.
SUITE_FILES = (
    "pyproject.toml",  # Celery's pytest settings (test classes are named ``test_*``)
    "t/__init__.py",
    "t/canvas_helpers.py",
    "t/integration/__init__.py",
    "t/integration/conftest.py",
    "t/integration/tasks.py",
    "t/integration/test_tasks.py",
    "t/integration/test_canvas.py",
)


def celery_version() -> str:
    return version("celery")


def cache_dir() -> Path:
    """Where sdists and work directories are kept: ``CELERY_SDIST_CACHE`` or ``.venv/``."""
    configured = os.environ.get("CELERY_SDIST_CACHE")
    return Path(configured) if configured else ROOT / ".venv" / "celery-sdist"


def _sdist(release: str) -> Path:
    """The sdist of Celery ``release``, downloaded into the cache the first time."""
    cache = cache_dir()
    archive = cache / f"celery-{release}.tar.gz"
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", f"celery=={release}",
            "--no-deps", "--no-binary", ":all:", "--dest", str(cache), "--quiet",
        ]  # fmt: skip
        subprocess.run(command, check=True, timeout=600)
    if not archive.exists():
        raise FileNotFoundError(f"pip did not leave {archive}")
    return archive


def prepare() -> Path:
    """A work directory holding Celery's suite files as the package ``t``, and Celery's
    pytest settings (made once per version); run the inner pytest there."""
    release = celery_version()
    work = cache_dir() / f"suite-{release}"
    if all((work / name).exists() for name in SUITE_FILES):
        return work
    archive = _sdist(release)
    prefix = f"celery-{release}/"
    with tarfile.open(archive) as tar:
        for name in SUITE_FILES:
            member = tar.getmember(prefix + name)
            source = tar.extractfile(member)
            if source is None:
                raise FileNotFoundError(f"{name} is not a file in {archive}")
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    return work
