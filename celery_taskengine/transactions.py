"""Transactions: a key, a staged value, commit/rollback hooks, nesting, and SERIALIZABLE locks.

The logic is written once as step routines (:mod:`~celery_taskengine._engine.steps`), driven
blocking by :class:`Transaction` and with ``await`` by :class:`AsyncTransaction`; the drivers are
imported only when such a shell method runs. Every task attempt uses the same routines, so a
task's transaction and one a user opens with :func:`transaction` nest and behave the same.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from celery_taskengine._engine import steps
from celery_taskengine._engine.steps import Steps, hook_name
from celery_taskengine._engine.transaction_scope import (
    CURRENT,
    TransactionState,
    effective_isolation,
    get_transaction,
)
from celery_taskengine.cache_policies import CommitMode, IsolationLevel
from celery_taskengine.errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from celery_taskengine._store.protocol import ResultRecord, ResultStore

__all__ = [
    "AsyncTransaction",
    "CommitMode",
    "IsolationLevel",
    "Transaction",
    "TransactionState",
    "effective_isolation",
    "get_transaction",
    "transaction",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a SERIALIZABLE lock lives unless renewed; a holder that dies frees it after this.
#: Read when each transaction is created, so a deployment (or a test) may change it.
LOCK_TTL_SECONDS = 30.0
#: Seconds between two tries to take a lock another holder has.
LOCK_POLL_SECONDS = 0.02


class Transaction:
    """A unit of work under a key: staged, then committed (written) or rolled back.

    Use ``with transaction(...)``; hooks receive the transaction, whose ``get``/``set`` carry
    values between the work and its hooks.
    """

    store: ResultStore | None
    commit_mode: CommitMode | None
    state = TransactionState.PENDING
    record: ResultRecord | None = None
    _staged: tuple[Any] | None = None
    _holder = ""
    #: The SERIALIZABLE lock held, as the driver handed it back (it keeps the lease alive).
    _lease: Any = None
    _token: Token[Transaction | None] | None = None

    def __init__(
        self,
        key: str | None = None,
        *,
        store: ResultStore | None = None,
        commit_mode: CommitMode | None = None,
        isolation_level: IsolationLevel | None = None,
        overwrite: bool = False,
        write_on_commit: bool = True,
        serializer: str = "json",
        expires_in: float | None = None,
        task_name: str | None = None,
        lock_ttl: float | None = None,
        logger_name: str | None = None,
        lock_manager: ResultStore | None = None,
    ) -> None:
        self.key = key
        self.parent: Transaction | None = (inherited := CURRENT.get())
        # A child inherits its parent's commit mode, isolation and store unless given its own.
        self.commit_mode = commit_mode or (inherited.commit_mode if inherited else None)
        self.isolation_level: IsolationLevel = effective_isolation(isolation_level, inherited)
        self.store = store if store is not None or inherited is None else inherited.store
        #: Where SERIALIZABLE locks are taken when not on ``store`` (a policy's lock_manager).
        self.lock_manager = lock_manager
        self.overwrite = overwrite
        self.write_on_commit = write_on_commit
        self.serializer = serializer
        self.expires_in = expires_in
        self.task_name = task_name
        # Looked up per transaction, not bound at import, so the module setting can be tuned.
        self.lock_ttl = lock_ttl if lock_ttl is not None else LOCK_TTL_SECONDS
        self.children: list[Transaction] = []
        self.on_commit_hooks: list[Callable[..., Any]] = []
        self.on_rollback_hooks: list[Callable[..., Any]] = []
        self._values: dict[str, Any] = {}

    def is_committed(self) -> bool:
        return self.state is TransactionState.COMMITTED

    def is_rolled_back(self) -> bool:
        return self.state is TransactionState.ROLLED_BACK

    def is_active(self) -> bool:
        return self.state in (TransactionState.ACTIVE, TransactionState.STAGED)

    def is_staged(self) -> bool:
        return self.state is TransactionState.STAGED

    def get(self, name: str, default: Any = None) -> Any:
        """A value set on this transaction or, failing that, on an enclosing one."""
        if name in self._values:
            return self._values[name]
        return self.parent.get(name, default) if self.parent else default

    def set(self, name: str, value: Any) -> None:
        self._values[name] = value

    def read(self) -> Any:
        """The committed value under the key (a cache hit's value); ``None`` if none."""
        return self.record.value if self.record is not None else None

    def stage(
        self,
        value: Any,
        on_commit: Sequence[Callable[..., Any]] = (),
        on_rollback: Sequence[Callable[..., Any]] = (),
    ) -> None:
        """Hold ``value`` to be written at commit, with the hooks to run then."""
        if self.state is TransactionState.COMMITTED:
            return
        self._staged = (value,)
        self.on_commit_hooks.extend(on_commit)
        self.on_rollback_hooks.extend(on_rollback)
        self.state = TransactionState.STAGED

    def add_child(self, child: Transaction) -> None:
        self.children.append(child)

    def commit(self) -> bool:
        """Commit now (blocking): children, commit hooks, then the write."""
        return _blocking(self.commit_steps())

    def rollback(self) -> bool:
        """Roll back now (blocking): rollback hooks in reverse order, children, and parent."""
        return _blocking(self.rollback_steps())

    # -- the logic, as step routines ---------------------------------------------------------
    def enter(self) -> None:
        """The part of entering that needs no step: become the current transaction."""
        self._token = CURRENT.set(self)
        self.state = TransactionState.ACTIVE

    def leave_quietly(self, error: BaseException | None) -> bool:
        """Leave at once if there is nothing to run or write; ``False`` if steps are needed.

        Most task runs have no key and no hooks: this keeps their transaction nearly free.
        """
        if self.on_commit_hooks or self.on_rollback_hooks or self.children or self._lease:
            return False
        if self.key is not None and self._staged is not None and error is None:
            return False
        if error is not None or self.commit_mode is CommitMode.OFF:
            self.state = TransactionState.ROLLED_BACK
        elif self.state is not TransactionState.COMMITTED:
            self.state = TransactionState.COMMITTED
        self._leave()
        return True

    def begin_steps(self, *, read: bool = True) -> Steps[None]:
        """Enter: make current, take the lock (SERIALIZABLE), and look for a committed record.

        ``read=False`` skips the look: the caller has just read the key and found nothing.
        """
        self.enter()
        store, key = self.store, self.key
        if key is None or store is None:
            return
        try:
            if self.isolation_level is IsolationLevel.SERIALIZABLE:
                locks = self.lock_manager if self.lock_manager is not None else store
                yield from self._lock_steps(locks, key)
            if read and not self.overwrite:
                record = yield steps.ReadCache(store, key)
                if record is not None:
                    self.record = record
                    self.state = TransactionState.COMMITTED
        except BaseException:
            # No exit follows a failed enter: left current, this transaction would adopt every
            # later one in this context as a lazy child, and none of them would ever commit.
            self.abandon()
            raise

    def exit_steps(self, error: BaseException | None) -> Steps[None]:
        """Leave: roll back on error, hand over to the parent (lazy), or commit."""
        try:
            if error is not None:
                yield from self._rollback_self()
            elif self.state is TransactionState.COMMITTED:
                pass
            elif self.parent is not None and self.commit_mode is not CommitMode.EAGER:
                self.parent.add_child(self)
                return
            elif self.commit_mode is CommitMode.OFF:
                yield from self.rollback_steps()
            else:
                yield from self.commit_steps()
        finally:
            self._leave()
        yield from self._release_lock()

    def commit_steps(self) -> Steps[bool]:
        if self.state in (TransactionState.COMMITTED, TransactionState.ROLLED_BACK):
            return False
        for child in self.children:
            yield from child.commit_steps()
            if self.is_rolled_back():
                return False  # that child's failed commit rolled this one back too
        for hook in self.on_commit_hooks:
            if not (yield from self._run_hook(hook, "commit")):
                yield from self.rollback_steps()
                return False
        if not (yield from self._write_steps()):
            yield from self.rollback_steps()
            return False
        self.state = TransactionState.COMMITTED
        yield from self._release_lock()
        return True

    def rollback_steps(self) -> Steps[bool]:
        rolled_back = yield from self._rollback_self()
        parent = self.parent
        if rolled_back and parent is not None and parent.is_active() and self in parent.children:
            yield from parent.rollback_steps()
        return rolled_back

    def _rollback_self(self) -> Steps[bool]:
        if self.state in (TransactionState.COMMITTED, TransactionState.ROLLED_BACK):
            return False
        for hook in reversed(self.on_rollback_hooks):
            yield from self._run_hook(hook, "rollback")
        self.state = TransactionState.ROLLED_BACK
        for child in reversed(self.children):
            yield from child._rollback_self()
        yield from self._release_lock()
        return True

    def _run_hook(self, hook: Callable[..., Any], kind: str) -> Steps[bool]:
        """Run one commit or rollback hook; ``False`` (logged) if it raised."""
        try:
            yield steps.RunHook(hook, (self,), f"on_{kind}")
        except Exception:
            logger.exception(
                "%s: an error was encountered while running %s hook %r",
                self.key,
                kind,
                hook_name(hook),
            )
            return False
        return True

    def _write_steps(self) -> Steps[bool]:
        if not (self.write_on_commit and self.key and self.store and self._staged):
            return True
        if self.expires_in is not None and self.expires_in <= 0:
            return True  # a non-positive expiration means the result is never reused
        write = steps.WriteCache(
            self.store, self.key, self._staged[0], self.serializer, self.expires_in, self.task_name
        )
        try:
            yield write
        except SerializationError as exc:
            logger.warning(
                "%s: the result could not be serialized, so the transaction is rolled back "
                "instead of committed: %s",
                self.key,
                exc,
            )
            return False
        except Exception:
            logger.exception("%s: writing the committed result failed", self.key)
            return False
        return True

    def _lock_steps(self, store: ResultStore, key: str) -> Steps[None]:
        if not getattr(store, "supports_locking", False):
            raise ConfigurationError(
                "IsolationLevel.SERIALIZABLE needs a store that can lock across processes; "
                f"{type(store).__name__} cannot. Use a Redis result backend."
            )
        self._holder = self._holder or uuid.uuid4().hex
        take = steps.TakeLock(store, key, self._holder, self.lock_ttl)
        while (lease := (yield take)) is None:
            yield steps.Sleep(LOCK_POLL_SECONDS, reason="lock")
        self._lease = lease

    def abandon(self) -> None:
        """Leave without running anything (the run itself is being torn down).

        No step can be taken any more, so a held lease is released here, directly.
        """
        self._leave()
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def _leave(self) -> None:
        if self._token is not None:
            CURRENT.reset(self._token)
            self._token = None

    def _release_lock(self) -> Steps[None]:
        lease, self._lease = self._lease, None
        if lease is not None:
            yield steps.ReleaseLock(lease)

    # -- the sync shell ----------------------------------------------------------------------
    def __enter__(self) -> Transaction:
        _blocking(self.begin_steps())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _blocking(self.exit_steps(exc))

    def __repr__(self) -> str:
        return f"<Transaction key={self.key!r} state={self.state.value}>"


class AsyncTransaction(Transaction):
    """The same transaction for ``async with``; hooks are awaited on the running loop."""

    async def __aenter__(self) -> AsyncTransaction:
        await _awaited(self.begin_steps())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await _awaited(self.exit_steps(exc))

    async def acommit(self) -> bool:
        return await _awaited(self.commit_steps())

    async def arollback(self) -> bool:
        return await _awaited(self.rollback_steps())


def transaction(
    key: str | None = None,
    *,
    store: ResultStore | None = None,
    commit_mode: CommitMode | None = None,
    isolation_level: IsolationLevel | None = None,
    overwrite: bool = False,
    write_on_commit: bool = True,
) -> AsyncTransaction:
    """Open a transaction; use it with ``with`` or ``async with``.

    Without a ``store`` it uses the enclosing transaction's, else the current Celery app's
    result backend (in-memory when the app has none). Children commit with the root unless
    ``commit_mode=CommitMode.EAGER``.
    """
    if store is None and get_transaction() is None:
        from celery import current_app

        from celery_taskengine._store.selection import store_for_app

        store = store_for_app(current_app._get_current_object())
    return AsyncTransaction(
        key,
        store=store,
        commit_mode=commit_mode,
        isolation_level=isolation_level,
        overwrite=overwrite,
        write_on_commit=write_on_commit,
    )


def _blocking(routine: Steps[T]) -> T:
    """Drive ``routine`` blocking; the driver is imported here so this module stays pure."""
    from celery_taskengine._engine.drivers import drive_sync

    return drive_sync(routine)


async def _awaited(routine: Steps[T]) -> T:
    from celery_taskengine._engine.drivers import drive_async

    return await drive_async(routine)
