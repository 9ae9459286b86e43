"""Many runs' records and their run-index entries, written by one script call.

Local runs' records are written behind the caller (:mod:`~._store.local_records`), so they
can wait for company: the records held when the flusher comes go out a batch of up to
:data:`MAX_RUNS_PER_BATCH` at a time. Redis then runs one script per batch, not one per run,
and the index's sorted sets get one ``ZADD`` each for the whole batch, one ``PEXPIRE`` and at
most one trim, where a script per run made each of those once per run. A batch has one
reply, so a refusal (OOM, NOPERM, READONLY) is seen for every run in it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.run_index import RunIndex

__all__ = ["BATCH_SAVE_LUA", "MAX_RUNS_PER_BATCH", "Batch"]

#: KEYS: the run records (n of them), the index's sorted sets, then the set of task names.
#: ARGV: px ('0' for none), oldest score kept ('' for no trim), the index's ttl ms ('' for
#: none), n, the n documents; then for each sorted set, its count of entries followed by
#: that many (score, run id) pairs; then the task names.
BATCH_SAVE_LUA = """
local px, oldest, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 1, n do
  if px == '0' then redis.call('set', KEYS[i], ARGV[4 + i])
  else redis.call('set', KEYS[i], ARGV[4 + i], 'PX', px) end
end
local a = 5 + n
for k = n + 1, #KEYS - 1 do
  local last = a + 2 * tonumber(ARGV[a])
  redis.call('zadd', KEYS[k], unpack(ARGV, a + 1, last))
  if oldest ~= '' then redis.call('zremrangebyscore', KEYS[k], '-inf', '(' .. oldest) end
  if ttl ~= '' then redis.call('pexpire', KEYS[k], ttl) end
  a = last + 1
end
redis.call('sadd', KEYS[#KEYS], unpack(ARGV, a))
if ttl ~= '' then redis.call('pexpire', KEYS[#KEYS], ttl) end
return n
"""

#: Runs per script call: a flusher lets go of the GIL between batches, and a batch's cost
#: stays well within what Lua's ``unpack`` takes (a few thousand values).
MAX_RUNS_PER_BATCH = 64


class Batch:
    """One script call writing ``records`` (record key, JSON document, run) and their index
    entries; ``px``: the records' lifetime in ms (``'0'``: none).

    Compared by identity: a record key maps to the last batch that carries it until Redis
    answered that batch; ``seq`` orders batches that must be sent again.
    """

    __slots__ = ("command", "keys", "seq")

    def __init__(
        self, seq: int, index: RunIndex, records: Sequence[tuple[str, str, TaskRun]], px: str
    ) -> None:
        self.seq = seq
        self.keys, self.command = _command(index, records, px, time.time())


def _command(
    index: RunIndex, records: Sequence[tuple[str, str, TaskRun]], px: str, now: float
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    entries: dict[str, list[Any]] = {f"{index.prefix}index:all": []}
    task_names: dict[str, None] = {}
    for _, _, run in records:
        state_key, score = index.entry(run, now)
        pair = (score, run.id)
        entries[f"{index.prefix}index:all"].extend(pair)
        entries.setdefault(index.task_key(run.task_name), []).extend(pair)
        entries.setdefault(state_key, []).extend(pair)
        task_names[run.task_name] = None
    record_keys = tuple(key for key, _, _ in records)
    oldest, ttl = index.upkeep(int(now * 1000))
    args: list[Any] = [px, oldest, ttl, len(records)]
    args.extend(document for _, document, _ in records)
    for pairs in entries.values():
        args.append(len(pairs) // 2)
        args.extend(pairs)
    args.extend(task_names)
    keys = (*record_keys, *entries, index.tasks_key)
    return record_keys, ("EVAL", BATCH_SAVE_LUA, len(keys), *keys, *args)
