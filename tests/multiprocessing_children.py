"""A script that makes local runs in fork-started ``multiprocessing`` children, as a user's
program would: ``python -m tests.multiprocessing_children SETTINGS_JSON RUN_ID...``.

The app is ``Celery(...)`` with ``SETTINGS_JSON`` as its configuration (broker and backend,
or ``taskengine_store``). Each child makes one local run with the given id and returns, so
``multiprocessing`` ends it through ``os._exit`` (no ``atexit``). Prints the children's exit
codes as JSON. Run in a fresh interpreter: a test process holds kombu connections earlier
tests left, and kombu closes those in every forked child (a consumer's channel waits there on
a reply that never comes), which says nothing about the engine.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

from celery import Celery

from celery_taskengine import task
from celery_taskengine.task_engine import run_task_sync


def main(settings: dict[str, object], run_ids: list[str]) -> int:
    app = Celery("children", set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    app.conf.update(settings)
    echo = task(app=app, name="children.echo")(lambda x: x)

    def child(run_id: str) -> None:
        run_task_sync(echo, run_id, parameters={"x": 1})  # then exits through os._exit

    context = multiprocessing.get_context("fork")
    children = [context.Process(target=child, args=(run_id,)) for run_id in run_ids]
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where, on stderr
    for process in children:
        process.start()
    for process in children:
        process.join(30)
    print(json.dumps([process.exitcode for process in children]))
    return 0


def run_children(settings: dict[str, object], run_ids: list[str]) -> None:
    """Run this script in a fresh interpreter; every child must exit with 0."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.multiprocessing_children", json.dumps(settings), *run_ids],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0] * len(run_ids), done.stderr


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]), sys.argv[2:]))
