"""The README's Django recipe, for real: a minimal Django project in a temporary directory.

django-celery-results keeps Celery's results in the project's database (``django-db``), and
``CELERY_TASKENGINE_STORE`` points the engine at that same database (SQLite, a file of the
test's own). A real ``celery worker`` (prefork, 2 processes) runs the project's engine tasks;
a producer process, set up as Django sets itself up, checks ``.delay().get()``, a cache hit
answered from the shared store in the worker, a producer-side hit, and ``get_task_run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.deployments.workers import _stop

pytestmark = pytest.mark.timeout(180)

SETTINGS = """
SECRET_KEY = "not-a-secret"
INSTALLED_APPS = ["django_celery_results"]
DATABASES = {{"default": {{
    "ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}, "OPTIONS": {{"timeout": 30}},
}}}}
USE_TZ = True
CELERY_BROKER_URL = {broker!r}
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASKENGINE_STORE = {store!r}
CELERY_TASK_DEFAULT_QUEUE = {queue!r}
CELERY_IMPORTS = ["shop.tasks"]
"""

CELERY_MODULE = """
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
"""

TASKS = """
import os

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS
from proj.celery import app


@task(app=app, name="shop.add")
def add(x: int, y: int) -> int:
    return x + y


@task(app=app, name="shop.square", cache_policy=INPUTS)
def square(x: int) -> dict:
    return {"value": x * x, "pid": os.getpid()}
"""

PRODUCER = """
import json

import django

django.setup()

from celery_taskengine import get_task_run  # noqa: E402
from proj.celery import app  # noqa: E402
from shop.tasks import add, square  # noqa: E402

out = {}
result = add.delay(2, 3)
out["sum"] = result.get(timeout=60)
run = get_task_run(result.id, app=app)
out["add_run"] = None if run is None else run.state.name
computed = square.delay(7)
out["computed"] = computed.get(timeout=60)
# Sent past the producer's cache check: a worker process answers from the shared store.
in_worker = app.send_task("shop.square", (7,))
out["worker_hit"] = in_worker.get(timeout=60)
run = get_task_run(in_worker.id, app=app)
out["worker_hit_run"] = None if run is None else run.state.name
at_producer = square.delay(7)
out["producer_hit_type"] = type(at_producer).__name__
out["producer_hit"] = at_producer.get(timeout=10)
print(json.dumps(out))
"""


def _write_project(root: Path, broker: str, queue: str) -> None:
    db = str(root / "db.sqlite3")
    files = {
        "proj/__init__.py": "",
        "proj/settings.py": SETTINGS.format(
            db=db, broker=broker, store=f"sqlite:///{db}", queue=queue
        ),
        "proj/celery.py": CELERY_MODULE,
        "shop/__init__.py": "",
        "shop/tasks.py": TASKS,
        "produce.py": PRODUCER,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def _env(root: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "proj.settings", "PYTHONPATH": path}


def test_a_django_project_keeps_results_and_the_engines_store_in_its_database(
    tmp_path: Path, redis_url: str
) -> None:
    for module in ("django", "django_celery_results"):
        try:
            __import__(module)
        except ImportError:
            skip_or_fail(f"{module} is not installed (the test extra has it)")
    queue = f"cte-django-{uuid.uuid4().hex[:10]}"
    _write_project(tmp_path, redis_url, queue)
    env = _env(tmp_path)
    migrate = [sys.executable, "-m", "django", "migrate", "-v", "0", "django_celery_results"]
    subprocess.run(migrate, cwd=tmp_path, env=env, check=True, timeout=120)
    log = (tmp_path / "worker.log").open("wb")  # a file: a pipe nobody reads could fill
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "proj", "worker", "-P", "prefork", "-c", "2",
         "-l", "warning", "-Q", queue, "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-n", f"{queue}@%h"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        produced = subprocess.run(
            [sys.executable, "produce.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
    finally:
        _stop(worker)
        log.close()
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert produced.returncode == 0, produced.stderr[-3000:] + "\nworker:\n" + worker_log[-3000:]
    out = json.loads(produced.stdout.strip().splitlines()[-1])
    assert out["sum"] == 5
    assert out["add_run"] == "Completed"  # get_task_run from the producer
    assert out["computed"]["value"] == 49
    assert out["worker_hit"] == out["computed"]  # answered from the record, not run again
    assert out["worker_hit_run"] == "Cached"
    assert out["producer_hit_type"] == "CachedResult"
    assert out["producer_hit"] == out["computed"]
