"""Writing one batch to PostgreSQL in one transaction.

Fast path (no duplicate in the batch): one round trip reserves a block of
journal ids (``nextval`` on a sequence with increment 1024) under a shared
advisory lock, then ``COPY`` the entries, the events, the postings, and upsert
the balance and spend caches, then ``COMMIT``. The event rows go in with
``COPY`` optimistically: a duplicate event id aborts it with a unique
violation, and only then the batch is written again through a temporary table
with ``INSERT … ON CONFLICT DO NOTHING``; the events that were not new are
classified as duplicates (same fields: no-op) or conflicts (different fields:
quarantined, counted, never overwriting).

Idempotency: writing the same batch any number of times (a crash between
COMMIT and XACK, a database restart mid-COMMIT, a reclaimed batch) posts each
event exactly once, because the event id is the primary key and the postings
are computed only from the events this transaction inserted.

The shared advisory lock lets ``queries.journal_cutoff`` (exclusive) wait for
in-flight batches, so an epoch's cutoff id is never passed by a later commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pg_errors

from openledger.settlement.ledger.errors import invariant
from openledger.settlement.ledger.ingest import (
    COPY_COLUMNS,
    IDENTITY_COLUMNS,
    BatchPlan,
    Conflict,
    assemble,
    record_fields,
)
from openledger.settlement.ledger.models import JOURNAL_ID_BLOCK

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: writers take it shared, journal_cutoff exclusive.
JOURNAL_LOCK_KEY = 0x4F4C4A4E4C  # "OLJNL"
_COLUMNS_SQL = ", ".join(COPY_COLUMNS)
_IDENTITY_T = ", ".join(f"t.{c}" for c in IDENTITY_COLUMNS)
_IDENTITY_U = ", ".join(f"u.{c}" for c in IDENTITY_COLUMNS)
_TMP = "ledger_ingest_tmp"


@dataclass
class WriteResult:
    inserted: int = 0
    duplicates: int = 0
    quarantined: int = 0  # newly quarantined rows
    conflicts: int = 0  # conflicting messages seen (including repeats of a quarantined one)
    entry_ids: list[int] = field(default_factory=list)
    postings: int = 0


class _Duplicates(Exception):
    """The optimistic COPY met an event id that is already stored."""


def _journal_ids(cur: psycopg.Cursor[tuple[object, ...]], count: int) -> int:
    """Take the shared journal lock and reserve ``count`` consecutive ids; returns the first."""
    row = cur.execute(
        "SELECT pg_advisory_xact_lock_shared(%s), nextval('journal_entry_id_seq')", (JOURNAL_LOCK_KEY,)
    ).fetchone()
    assert row is not None
    # The worker splits batches with more pools than one block holds (see LedgerWorker._write_retrying).
    invariant(count <= JOURNAL_ID_BLOCK, f"batch has {count} pools; one id block holds {JOURNAL_ID_BLOCK}")
    return int(str(row[1]))


class BatchWriter:
    """Owns one PostgreSQL connection; ``write`` is one transaction and may be retried."""

    def __init__(self, database_url: str, before_commit: Callable[[], None] | None = None) -> None:
        from openledger.settlement.ledger.db import libpq_url

        self.url = libpq_url(database_url)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._known_accounts: set[str] = set()
        self._before_commit = before_commit

    @property
    def conn(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, connect_timeout=5)
            self._conn.execute("SET statement_timeout = '120s'")
            self._conn.commit()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def discard_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # the connection is already broken
                log.debug("closing a broken connection failed", exc_info=True)
            self._conn = None

    def write(self, plan: BatchPlan, conflicts: Sequence[Conflict] = ()) -> WriteResult:
        """Write the batch; raises psycopg errors (the caller retries the temporary ones)."""
        conn = self.conn
        try:
            try:
                result = self._write_fast(conn, plan, conflicts)
            except _Duplicates:
                conn.rollback()
                result = self._write_deduplicating(conn, plan, conflicts)
            if self._before_commit is not None:
                self._before_commit()
            conn.commit()
        except BaseException:
            if not conn.closed:
                try:
                    conn.rollback()
                except psycopg.Error:
                    self.discard_connection()
            raise
        self._known_accounts.update(a for entry in plan.entries for a in entry.postings)
        return result

    # ------------------------------------------------------------- the paths

    def _write_fast(
        self, conn: psycopg.Connection[tuple[object, ...]], plan: BatchPlan, conflicts: Sequence[Conflict]
    ) -> WriteResult:
        cur = conn.cursor()
        first = _journal_ids(cur, plan.entry_count)
        data = plan.copy_data(first)
        self._write_entries(cur, plan, first)
        try:
            with cur.copy(f"COPY usage_events ({_COLUMNS_SQL}) FROM STDIN") as copy:
                copy.write(data)
        except pg_errors.UniqueViolation as exc:
            raise _Duplicates from exc
        invariant(cur.rowcount == len(plan.records), f"COPY stored {cur.rowcount} of {len(plan.records)} events")
        result = WriteResult(inserted=len(plan.records))
        result.quarantined, result.conflicts = self._quarantine(cur, conflicts)
        self._write_postings(cur, plan, first, result)
        return result

    def _write_deduplicating(
        self, conn: psycopg.Connection[tuple[object, ...]], plan: BatchPlan, conflicts: Sequence[Conflict]
    ) -> WriteResult:
        cur = conn.cursor()
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_TMP} (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY {_TMP} ({_COLUMNS_SQL}) FROM STDIN") as copy:
            copy.write(plan.copy_data(0))
        new_ids = {
            str(r[0])
            for r in cur.execute(
                f"SELECT t.event_id::text FROM {_TMP} t "
                "WHERE NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.event_id = t.event_id)"
            )
        }
        new_records = [r for r in plan.records if r.event_id.decode() in new_ids]
        new_plan = assemble(new_records)
        first = _journal_ids(cur, new_plan.entry_count)
        self._write_entries(cur, new_plan, first)
        entry_of_pool = {e.pool: first + e.entry_offset for e in new_plan.entries}
        cur.execute(
            f"INSERT INTO usage_events ({_COLUMNS_SQL}) "
            f"SELECT {', '.join('t.' + c for c in COPY_COLUMNS[:-1])}, "
            "CASE WHEN t.cost > 0 THEN (%s::jsonb ->> t.pool)::bigint END "
            f"FROM {_TMP} t WHERE t.event_id = ANY(%s::uuid[]) ON CONFLICT (event_id) DO NOTHING",
            (psycopg.types.json.Jsonb(entry_of_pool), sorted(new_ids)),
        )
        if cur.rowcount != len(new_ids):
            # Another worker stored one of them since the check: write the batch again.
            raise pg_errors.SerializationFailure(f"{len(new_ids) - cur.rowcount} events were stored concurrently")
        stored_conflicts = [
            Conflict(str(r[0]), str(r[1]), {}, "event id already stored with different fields")
            for r in cur.execute(
                f"SELECT t.event_id::text, t.stream_id FROM {_TMP} t JOIN usage_events u USING (event_id) "
                f"WHERE ROW({_IDENTITY_T}) IS DISTINCT FROM ROW({_IDENTITY_U})"
            )
        ]
        by_id = {r.event_id.decode(): r for r in plan.records}
        for c in stored_conflicts:
            c.fields.update(record_fields(by_id[c.event_id]))
        result = WriteResult(inserted=len(new_ids))
        result.quarantined, result.conflicts = self._quarantine(cur, [*conflicts, *stored_conflicts])
        result.duplicates = len(plan.records) - len(new_ids) - len(stored_conflicts)
        self._write_postings(cur, new_plan, first, result)
        return result

    # ------------------------------------------------------------- the parts

    @staticmethod
    def _write_entries(cur: psycopg.Cursor[tuple[object, ...]], plan: BatchPlan, first: int) -> None:
        if not plan.entries:
            return
        with cur.copy("COPY journal_entries (id, kind, pool, event_count, amount) FROM STDIN") as copy:
            for e in plan.entries:
                copy.write_row((first + e.entry_offset, "usage", e.pool, e.event_count, e.amount))

    def _write_postings(
        self, cur: psycopg.Cursor[tuple[object, ...]], plan: BatchPlan, first: int, result: WriteResult
    ) -> None:
        if not plan.entries:
            self._write_spend(cur, plan)
            return
        accounts = sorted({a for e in plan.entries for a in e.postings} - self._known_accounts)
        if accounts:
            cur.execute(
                "INSERT INTO accounts (key, kind, ref) SELECT k, split_part(k, ':', 1), substr(k, strpos(k, ':') + 1) "
                "FROM unnest(%s::text[]) AS k ON CONFLICT (key) DO NOTHING",
                (_array(accounts),),
            )
        with cur.copy("COPY postings (entry_id, account, pool, amount) FROM STDIN") as copy:
            for e in plan.entries:
                for account, amount in e.postings.items():
                    copy.write_row((first + e.entry_offset, account, e.pool, amount))
                    result.postings += 1
        last = first + plan.entries[-1].entry_offset
        result.entry_ids = [first + e.entry_offset for e in plan.entries]
        # Postcondition, read back inside the transaction: every entry sums to zero.
        unbalanced = cur.execute(
            "SELECT entry_id, sum(amount)::text FROM postings WHERE pool = ANY(%s) AND entry_id BETWEEN %s AND %s "
            "GROUP BY entry_id HAVING sum(amount) <> 0 OR count(*) = 0",
            ([e.pool for e in plan.entries], first, last),
        ).fetchall()
        invariant(not unbalanced, f"entries do not balance after writing: {unbalanced[:5]}")
        deltas = plan.balance_deltas()
        cur.execute(
            "INSERT INTO account_balances (account, balance, last_entry_id) "
            "SELECT a, b, %s FROM unnest(%s::text[], %s::numeric[]) AS x(a, b) "
            "ON CONFLICT (account) DO UPDATE SET balance = account_balances.balance + EXCLUDED.balance, "
            "last_entry_id = GREATEST(account_balances.last_entry_id, EXCLUDED.last_entry_id), updated_at = now()",
            (last, _array(list(deltas)), _array([str(v) for v in deltas.values()])),
        )
        self._write_spend(cur, plan)

    @staticmethod
    def _write_spend(cur: psycopg.Cursor[tuple[object, ...]], plan: BatchPlan) -> None:
        if not plan.spend:
            return
        keys = sorted(plan.spend)
        cur.execute(
            "INSERT INTO agent_spend_hourly (agent, hour_start, amount, events) "
            "SELECT a, to_timestamp(h * 3600), m, n FROM unnest(%s::text[], %s::bigint[], %s::numeric[], %s::bigint[]) "
            "AS x(a, h, m, n) ON CONFLICT (agent, hour_start) DO UPDATE SET amount = agent_spend_hourly.amount "
            "+ EXCLUDED.amount, events = agent_spend_hourly.events + EXCLUDED.events",
            (
                _array([k[0] for k in keys]),
                _array([str(k[1]) for k in keys]),
                _array([str(plan.spend[k][0]) for k in keys]),
                _array([str(plan.spend[k][1]) for k in keys]),
            ),
        )

    @staticmethod
    def _quarantine(cur: psycopg.Cursor[tuple[object, ...]], conflicts: Sequence[Conflict]) -> tuple[int, int]:
        if not conflicts:
            return 0, 0
        new = 0
        for c in conflicts:
            row = cur.execute(
                "INSERT INTO usage_quarantine (event_id, stream_id, fields, fields_sha256, reason) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT ON CONSTRAINT uq_usage_quarantine_event_fields DO NOTHING "
                "RETURNING id",
                (c.event_id, c.stream_id, psycopg.types.json.Jsonb(c.fields), c.fields_sha256, c.reason),
            ).fetchone()
            new += row is not None
            log.warning(
                "usage event quarantined",
                extra={"action": "quarantine", "event_id": c.event_id, "stream_id": c.stream_id, "reason": c.reason},
            )
        return new, len(conflicts)


def _array(items: list[str]) -> str:
    """A PostgreSQL array literal, passed as one text parameter (psycopg's list dumper costs
    microseconds per element). Every element is double-quoted and escaped."""
    return "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}"
