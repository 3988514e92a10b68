"""Settlement tables: signed transactions, nonces, payouts with Merkle proofs.

Owned by the settlement path (issue 6), chained after the ledger's base schema.

Revision ID: 0100_settlement
Revises: 0001_ledger_base
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0100_settlement"
down_revision: str | Sequence[str] | None = "0001_ledger_base"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(precision=78, scale=0, asdecimal=False)


def upgrade() -> None:
    op.create_table(
        "settlement_txs",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("intent", sa.Text(), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("tx_hash", sa.Text(), nullable=False),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=False),
        sa.Column("to_address", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("gas", sa.BigInteger(), nullable=False),
        sa.Column("max_fee_per_gas", MONEY, nullable=False),
        sa.Column("max_priority_fee_per_gas", MONEY, nullable=False),
        sa.Column("state", sa.Text(), server_default="signed", nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("block_hash", sa.Text(), nullable=True),
        sa.Column("receipt_status", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "state IN ('signed','broadcast','mined','confirmed','replaced','failed')",
            name=op.f("ck_settlement_txs_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settlement_txs")),
        sa.UniqueConstraint("chain_id", "sender", "nonce", "attempt", name="uq_settlement_txs_nonce_attempt"),
        sa.UniqueConstraint("tx_hash", name=op.f("uq_settlement_txs_tx_hash")),
    )
    op.create_index("ix_settlement_txs_intent", "settlement_txs", ["intent"], unique=False)
    op.create_table(
        "settlement_nonces",
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("next_nonce", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", "sender", name="pk_settlement_nonces"),
    )
    op.create_table(
        "settlement_payouts",
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("earned", MONEY, nullable=False),
        sa.Column("proof", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("pool", "epoch", "account", name="pk_settlement_payouts"),
    )
    op.create_table(
        "settlement_epoch_totals",
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("earned", MONEY, nullable=False),
        sa.Column("payees_below_min", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("pool", "epoch", name="pk_settlement_epoch_totals"),
    )


def downgrade() -> None:
    op.drop_table("settlement_epoch_totals")
    op.drop_table("settlement_payouts")
    op.drop_table("settlement_nonces")
    op.drop_index("ix_settlement_txs_intent", table_name="settlement_txs")
    op.drop_table("settlement_txs")
