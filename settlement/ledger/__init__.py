"""The double-entry ledger: usage events from the Redis stream into PostgreSQL, exactly once.

Modules (only ``split`` and ``ingest`` are pure; the others do I/O):

- ``split``     the revenue split of one event and the account names (pure)
- ``ingest``    stream entry → checked record → one batch's rows and postings (pure)
- ``models``    the SQLAlchemy schema; ``migrations/`` the Alembic chain (base ``0001_ledger_base``)
- ``db``        ``upgrade(url)`` (``openledger db upgrade``), connections
- ``writer``    one batch, one transaction (COPY; duplicate-safe fallback)
- ``worker``    the ``openledger ledger-worker`` process (consumer group, XACK after COMMIT,
                XAUTOCLAIM, dead letters)
- ``queries``   balances, traces, spend, and for settlement ``journal_cutoff`` and
                ``cumulative_earnings``
- ``verify``    ``openledger ledger verify``
- ``metrics``   ``openledger_ledger_*``

This package imports nothing heavy itself: ``from openledger.settlement.ledger import split_cost``
does not load psycopg or Redis.
"""

from __future__ import annotations

from openledger.settlement.ledger.errors import DriftError, InvariantViolation, LedgerError, PoisonEvent
from openledger.settlement.ledger.split import Split, aggregate, event_postings, split_cost

__all__ = [
    "DriftError",
    "InvariantViolation",
    "LedgerError",
    "PoisonEvent",
    "Split",
    "aggregate",
    "event_postings",
    "split_cost",
]
