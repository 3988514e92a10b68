"""Ledger base schema: accounts, journal, postings, usage events, quarantine, caches, epochs.

The immutable tables reject UPDATE, DELETE and TRUNCATE with triggers, so a
correction can only be a new reversing entry. Revision ids are stable: later
migrations (settlement) point their ``down_revision`` at this one.

Revision ID: 0001_ledger_base
Revises:
Create Date: 2026-11-25 14:41:50.564435
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_ledger_base"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


IMMUTABLE_TABLES = ("journal_entries", "postings", "usage_events", "usage_quarantine")

REJECT_FUNCTION = """
CREATE FUNCTION ledger_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger: % on % is not allowed; the ledger is append-only (post a reversing entry)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END;
$$
"""


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("journal_entry_id_seq", increment=1024, start=1)))
    op.create_table(
        "accounts",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("ref", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "kind IN ('agent','owner','contributor','pool_fee','protocol','external')", name=op.f("ck_accounts_kind")
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_accounts")),
    )
    op.create_index("ix_accounts_ref", "accounts", ["ref"], unique=False)
    op.create_table(
        "agent_spend_hourly",
        sa.Column("agent", sa.Text(), nullable=False),
        sa.Column("hour_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agent", "hour_start", name=op.f("pk_agent_spend_hourly")),
    )
    op.create_table(
        "epochs",
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'open'"), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cutoff_entry_id", sa.BigInteger(), nullable=True),
        sa.Column("root", sa.Text(), nullable=True),
        sa.Column("total", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=True),
        sa.Column("payee_count", sa.Integer(), nullable=True),
        sa.Column("tx_hash", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("pool", "epoch", name=op.f("pk_epochs")),
    )
    op.create_table(
        "journal_entries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("pool", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("event_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("amount", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("reverses_event_id", sa.UUID(), nullable=True),
        sa.Column("memo", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('usage','reversal','transfer')", name=op.f("ck_journal_entries_kind")),
        sa.CheckConstraint("amount >= 0", name=op.f("ck_journal_entries_amount_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_journal_entries")),
        sa.UniqueConstraint("reverses_event_id", name=op.f("uq_journal_entries_reverses_event_id")),
    )
    op.create_index("ix_journal_entries_pool_id", "journal_entries", ["pool", "id"], unique=False)
    op.create_table(
        "usage_events",
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("agent", sa.Text(), nullable=False),
        sa.Column("payer", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("decimals", sa.SmallInteger(), nullable=False),
        sa.Column("per_request", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("per_input_token", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("per_output_token", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("contributors", sa.Text(), nullable=False),
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("fee_bps", sa.Integer(), nullable=False),
        sa.Column("extra", sa.Text(), nullable=False),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_usage_events")),
    )
    op.create_index("ix_usage_events_entry_id", "usage_events", ["entry_id"], unique=False)
    op.create_table(
        "usage_quarantine",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("fields", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("fields_sha256", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_quarantine")),
        sa.UniqueConstraint("event_id", "fields_sha256", name="uq_usage_quarantine_event_fields"),
    )
    op.create_table(
        "account_balances",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("balance", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.Column("last_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["account"], ["accounts.key"], name=op.f("fk_account_balances_account_accounts")),
        sa.PrimaryKeyConstraint("account", name=op.f("pk_account_balances")),
    )
    op.create_table(
        "postings",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=78, scale=0, asdecimal=False), nullable=False),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_postings_amount_nonzero")),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["journal_entries.id"], name=op.f("fk_postings_entry_id_journal_entries")
        ),
        sa.PrimaryKeyConstraint("account", "entry_id", name=op.f("pk_postings")),
    )
    op.create_index("ix_postings_pool_entry", "postings", ["pool", "entry_id"], unique=False)
    op.alter_column("journal_entries", "id", server_default=sa.text("nextval('journal_entry_id_seq')"))
    op.execute(REJECT_FUNCTION)
    for table in IMMUTABLE_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_reject_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change()"
        )


def downgrade() -> None:
    for table in IMMUTABLE_TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    op.execute("DROP FUNCTION IF EXISTS ledger_reject_change()")
    op.drop_index("ix_postings_pool_entry", table_name="postings")
    op.drop_table("postings")
    op.drop_table("account_balances")
    op.drop_table("usage_quarantine")
    op.drop_index("ix_usage_events_entry_id", table_name="usage_events")
    op.drop_table("usage_events")
    op.drop_index("ix_journal_entries_pool_id", table_name="journal_entries")
    op.drop_table("journal_entries")
    op.drop_table("epochs")
    op.drop_table("agent_spend_hourly")
    op.drop_index("ix_accounts_ref", table_name="accounts")
    op.drop_table("accounts")
    op.execute(sa.schema.DropSequence(sa.Sequence("journal_entry_id_seq")))
