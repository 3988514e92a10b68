"""Room on every page of the two cache tables, so their per-batch updates are HOT.

``account_balances`` and ``agent_spend_hourly`` are updated in place by every
batch (one row per account, per agent and hour). On full pages each update
writes its new row version to another page and a new entry into the primary
key index; with free space on the page PostgreSQL keeps it on the same page
and skips the index (a heap-only tuple). Existing pages get the room as they
are rewritten; new pages at once.

Revision ID: 0200_hot_cache_updates
Revises: 0100_settlement
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0200_hot_cache_updates"
down_revision: str | Sequence[str] | None = "0100_settlement"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CACHE_TABLES = ("account_balances", "agent_spend_hourly")
FILLFACTOR = 50  # models.CACHE_FILLFACTOR when this was written; a migration never changes


def upgrade() -> None:
    for table in CACHE_TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    for table in CACHE_TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
