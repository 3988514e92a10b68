"""The ledger package's public surface, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import openledger.settlement.ledger as ledger


def test_public_names_are_pinned() -> None:
    assert ledger.__all__ == [
        "DriftError",
        "InvariantViolation",
        "LedgerError",
        "PoisonEvent",
        "Split",
        "aggregate",
        "event_postings",
        "split_cost",
    ]


def test_importing_the_split_loads_no_database_or_redis_client() -> None:
    code = (
        "import sys; import openledger.settlement.ledger.ingest; "
        "print(sorted(m for m in ('psycopg', 'redis', 'hiredis', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
