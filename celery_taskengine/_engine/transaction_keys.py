"""A run's transaction key and the store that holds its record: one home for the core (which
reads and commits under the key) and the producer (which answers ``.delay()`` from the cache).

- :func:`has_key`: only a persisted result under a cache policy or a ``result_storage_key``
  can be read back, so without them no key is computed at all;
- :func:`transaction_key`: the key itself (the policy may call user code: the core yields it
  as a ``ComputeKey`` step);
- :func:`key_store`: the policy's ``key_storage``, else the run's store;
- what the key depends on, asked before the run: :func:`keys_from_inputs_only` (computable
  before the run starts, given its id: the core's read sent ahead) and
  :func:`key_for_any_run_id` (the same whatever the run's id turns out to be: the producer's,
  whose run has no id yet that a ``RUN_ID`` part would agree on; :func:`key_may_ignore_run_id`
  asks it without computing the key).

Pure: no Celery, no Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery_taskengine import cache_policies as cp

if TYPE_CHECKING:
    from celery_taskengine._celery.options import TaskOptions
    from celery_taskengine._store.protocol import ResultStore

__all__ = [
    "has_key",
    "key_for_any_run_id",
    "key_may_ignore_run_id",
    "key_store",
    "keys_from_inputs_only",
    "policy_store",
    "transaction_key",
]


def has_key(options: TaskOptions) -> bool:
    """Whether runs of a task with ``options`` have a transaction key."""
    if not options.persist_result:
        return False  # nothing is written, so nothing can ever be read back
    return options.cache_policy is not None or options.result_storage_key is not None


def transaction_key(
    options: TaskOptions, context: cp.KeyContext, inputs: Mapping[str, Any]
) -> str | None:
    """The run's key, or ``None`` to run uncached (a warning says why). Never raises."""
    return cp.compute_transaction_key(
        options.cache_policy, context, inputs, result_storage_key=options.result_storage_key
    )


def policy_store(options: TaskOptions) -> ResultStore | None:
    """The store the cache policy names for its records (``key_storage``), if any."""
    policy = options.cache_policy
    if policy is not None and policy.key_storage is not None:
        return policy.key_storage  # type: ignore[no-any-return]
    return None


def key_store(options: TaskOptions, run_store: ResultStore) -> ResultStore:
    """Where a task's records live: the policy's ``key_storage``, else the run's store."""
    named = policy_store(options)
    return named if named is not None else run_store


def keys_from_inputs_only(options: TaskOptions) -> bool:
    """Whether the key depends on the task, its inputs and the run id alone, so it can be
    computed before the run starts: a built-in policy, no storage key template (a
    ``cache_key_fn`` or a template may look at the run)."""
    policy = options.cache_policy
    if policy is None or options.result_storage_key is not None:
        return False
    return cp.keys_from_inputs_only(policy)


def key_for_any_run_id(
    options: TaskOptions,
    task_name: str,
    task_source: Callable[[], str],
    inputs: Mapping[str, Any],
    run_id: str,
) -> str | None:
    """The key of a run not started yet, if it is the same whatever its run id (no
    ``RUN_ID`` part); else ``None``. A ``cache_key_fn`` is opaque: it is computed with two
    run ids, quietly (the worker computes it again, and warns if it must)."""
    policy = options.cache_policy
    if not key_may_ignore_run_id(policy, options.result_storage_key):
        return None

    def key_for(some_run_id: str) -> str | None:
        context = cp.KeyContext(task_name=task_name, run_id=some_run_id, task_source=task_source)
        if isinstance(policy, cp.CacheKeyFnPolicy):
            try:
                return policy.compute_key(context, inputs)
            except Exception:
                return None
        return transaction_key(options, context, inputs)

    key = key_for(run_id)
    probe = isinstance(policy, cp.CacheKeyFnPolicy) and key is not None
    return None if probe and key_for(f"{run_id}-probe") != key else key


def key_may_ignore_run_id(policy: cp.CachePolicy | None, storage_key: str | None) -> bool:
    """Whether a key from ``policy`` (or, without one, the ``storage_key`` template) may be
    the same for every run id: no ``RUN_ID`` part, no template naming the run id or the run."""
    if policy is None:
        return storage_key is not None and not any(
            name in storage_key for name in ("run_id", "task_run")
        )
    members = policy.policies if isinstance(policy, cp.CompoundPolicy) else (policy,)
    return not any(isinstance(member, cp.RunId) for member in members)
