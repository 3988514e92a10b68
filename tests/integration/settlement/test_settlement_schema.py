"""The settlement migration produces exactly the tables declared in ``settlement/schema.py``."""

from __future__ import annotations

from typing import Any

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from openledger.settlement import schema
from openledger.settlement.ledger import db

SETTLEMENT_TABLES = {name for name in schema.metadata.tables if name.startswith("settlement_")}


def test_settlement_migration_matches_the_schema_module(settle_db: str) -> None:
    assert {
        "settlement_txs",
        "settlement_nonces",
        "settlement_payouts",
        "settlement_epoch_totals",
        "settlement_pools",
    } == SETTLEMENT_TABLES

    def ours(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table in SETTLEMENT_TABLES

    with db.engine(settle_db).connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True, "include_object": ours}
        )
        assert compare_metadata(context, schema.metadata) == []


def test_transactions_are_unique_per_nonce_attempt_and_hash(settle_db: str) -> None:
    with psycopg.connect(settle_db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'settlement_txs' AND indexdef LIKE '%UNIQUE%'"
        ).fetchone()
    assert row is not None and row[0] >= 3  # primary key, (chain, sender, nonce, attempt), tx_hash
