"""Errors of the ledger. One base class; each says whether retrying can help.

::

    LedgerError
    ├── InvariantViolation   a ledger rule was broken (a bug): never retried, alert
    ├── PoisonEvent          a stream message that can never be posted (permanent):
    │                        retried until its N-th delivery, then dead-lettered
    └── DriftError           ``ledger verify`` found drift (the message says where)

Database errors are classified by SQLSTATE (``classify_sqlstate``, pure):
errors of the environment (connection lost, read-only standby, missing
privilege, admin shutdown, out of resources, …) are temporary: the worker
keeps its batch, reconnects with backoff and writes the same batch again,
which is safe because an event id can only ever be inserted once; they never
make an event poison. Only data errors one row can cause (SQLSTATE classes
22, 23 and 54) make the worker isolate the refused row and treat that one
row as poison.
"""

from __future__ import annotations

import enum


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


class DbErrorKind(enum.Enum):
    """What a database error means for the batch that met it."""

    ENVIRONMENT = "environment"  # back off, reconnect, write the same batch again; never dead-letter
    ROW = "row"  # one row's data: isolate it (bisect the batch); only that row is poison


# SQLSTATE classes a single row's values can cause: 22 data exception (bad encoding,
# out of range), 23 integrity constraint violation, 54 program limit exceeded (a
# value too large for an index row).
_ROW_CLASSES = frozenset({"22", "23", "54"})


def classify_sqlstate(sqlstate: str | None) -> DbErrorKind:
    """``ROW`` for data errors one row can cause; ``ENVIRONMENT`` for everything else.

    Everything else includes 08 connection exception, 25006 read-only transaction
    (a standby, ``default_transaction_read_only``), 28 invalid authorization,
    40 transaction rollback, 42501 insufficient privilege and 42 schema errors
    (a migration not applied yet), 53 insufficient resources, 55 lock not
    available, 57 operator intervention (57P01 admin shutdown, 57014 statement
    timeout), 58 system errors and ``None`` (the connection died without a
    server error). None of these is a property of a row: writing the same batch
    again once the environment is fixed succeeds.
    """
    if sqlstate is not None and sqlstate[:2] in _ROW_CLASSES:
        return DbErrorKind.ROW
    return DbErrorKind.ENVIRONMENT
