"""The run index on Redis, so that ``runs ls --task T --state S --limit N`` reads about N runs,
not every run record.

Beside the run records (``<prefix>run:<id>``) the store keeps sorted sets scored by the time
of each run's last recorded change (UNIX milliseconds)::

    <prefix>index:all             every run
    <prefix>index:task:<name>     the runs of one task (full name)
    <prefix>index:state:<type>    the runs last seen in one state type (``failed``, ...)
    <prefix>index:tasks           a set of the task names seen, to resolve short names

Every writer of a run record also indexes it: inside its own script (:func:`index_call`), with
:data:`INDEX_LUA` as a command of its own, or, for many runs at once, with
:mod:`~._store.record_batch`'s script: the run is added or moved to the front, and entries
older than a run record's lifetime are trimmed. A state entry goes stale when its run moves
on to another state; a listing checks each document it reads and drops the entries that no
longer match (and those whose record has expired), so stale entries cost a listing once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.run_filters import run_matches, short_task_name, squash

__all__ = ["INDEX_FN", "INDEX_LUA", "RunIndex", "index_call", "list_indexed", "state_types_for"]

#: Adds a run to the index and names its task in the set of task names; when asked, trims
#: entries older than a run record's lifetime and extends the index's lifetime.
INDEX_FN = """
local function index_run(all, task, state, tasks, run_id, score, oldest, ttl, task_name)
  for _, key in ipairs({all, task, state}) do
    redis.call('zadd', key, score, run_id)
    if oldest ~= '' then redis.call('zremrangebyscore', key, '-inf', '(' .. oldest) end
    if ttl ~= '' then redis.call('pexpire', key, ttl) end
  end
  redis.call('sadd', tasks, task_name)
  if ttl ~= '' then redis.call('pexpire', tasks, ttl) end
