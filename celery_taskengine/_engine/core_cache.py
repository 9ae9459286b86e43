"""The engine core's cache and transaction steps: the key, the read, the attempt's transaction.

Which store holds a task's records (the policy's ``key_storage``, else the run's store) and
whether a run has a key are decided in :mod:`~celery_taskengine._engine.transaction_keys` (the
producer asks the same module). Here: how the key is computed (in place for the built-in
policies; a ``ComputeKey`` step where user code computes it), and whether the first read may be
sent ahead of the attempt (``ReadCache(ahead=True)``, only to a store that can send one; the
driver sends it). What a task's options decide about this is worked out once per options
object (:class:`KeyPlan`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from celery_taskengine import cache_policies as cp
from celery_taskengine._engine.core_states import StateEntry
from celery_taskengine._engine.steps import ComputeKey, ReadCache, Steps
from celery_taskengine._engine.transaction_keys import has_key, key_store
from celery_taskengine._engine.transaction_scope import CURRENT
from celery_taskengine.errors import ConfigurationError
from celery_taskengine.states import State
from celery_taskengine.transactions import Transaction

if TYPE_CHECKING:
    from celery_taskengine._celery.options import TaskOptions
    from celery_taskengine._store.protocol import ResultRecord, ResultStore

__all__ = ["CacheSteps", "KeyPlan", "key_plan", "reads_ahead"]


class KeyPlan(NamedTuple):
    """What a task's options decide about its keys, once for all its runs."""

    #: No run ever has a key: nothing is persisted, or no policy or storage key is set.
    keyless: bool
    #: The key is user code (a ``cache_key_fn``, a policy of one's own, a storage key
    #: template): a ``ComputeKey`` step. The built-in policies hash what the run was given,
    #: in place.
    by_user: bool
    #: The options allow reading the first attempt's key ahead (see ``_may_read_ahead``).
    ahead: bool


#: Plans by ``id(options)``, holding the options so the id is not reused while cached.
_PLANS: dict[int, tuple[TaskOptions, KeyPlan]] = {}
_MAX_PLANS = 1024


def key_plan(options: TaskOptions) -> KeyPlan:
    """The :class:`KeyPlan` of ``options``, computed once per options object."""
    cached = _PLANS.get(id(options))
    if cached is not None and cached[0] is options:
        return cached[1]
    policy = options.cache_policy
    keyless = not has_key(options)
    built_in = policy is not None and cp.keys_from_inputs_only(policy)
    plan = KeyPlan(
        keyless=keyless,
        by_user=not keyless and not built_in,
        ahead=not keyless
        and built_in
        and options.result_storage_key is None
        and not options.on_running
        and not options.refresh_cache
        and policy is not None
        and policy.isolation_level in (None, cp.IsolationLevel.READ_COMMITTED),
    )
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()  # options made per call (with_options in a loop) must not pile up
    _PLANS[id(options)] = (options, plan)
    return plan


#: Whether a store class can send a read ahead, by class: asked on every cached run.
_READS_AHEAD: dict[type, bool] = {}


def reads_ahead(store: Any) -> bool:
    """Whether ``store`` can send a read ahead of its answer (a ``start_read`` method)."""
    kind = type(store)
    known = _READS_AHEAD.get(kind)
    if known is None:
        known = _READS_AHEAD[kind] = callable(getattr(kind, "start_read", None))
    # A store may have one per instance (SqlStore: on PostgreSQL through psycopg only).
    return known or callable(getattr(store, "start_read", None))


