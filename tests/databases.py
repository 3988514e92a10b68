"""Throwaway PostgreSQL databases on the session's server: one per test that needs its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from openledger.settlement.ledger import db as ledger_db


@contextmanager
def fresh_database(database_url: str, prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """Create ``<prefix>_<random>`` beside ``database_url`` (migrated unless told not to); drop it after."""
    server, _ = database_url.rsplit("/", 1)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{server}/{name}"
    try:
        if migrate:
            ledger_db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