end
"""


def index_call(first_key: int, first_arg: int) -> str:
    """The Lua line indexing a run whose index KEYS and ARGV (:meth:`RunIndex.for_run`) start
    at ``KEYS[first_key]`` and ``ARGV[first_arg]`` of a run record's own script (which includes
    :data:`INDEX_FN`): the record and its index entry are then one command."""
    keys = ", ".join(f"KEYS[{first_key + i}]" for i in range(4))
    args = ", ".join(f"ARGV[{first_arg + i}]" for i in range(5))
    return f"index_run({keys}, {args})\n"


#: KEYS: all, task, state, tasks. ARGV: run id, score (ms), oldest score kept ('' for none),
#: ttl ms ('' for none), task name.
INDEX_LUA = INDEX_FN + index_call(1, 1) + "return 1\n"
#: One index write in this many trims the entries of expired runs.
TRIM_EVERY = 64
#: (task, state) pairs whose refresh a process remembers; beyond that it starts over.
_MAX_REFRESHED = 4096

#: State names the engine uses, by the type they belong to (squashed, as filters are).
_TYPE_OF_NAME = {
    "pending": "pending",
    "notready": "pending",
    "running": "running",
    "retrying": "running",
    "completed": "completed",
    "cached": "completed",
    "failed": "failed",
    "timedout": "failed",
    "cancelled": "cancelled",
    "crashed": "crashed",
    "scheduled": "scheduled",
    "awaitingretry": "scheduled",
}


def state_types_for(wanted: str) -> str | None:
    """The state type a ``--state`` filter (a name or a type) falls in; ``None`` if unknown."""
    return _TYPE_OF_NAME.get(squash(wanted))


class RunIndex:
    """Reading and writing the index under ``prefix`` (the store's key prefix)."""

    def __init__(self, prefix: str, run_expires: float | None) -> None:
        self.prefix = prefix
        self.run_expires = run_expires
        self._writes = 0
        #: Monotonic time this process last refreshed the keys of a (task, state key).
        self._refreshed: dict[tuple[str, str], float] = {}

    def upkeep(self, now_ms: int, written: tuple[str, str] | None = None) -> tuple[str, str]:
        """The oldest score an index write keeps (``''``: no trim this time) and the lifetime
        in ms it gives the index's keys (``''``: none this time).

        One write in :data:`TRIM_EVERY` trims entries older than a run record's lifetime. The
        keys live twice a run record's lifetime from their last refresh; the write of one run
        (``written``: its task and state key) refreshes them only if this process has not done
        so in the last half of a record's lifetime. So every entry outlives its record, and a
        plain write is three ``ZADD`` and a ``SADD`` (refreshing on every write cost four
        commands more). Keys lost with a server's data get their lifetime back at a later
        refresh; the set of task names is written every time, so listings by task never miss
        a run written since.
        """
        if self.run_expires is None:
            return "", ""
        self._writes += 1
        lifetime = int(self.run_expires * 1000)
        oldest = str(now_ms - lifetime) if self._writes % TRIM_EVERY == 1 else ""
        refresh = written is None or self._due(written, self.run_expires / 2)
        return oldest, str(2 * lifetime) if refresh else ""

    def _due(self, written: tuple[str, str], period: float) -> bool:
        """Whether the index keys of ``written`` are due a refresh from this process."""
        now = time.monotonic()
        last = self._refreshed.get(written)
        if last is not None and now - last < period:
            return False
        if len(self._refreshed) >= _MAX_REFRESHED:
            self._refreshed.clear()
        self._refreshed[written] = now
        return True

    def for_run(self, run: TaskRun, now: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of :data:`INDEX_LUA` for ``run`` as it is now (see :meth:`entry`)."""
        state_key, score_ms = self.entry(run, now)
        task_name = run.task_name
        keys = [f"{self.prefix}index:all", self.task_key(task_name), state_key, self.tasks_key]
        oldest, ttl = self.upkeep(int(now * 1000), (task_name, state_key))
        return keys, [run.id, score_ms, oldest, ttl, task_name]

    def entry(self, run: TaskRun, now: float) -> tuple[str, int]:
        """The state index ``run`` belongs in as it is now, and its score: the time of its
        last state (``now``, in UNIX seconds, if it has none) in ms."""
        state = run.state
        state_type = state.type.value if state is not None else "PENDING"
        moment = run.state_history[-1].timestamp if run.state_history else None
        score = moment.timestamp() if moment is not None else now
        return f"{self.prefix}index:state:{squash(state_type)}", int(score * 1000)

    def task_key(self, task_name: str) -> str:
        """The sorted set of ``task_name``'s runs."""
        return f"{self.prefix}index:task:{task_name}"

    @property
    def tasks_key(self) -> str:
        """The set of task names seen."""
        return f"{self.prefix}index:tasks"

    def source_keys(self, client: Any, task: str | None, state: str | None) -> list[str]:
        """The sorted sets that together hold every run matching the filters."""
        p = self.prefix
        if task is not None:
            names = [_text(name) for name in client.smembers(f"{p}index:tasks")]
            matching = [name for name in names if name == task or short_task_name(name) == task]
            return [f"{p}index:task:{name}" for name in matching]
        if state is not None and (kind := state_types_for(state)) is not None:
            return [f"{p}index:state:{kind}"]
        return [f"{p}index:all"]

    def newest(self, client: Any, keys: list[str], page: int) -> Iterator[tuple[str, str]]:
        """``(index key, run id)`` pairs, newest first across ``keys`` (read a page at a
        time from each: a merge, so the order holds across keys)."""
        buffers: dict[str, list[tuple[float, str]]] = {key: [] for key in keys}
        offsets = dict.fromkeys(keys, 0)
        while True:
            for key in list(offsets):
                if not buffers[key]:
                    start = offsets[key]
                    entries = client.zrevrange(key, start, start + page - 1, withscores=True)
                    buffers[key] = [(score, _text(member)) for member, score in entries]
                    offsets[key] = start + page
                    if len(entries) < page:
                        offsets.pop(key)
            live = [key for key, entries in buffers.items() if entries]
            if not live:
                return
            key = max(live, key=lambda k: buffers[k][0][0])
            yield key, buffers[key].pop(0)[1]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def list_indexed(
    client: Any,
    index: RunIndex,
    run_key: Callable[[str], str],
    decode: Callable[[str, bytes | str], TaskRun | None],
    limit: int,
    task: str | None,
    state: str | None,
) -> list[TaskRun]:
    """Up to ``limit`` runs matching the filters, newest first, read along the index: pages
    of entries, their documents in one ``MGET`` each; entries found expired or stale go."""
    page = max(2 * limit, 50)
    found: list[TaskRun] = []
    entries = index.newest(client, index.source_keys(client, task, state), page)
    while len(found) < limit:
        batch = list(itertools.islice(entries, page))
        if not batch:
            break
        raws = client.mget([run_key(run_id) for _, run_id in batch])
        gone: dict[str, list[str]] = {}
        for (key, run_id), raw in zip(batch, raws, strict=True):
            run = None if raw is None else decode(run_id, raw)
            if run is not None and run_matches(run, task, state):
                found.append(run)
            elif run is None or (":index:state:" in key and not _still_in(run, key)):
                gone.setdefault(key, []).append(run_id)
        for key, run_ids in gone.items():
            client.zrem(key, *run_ids)
    return found[:limit]


def _still_in(run: TaskRun, state_key: str) -> bool:
    """Whether ``run`` is still in the state type its index entry ``state_key`` names."""
    return run.state is not None and state_key.endswith(f":{squash(run.state.type.value)}")
