"""The chain identity of each pool's settlement state (``settlement_pools``).

A pool's epochs, payouts and publication intents belong to one contract: chain
id, distributor, token (and the epoch length that numbers its epochs). The
settler records them on its first pass and refuses to publish when the pool's
spec names another identity; the unique distributor keeps two pools off one
contract. Existing pools get their row on the first pass after the upgrade.

Revision ID: 0300_settlement_identity
Revises: 0200_hot_cache_updates
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0300_settlement_identity"
down_revision: str | Sequence[str] | None = "0200_hot_cache_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "settlement_pools",
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("distributor", sa.Text(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("epoch_seconds", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("pool", name="pk_settlement_pools"),
        sa.UniqueConstraint("chain_id", "distributor", name="uq_settlement_pools_distributor"),
    )


def downgrade() -> None:
    op.drop_table("settlement_pools")
