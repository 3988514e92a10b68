"""The schema: migrations equal the models, and the journal cannot be edited in place."""

from __future__ import annotations

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from openledger.settlement.ledger import db
from openledger.settlement.ledger.models import CACHE_FILLFACTOR, IMMUTABLE_TABLES, Base

from .conftest import LedgerEnv

LEDGER_TABLES = set(Base.metadata.tables) - {t for t in Base.metadata.tables if t.startswith("settlement_")}


def test_migrations_produce_exactly_the_models_schema(ledger_env: LedgerEnv) -> None:
    def ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = getattr(obj, "table", None)
        table_name = name if type_ == "table" else getattr(table, "name", None)
        return table_name in LEDGER_TABLES

    with db.engine(ledger_env.database_url).connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True, "include_object": ours}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_the_cache_tables_leave_room_for_hot_updates(ledger_env: LedgerEnv) -> None:
    with psycopg.connect(ledger_env.database_url) as conn:
        rows = conn.execute(
            "SELECT relname, reloptions FROM pg_class WHERE relname IN ('account_balances', 'agent_spend_hourly')"
        ).fetchall()
    assert sorted(rows) == [(t, [f"fillfactor={CACHE_FILLFACTOR}"]) for t in ("account_balances", "agent_spend_hourly")]


def test_upgrade_runs_again_as_a_no_op(ledger_env: LedgerEnv) -> None:
    before = db.current_revision(ledger_env.database_url)
    db.upgrade(ledger_env.database_url)
    assert db.current_revision(ledger_env.database_url) == before
    scripts = ScriptDirectory.from_config(db.alembic_config(ledger_env.database_url))
    assert before in {s.revision for s in scripts.get_revisions("heads")}
    assert db.HEAD_REVISION in {s.revision for s in scripts.iterate_revisions(before, "base")}


@pytest.mark.parametrize("table", IMMUTABLE_TABLES)
@pytest.mark.parametrize("statement", ["UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t} CASCADE"])
def test_the_journal_rejects_changes_in_place(ledger_env: LedgerEnv, table: str, statement: str) -> None:
    column = {"journal_entries": "memo", "postings": "pool", "usage_events": "agent", "usage_quarantine": "reason"}[
        table
    ]
    with psycopg.connect(ledger_env.database_url) as conn:
        conn.execute(
            "INSERT INTO accounts (key, kind, ref) "
            "VALUES ('external:x', 'external', 'x'), ('external:y', 'external', 'y')"
        )
        conn.execute("INSERT INTO journal_entries (id, kind, amount) VALUES (1, 'transfer', 5)")
        conn.execute(
            "INSERT INTO postings (entry_id, account, pool, amount) "
            "VALUES (1, 'external:x', '', 5), (1, 'external:y', '', -5)"
        )
        conn.execute(
            "INSERT INTO usage_events VALUES ('0192f0c4-0000-7000-8000-000000000001', "
            "'a/b', '0x1', 'm', '0x2', 'OPEN', 18, "
            "0, 0, 0, 0, 0, 0, 'ok', 1, 2, '', '', 0, '', '1-0', NULL)"
        )
        conn.execute(
            "INSERT INTO usage_quarantine (event_id, stream_id, fields, fields_sha256, reason) "
            "VALUES ('0192f0c4-0000-7000-8000-000000000001', '2-0', '{}', 'x', 'conflict')"
        )
        conn.commit()
        with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            conn.execute(statement.format(t=table, c=column))
