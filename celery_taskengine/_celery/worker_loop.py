"""One long-lived event loop per worker process, for ``async def`` tasks.

Celery calls task bodies synchronously, in whatever thread the pool uses (a prefork child's main
thread, a threads-pool thread, the solo worker's thread). Running each coroutine with
``asyncio.run`` would give every task a fresh loop and break loop-bound resources (async
database pools, HTTP clients) between tasks. Instead each process gets one loop, running on a
daemon thread, and pool threads hand coroutines to it (``run_coroutine_threadsafe``, cheap
next to a new loop per task). The loop is created lazily and again after a fork (checked with
``os.getpid()``), so a prefork parent never hands its loop to its children.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_on_worker_loop", "worker_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def worker_loop() -> asyncio.AbstractEventLoop:
    """This process's task loop, started on first use (and again in a forked child)."""
    global _loop, _loop_pid
    loop = _loop
    if loop is not None and _loop_pid == os.getpid() and loop.is_running():
        return loop
    with _lock:
        if _loop is None or _loop_pid != os.getpid() or not _loop.is_running():
            _loop = _start_loop()
            _loop_pid = os.getpid()
        return _loop


def run_on_worker_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on this process's task loop and wait for it, from any other thread.

    If the waiting thread is interrupted (a ``SystemExit`` from a worker shutdown, say), the
    coroutine is cancelled rather than left running unseen.
    """
    # The coroutine runs in a copy of the caller's context (the loop's handle copies it in
    # this thread): the delivery's context variables reach it (see celery_request).
    future = asyncio.run_coroutine_threadsafe(coroutine, worker_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()

    threading.Thread(target=run, name=f"taskengine-loop-{os.getpid()}", daemon=True).start()
    started.wait()
    return loop
