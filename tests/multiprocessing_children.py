"""A script that makes local runs in fork-started ``multiprocessing`` children, as a user's
program would: ``python -m tests.multiprocessing_children BROKER BACKEND RUN_ID...``.

Each child makes one local run with the given id and returns, so ``multiprocessing`` ends it
through ``os._exit`` (no ``atexit``). Prints the children's exit codes as JSON. Run in a fresh
interpreter: a test process holds kombu connections earlier tests left, and kombu closes those
in every forked child (a consumer's channel waits there on a reply that never comes).
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import sys

from celery import Celery

from celery_taskengine import task
from celery_taskengine.task_engine import run_task_sync


def main(broker: str, backend: str, run_ids: list[str]) -> int:
    app = Celery("children", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    echo = task(app=app, name="channel.child")(lambda x: x)

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
