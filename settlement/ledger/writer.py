"""Writing one batch to PostgreSQL in one transaction.

Fast path (no duplicate in the batch): ``journal.post`` posts one entry per
pool (shared journal lock, one block of ids, entries, postings, balances,
sum-to-zero read back), then the events go in with ``COPY`` carrying their
entry ids, the spend cache is upserted, and the transaction commits. The
event rows go in optimistically: a duplicate event id aborts the ``COPY``
with a unique violation, and only then the batch is written again through a
temporary table with ``INSERT … ON CONFLICT DO NOTHING``; the events that
were not new are classified as duplicates (same fields: no-op) or conflicts
(different fields: quarantined, counted, never overwriting).

Idempotency: writing the same batch any number of times (a crash between
COMMIT and XACK, a database restart mid-COMMIT, a reclaimed batch) posts each
event exactly once, because the event id is the primary key and the postings
are computed only from the events this transaction inserted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pg_errors

from openledger.settlement.ledger import journal
from openledger.settlement.ledger.errors import invariant
from openledger.settlement.ledger.ingest import (
    COPY_COLUMNS,
    IDENTITY_COLUMNS,
    BatchPlan,
    Conflict,
    assemble,
    record_fields,
)
from openledger.settlement.ledger.journal import array_literal

log = logging.getLogger(__name__)

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

    def write(self, plan: BatchPlan, conflicts: Sequence[Conflict] = (), *, dry_run: bool = False) -> WriteResult:
        """Write the batch; raises psycopg errors (the caller retries the temporary ones).

        ``dry_run``: do everything, then roll back instead of committing (the result
        says what the write would have done)."""
        conn = self.conn
        try:
            try:
                result = self._write_fast(conn, plan, conflicts)
            except _Duplicates:
                conn.rollback()
                result = self._write_deduplicating(conn, plan, conflicts)
            if dry_run:
                conn.rollback()
                return result
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
        posted = self._post(cur, plan)
        data = plan.copy_data(posted.first_id if posted.entry_ids else 0)
        try:
            with cur.copy(f"COPY usage_events ({_COLUMNS_SQL}) FROM STDIN") as copy:
                copy.write(data)
        except pg_errors.UniqueViolation as exc:
            raise _Duplicates from exc
        invariant(cur.rowcount == len(plan.records), f"COPY stored {cur.rowcount} of {len(plan.records)} events")
        result = WriteResult(inserted=len(plan.records), entry_ids=posted.entry_ids, postings=posted.postings)
        result.quarantined, result.conflicts = self._quarantine(cur, conflicts)
        self._write_spend(cur, plan)
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
        posted = self._post(cur, new_plan)
        entry_of_pool = {e.pool: posted.entry_ids[e.entry_offset] for e in new_plan.entries}
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
        result = WriteResult(inserted=len(new_ids), entry_ids=posted.entry_ids, postings=posted.postings)
        result.quarantined, result.conflicts = self._quarantine(cur, [*conflicts, *stored_conflicts])
        result.duplicates = len(plan.records) - len(new_ids) - len(stored_conflicts)
        self._write_spend(cur, new_plan)
        return result

    # ------------------------------------------------------------- the parts

    def _post(self, cur: psycopg.Cursor[tuple[object, ...]], plan: BatchPlan) -> journal.Posted:
        """One ``usage`` journal entry per pool of the plan (ids in the plan's entry order)."""
        entries = [journal.Entry("usage", e.postings, pool=e.pool, event_count=e.event_count) for e in plan.entries]
        return journal.post(cur, entries, known_accounts=self._known_accounts)

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


_array = array_literal
