"""Database plumbing of the ledger: engines, connections, Alembic in code.

``upgrade(url)`` is what ``openledger db upgrade`` runs; it works from any
working directory because the script location is this package's folder.
Later packages (settlement epochs) add revisions whose ``down_revision`` is
``HEAD_REVISION`` of this package or a later one.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, pool, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The ledger's base revision chain ends here (issue 6 builds on it).
HEAD_REVISION = "0001_ledger_base"


def sqlalchemy_url(url: str) -> str:
    """``postgresql://…`` → ``postgresql+psycopg://…`` (SQLAlchemy wants the driver named)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The inverse: a plain ``postgresql://`` URL for psycopg and psql."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


# Several workers may start at once; the first migrates, the others wait and find nothing to do.
_MIGRATION_LOCK_KEY = 0x4F4C4D4947  # "OLMIG"


def upgrade(url: str, revision: str = "heads") -> None:
    """Apply migrations up to ``revision`` (all heads by default). Safe to run again and concurrently."""
    config = alembic_config(url)
    with engine(url).connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        conn.commit()
        try:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            conn.commit()


def current_revision(url: str) -> str | None:
    with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None


def engine(url: str) -> Engine:
    return create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """A plain psycopg connection (the worker and queries use psycopg directly for COPY)."""
    return psycopg.connect(libpq_url(url), autocommit=autocommit, connect_timeout=5)
