"""Which transaction is current in this context, and what a new one inherits from it.

Kept apart from :mod:`~celery_taskengine.transactions` so that nesting (a child sees its
parent, a task's transaction sees the user's) has one small home.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar
from typing import TYPE_CHECKING

from celery_taskengine.cache_policies import IsolationLevel

if TYPE_CHECKING:
    from celery_taskengine.transactions import Transaction

__all__ = ["CURRENT", "TransactionState", "effective_isolation", "get_transaction"]

#: The innermost open transaction of this context.
CURRENT: ContextVar[Transaction | None] = ContextVar("taskengine_transaction", default=None)


class TransactionState(enum.Enum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    STAGED = "STAGED"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"


def get_transaction() -> Transaction | None:
    """The innermost open transaction in this context, if any."""
    return CURRENT.get()


def effective_isolation(
    given: IsolationLevel | None, parent: Transaction | None = None
) -> IsolationLevel:
    """The isolation a transaction opened now gets: its own, else its parent's, else
    READ_COMMITTED. With no ``parent`` given, the current transaction is the parent."""
    if given is not None:
        return given
    parent = parent if parent is not None else CURRENT.get()
    return parent.isolation_level if parent is not None else IsolationLevel.READ_COMMITTED
