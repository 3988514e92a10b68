"""Errors of the ledger. One base class; each says whether retrying can help.

::

    LedgerError
    ├── InvariantViolation   a ledger rule was broken (a bug): never retried, alert
    ├── PoisonEvent          a stream message that can never be posted (permanent):
    │                        retried until its N-th delivery, then dead-lettered
    └── DriftError           ``ledger verify`` found drift (the message says where)

Database and Redis connection failures are temporary: the worker keeps its
batch, reconnects with backoff and writes the same batch again, which is safe
because an event id can only ever be inserted once.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every ledger error."""


class InvariantViolation(LedgerError):
    """A ledger rule does not hold (e.g. an entry that does not sum to zero)."""


class PoisonEvent(LedgerError):
    """A usage-stream message that can never be posted; the message names the field."""


class DriftError(LedgerError):
    """The ledger disagrees with itself or with the stream."""


def invariant(condition: bool, message: str) -> None:
    """Raise ``InvariantViolation`` unless ``condition``; unlike ``assert`` it survives ``python -O``."""
    if not condition:
        raise InvariantViolation(message)
