"""Alembic environment of the ledger; configured in code by ``openledger.settlement.ledger.db``."""

from __future__ import annotations

import contextlib

from alembic import context
from sqlalchemy import create_engine, pool

from openledger.settlement.ledger.models import Base

# Later revisions (settlement) declare their tables on the same metadata.
with contextlib.suppress(ImportError):
    import openledger.settlement.schema  # noqa: F401

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(str(config.get_main_option("sqlalchemy.url")), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
