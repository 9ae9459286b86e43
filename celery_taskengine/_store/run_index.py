"""The run index on Redis, so that ``runs ls --task T --state S --limit N`` reads about N runs,
not every run record.

Beside the run records (``<prefix>run:<id>``) the store keeps sorted sets scored by the time
of each run's last recorded change (UNIX milliseconds)::

    <prefix>index:all             every run
    <prefix>index:task:<name>     the runs of one task (full name)
    <prefix>index:state:<type>    the runs last seen in one state type (``failed``, ...)
    <prefix>index:tasks           a set of the task names seen, to resolve short names

Every writer of a run record also runs :data:`INDEX_LUA` (inside its own script, or as a
command of its own): the run is added or moved to the front, and entries older than a run
record's lifetime are trimmed. A state entry goes stale when its run moves on to another
state; a listing checks each document it reads and drops the entries that no longer match
(and those whose record has expired), so stale entries cost a listing once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from celery_taskengine._store.run_filters import run_matches, short_task_name, squash
from celery_taskengine.task_run import TaskRun

__all__ = ["INDEX_LUA", "SAVE_AND_INDEX_LUA", "RunIndex", "list_indexed", "state_types_for"]

#: Adds a run to the index, trims entries older than a run record's lifetime and keeps the
#: index living as long as its newest run.
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
#: KEYS: all, task, state, tasks. ARGV: run id, score (ms), oldest score kept ('' for none),
#: ttl ms ('' for none), task name.
INDEX_LUA = INDEX_FN + (
    "index_run(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], "
    "ARGV[5])\nreturn 1\n"
)
#: A run record's write and its index's, in one command. KEYS: run, then INDEX_LUA's.
#: ARGV: document, px ('0' for none), then INDEX_LUA's.
SAVE_AND_INDEX_LUA = (
    INDEX_FN
    + """
if ARGV[2] ~= '0' then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else redis.call('set', KEYS[1], ARGV[1]) end
index_run(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return 1
"""
)

#: One index write in this many trims the entries of expired runs.
TRIM_EVERY = 64

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

    def keys(self, task_name: str, state_type: str) -> list[str]:
        """KEYS for :data:`INDEX_LUA`, for a run of ``task_name`` in ``state_type``."""
        p = self.prefix
        state = f"{p}index:state:{squash(state_type)}"
        return [f"{p}index:all", f"{p}index:task:{task_name}", state, f"{p}index:tasks"]

    def args(self, run_id: str, task_name: str, score_ms: int, now_ms: int) -> list[Any]:
        """ARGV for :data:`INDEX_LUA`: the run scored ``score_ms`` (its last change), the
        index living as long as a run record; one write in :data:`TRIM_EVERY` also trims
        entries older than that (a trim per write would cost every write three commands)."""
        if self.run_expires is None:
            return [run_id, score_ms, "", "", task_name]
        lifetime = int(self.run_expires * 1000)
        self._writes += 1
        oldest = str(now_ms - lifetime) if self._writes % TRIM_EVERY == 1 else ""
        return [run_id, score_ms, oldest, str(lifetime), task_name]

    def for_run(self, run: TaskRun, now: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of :data:`INDEX_LUA` for ``run`` as it is now, scored by the time of
        its last state (``now`` if it has none), in UNIX seconds."""
        state = run.state
        state_type = state.type.value if state is not None else "PENDING"
        moment = run.state_history[-1].timestamp if run.state_history else None
        score = moment.timestamp() if moment is not None else now
        keys = self.keys(run.task_name, state_type)
        return keys, self.args(run.id, run.task_name, int(score * 1000), int(now * 1000))

    def save_command(
        self, run_key: str, document: str, px: str, run: TaskRun, now: float
    ) -> tuple[Any, ...]:
        """One command writing a run's record (``px``: ms, ``'0'`` for none) and indexing it."""
        keys, args = self.for_run(run, now)
        return ("EVAL", SAVE_AND_INDEX_LUA, 1 + len(keys), run_key, *keys, document, px, *args)

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