class CacheSteps(StateEntry):
    """Keys, reads and the transaction of each attempt."""

    #: The key computed for the read sent ahead, as ``(key,)``; ``None`` when none was sent.
    _ahead: tuple[str | None] | None = None
    keys: KeyPlan

    def compute_transaction_key(self) -> Steps[str | None]:
        if self.keys.keyless:
            return None  # nothing is written, so nothing can ever be read back
        if not self.keys.by_user:
            return self._key_in_place()
        options = self.options
        key: str | None = yield ComputeKey(
            cp.compute_transaction_key,
            (options.cache_policy, self._key_context(), self.call_parameters),
            {"result_storage_key": options.result_storage_key},
        )
        return key

    def _key_in_place(self) -> str | None:
        """The key of a built-in policy, which runs no user code: no step needed."""
        return cp.compute_transaction_key(
            self.options.cache_policy, self._key_context(), self.call_parameters
        )

    def _key_context(self) -> cp.KeyContext:
        # Upstream states are keyed by their values, as the function sees them (the caller
        # passes call_parameters): a State object would hash its timestamp too.
        return cp.KeyContext(
            task_name=self.task.name,
            run_id=self.env.key_run_id or self.run.id,
            task_source=self.task.source_text,
            task_run=self.run,
        )

    def transaction_context(self) -> Steps[Transaction]:
        """The transaction for this attempt, keyed by the cache policy (or not at all)."""
        key = None if self.is_generator else (yield from self.compute_transaction_key())
        return self._transaction(key)

    def _look_up(self) -> Steps[tuple[ResultRecord | None, Transaction | None]]:
        """The committed record under this attempt's key, if any, and its open transaction.

        READ_COMMITTED takes no lock and a hit runs nothing, so then the key is read before a
        transaction is opened: a hit needs none (``None``), and a miss's need not read again.
        A run without a key (``KeyPlan.keyless``, generators) never gets here.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # the key was computed before Running (see _may_read_ahead)
            key = ahead[0]
            plain = key is not None
        else:
            if self.keys.by_user:
                key = yield from self.compute_transaction_key()
            else:
                key = self._key_in_place()
            plain = key is not None and self._reads_plainly()
        if plain:
            assert key is not None
            hit: ResultRecord | None = yield ReadCache(self._key_store(), key)
            if hit is not None:
                return hit, None
        txn = self._transaction(key)
        if key is None:
            txn.enter()
        else:
            yield from txn.begin_steps(read=not plain)
        return (txn.record if txn.is_committed() else None), txn

    def _may_read_ahead(self) -> bool:
        """Whether this run's first cache read may be sent before Running is recorded, so its
        answer travels while the engine works.

        Only where nothing in between could change the key or the record: a plain read
        (READ_COMMITTED, no refresh), no ``on_running`` hooks, no cancellation check, and a key
        that depends on the task and its inputs alone (no ``cache_key_fn`` or storage key
        template, which may look at the run). And only to a store that can send a read ahead
        (``start_read``): elsewhere the read is as quick later, and needs no step now.
        """
        if not self.keys.ahead or self.is_generator or self.invalid_inputs is not None:
            return False
        if self.env.is_cancelled is not None or not reads_ahead(self._key_store()):
            return False
        return self._reads_plainly()

    def _read_ahead(self) -> Steps[None]:
        key = self._key_in_place()  # read ahead only with a built-in policy (KeyPlan.ahead)
        self._ahead = (key,)  # a None key (maybe with a warning) is not computed again
        if key is not None:
            yield ReadCache(self._key_store(), key, ahead=True)

    def _inputs_are_values(self) -> bool:
        """Whether the inputs need no resolving (no upstream states to wait for or unwrap)."""
        if self.wait_for:
            return False
        return not any(isinstance(value, State) for value in self.run.parameters.values())

    def _leave_transaction(
        self, txn: Transaction | None, error: BaseException | None
    ) -> Steps[None]:
        if txn is not None and not txn.leave_quietly(error):
            yield from txn.exit_steps(error)

    def _reads_plainly(self) -> bool:
        """Whether this attempt's transaction would only read its key: no lock, no refresh."""
        if self.options.refresh_cache:
            return False
        policy = self.options.cache_policy
        given = policy.isolation_level if policy is not None else None
        if given is None:  # effective_isolation, written out: asked on every cached run
            parent = CURRENT.get()
            return parent is None or parent.isolation_level is cp.IsolationLevel.READ_COMMITTED
        return given is cp.IsolationLevel.READ_COMMITTED

    def _key_store(self) -> ResultStore:
        """Where this task's records live: the policy's key_storage, else the run's store."""
        return key_store(self.options, self.env.store)

    def _transaction(self, key: str | None) -> Transaction:
        options = self.options
        policy = options.cache_policy
        return Transaction(
            key,
            store=self._key_store(),
            isolation_level=policy.isolation_level if policy is not None else None,
            overwrite=options.refresh_cache,
            write_on_commit=options.persist_result,
            serializer=options.result_serializer,
            expires_in=options.cache_expiration,
            task_name=self.task.name,
            lock_manager=policy.lock_manager if policy is not None else None,
        )

    def _check_configuration(self) -> None:
        """SERIALIZABLE needs locks every process running this task can see."""
        policy = self.options.cache_policy
        if (
            policy is None
            or policy.isolation_level is not cp.IsolationLevel.SERIALIZABLE
            or not self.options.persist_result
        ):
            return
        locks: Any = next(
            s for s in (policy.lock_manager, policy.key_storage, self.env.store) if s is not None
        )
        in_one_process = not getattr(locks, "shared", True)
        if not getattr(locks, "supports_locking", False) or (
            self.env.across_processes and in_one_process
        ):
            raise ConfigurationError(
                f"task {self.task.name!r} uses IsolationLevel.SERIALIZABLE, but its store "
                f"({type(locks).__name__}) cannot lock across processes; use a Redis result "
                "backend or configure the policy with a lock_manager that can"
            )
