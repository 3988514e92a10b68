"""An Agent's spend in one budget period as the ledger knows it (read by the Agent controller).

The operator rebuilds an Agent's spend record in Redis from this after Redis lost it
(``openledger.controllers.agent``): the ledger's sum for the period plus the stream
events the ledger has not ingested yet. Both answers come from one statement, so one
snapshot: an event counted in the sum is exactly an event reported as ingested.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

# A rebuild must not hang on a sick database: the caller retries soon anyway.
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class LedgerSpend:
    spent_base_units: int  # the Agent's spend in the window (reversals subtracted)
    ingested: frozenset[str]  # the asked-for event ids that the ledger holds


def ledger_spend(conn: Conn, agent: str, window_ms: tuple[int, int], event_ids: Sequence[str]) -> LedgerSpend:
    """``agent``'s spend in [start, end) (Unix ms, whole UTC hours) and which of ``event_ids`` are ingested.

    The spend is ``agent_spend_hourly``'s, which buckets an event by its ``finished_at_ms``.
    """
    start_ms, end_ms = window_ms
    if start_ms % 3_600_000 or end_ms % 3_600_000:
        raise ValueError(f"window_ms: {window_ms} must start and end on whole hours (the ledger sums hours)")
    row = conn.execute(
        "SELECT (SELECT coalesce(sum(amount), 0)::text FROM agent_spend_hourly "
        "        WHERE agent = %s AND hour_start >= %s AND hour_start < %s), "
        "       (SELECT coalesce(array_agg(event_id::text), '{}') FROM usage_events "
        "        WHERE event_id = ANY(%s::uuid[]))",
        (agent, _utc(start_ms), _utc(end_ms), list(event_ids)),
    ).fetchone()
    assert row is not None  # a SELECT without FROM always returns one row
    return LedgerSpend(int(row[0]), frozenset(str(i) for i in row[1]))


def read_ledger_spend(
    database_url: str, agent: str, window_ms: tuple[int, int], event_ids: Sequence[str]
) -> LedgerSpend:
    """``ledger_spend`` on a connection of its own (blocking: run it in a thread).

    Raises ``psycopg.Error`` when the database cannot answer (unreachable, timeout…).
    """
    with psycopg.connect(
        database_url,
        connect_timeout=CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        autocommit=True,
    ) as conn:
        return ledger_spend(conn, agent, window_ms, event_ids)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
