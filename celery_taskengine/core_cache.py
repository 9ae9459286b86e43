"""The engine core's cache and transaction steps: the key, the read, the attempt's transaction.

One place decides which store holds a task's records (the policy's ``key_storage``, else the
run's store), how the key is computed (a ``ComputeKey`` step: the policy may call user code),
and whether the first read may be sent ahead of the attempt (``ReadCache(ahead=True)``; the
driver decides whether the store can).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery_taskengine import cache_policies as cp
from celery_taskengine.core_states import StateEntry
from celery_taskengine.errors import ConfigurationError
from celery_taskengine.states import State
from celery_taskengine.steps import ComputeKey, ReadCache, Steps
from celery_taskengine.transactions import Transaction, effective_isolation

if TYPE_CHECKING:
    from celery_taskengine._store.protocol import ResultRecord, ResultStore

__all__ = ["CacheSteps"]


class CacheSteps(StateEntry):
    """Keys, reads and the transaction of each attempt."""

    #: The key computed for the read sent ahead, as ``(key,)``; ``None`` when none was sent.
    _ahead: tuple[str | None] | None = None

    def compute_transaction_key(self) -> Steps[str | None]:
        options = self.options
        if not options.persist_result:
            return None  # nothing is written, so nothing can ever be read back
        if options.cache_policy is None and options.result_storage_key is None:
            return None
        context = cp.KeyContext(
            task_name=self.task.name,
            run_id=self.env.key_run_id or self.run.id,
            task_source=self.task.source_text,
            task_run=self.run,
        )
        # Upstream states are keyed by their values, as the function sees them: a State object
        # would hash its timestamp too, and an equal value from another run would never hit.
        key: str | None = yield ComputeKey(
            cp.compute_transaction_key,
            (options.cache_policy, context, self.call_parameters),
            {"result_storage_key": options.result_storage_key},
        )
        return key

    def transaction_context(self) -> Steps[Transaction]:
        """The transaction for this attempt, keyed by the cache policy (or not at all)."""
        key = None if self.is_generator else (yield from self.compute_transaction_key())
        return self._transaction(key)

    def _look_up(self) -> Steps[tuple[ResultRecord | None, Transaction | None]]:
        """The committed record under this attempt's key, if any, and its open transaction.

        READ_COMMITTED takes no lock and a hit runs nothing, so then the key is read before a
        transaction is opened: a hit needs none (``None``), and a miss's need not read again.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # the key was computed before Running (see _may_read_ahead)
            key = ahead[0]
            plain = key is not None
        elif self.is_generator or not self.options.persist_result:
            key, plain = None, False  # no key: no step needed to find that out
        else:
            key = yield from self.compute_transaction_key()
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
        template, which may look at the run).
        """
        options = self.options
        policy = options.cache_policy
        if not options.persist_result or policy is None or self.is_generator:
            return False  # no key at all (the default policy without persistence), or no read
        if self.invalid_inputs is not None:
            return False
        return not (
            options.on_running
            or self.env.is_cancelled is not None
            or options.result_storage_key is not None
            or not cp.keys_from_inputs_only(policy)
            or not self._reads_plainly()
        )

    def _read_ahead(self) -> Steps[None]:
        key = yield from self.compute_transaction_key()
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
        policy = self.options.cache_policy
        if self.options.refresh_cache:
            return False
        given = policy.isolation_level if policy is not None else None
        return effective_isolation(given) is cp.IsolationLevel.READ_COMMITTED

    def _key_store(self) -> ResultStore:
        """Where this task's records live: the policy's key_storage, else the run's store."""
        policy = self.options.cache_policy
        if policy is not None and policy.key_storage is not None:
            return policy.key_storage  # type: ignore[no-any-return]
        return self.env.store

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
