"""Read side of the ledger, and the few writes that are not ingest (reversals).

Functions take an open psycopg connection and never commit unless they say so.
For the settlement package (issue 6):

* ``journal_cutoff(conn)`` — inside the transaction that closes an epoch: takes
  the journal lock exclusively (waits for in-flight ingest batches, blocks new
  ones until that transaction ends) and returns the highest committed journal
  entry id. No entry with a lower id can commit later, so a cutoff never moves.
* ``cumulative_earnings(conn, pool, up_to_entry_id)`` — per payee address, the
  net amount owners and contributors earned through ``pool`` in entries with
  ``id <= up_to_entry_id`` (reversals included, so it can go down).
* ``pool_fees(conn, pool, up_to_entry_id)`` — the pool's protocol fee.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from openledger.settlement.ledger import journal
from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import LedgerError
from openledger.settlement.ledger.journal import JOURNAL_LOCK_KEY

Conn = psycopg.Connection[Any]


def journal_cutoff(conn: Conn) -> int:
    """The highest committed journal id, stable for the rest of the caller's transaction (0 when empty).

    Needs READ COMMITTED (the default): the id is read by a second statement, so
    its snapshot includes every batch that committed while the lock was awaited.
    """
    isolation = conn.execute("SELECT current_setting('transaction_isolation')").fetchone()
    if not isolation or isolation[0] != "read committed":
        raise LedgerError(
            f"journal_cutoff needs a READ COMMITTED transaction, not {isolation[0] if isolation else '?'}"
        )
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (JOURNAL_LOCK_KEY,))
    row = conn.execute("SELECT coalesce(max(id), 0) FROM journal_entries").fetchone()
    assert row is not None
    return int(row[0])


def cumulative_earnings(conn: Conn, pool: str, up_to_entry_id: int) -> dict[str, int]:
    """``{payee address: net base units}`` credited to owners and contributors through ``pool``.

    An address that is both an owner and a contributor gets one total. Addresses
    are lower-case ``0x…``; addresses that net to zero are left out.
    """
    rows = conn.execute(
        "SELECT a.ref, sum(p.amount)::text FROM postings p JOIN accounts a ON a.key = p.account "
        "WHERE p.pool = %s AND p.entry_id <= %s AND a.kind = ANY(%s) GROUP BY a.ref",
        (pool, up_to_entry_id, list(sp.PAYEE_KINDS)),
    ).fetchall()
    return {str(ref): int(total) for ref, total in rows if int(total) != 0}


def pool_fees(conn: Conn, pool: str, up_to_entry_id: int) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(amount), 0)::text FROM postings WHERE pool = %s AND entry_id <= %s AND account = %s",
        (pool, up_to_entry_id, sp.fee_account(pool)),
    ).fetchone()
    return int(row[0]) if row else 0


def balance(conn: Conn, account: str) -> int:
    """Cached balance (primary-key lookup, what budget checks use); 0 for an unknown account."""
    row = conn.execute("SELECT balance::text FROM account_balances WHERE account = %s", (account,)).fetchone()
    return int(row[0]) if row else 0


def balance_from_postings(conn: Conn, account: str) -> int:
    row = conn.execute("SELECT coalesce(sum(amount), 0)::text FROM postings WHERE account = %s", (account,)).fetchone()
    return int(row[0]) if row else 0


def resolve_accounts(conn: Conn, name: str) -> list[str]:
    """``"owner:0xAB…"`` → ``["owner:0xab…"]``; an address or pool name → every account with that ref."""
    kind, sep, ref = name.partition(":")
    if sep and kind in sp.ACCOUNT_KINDS:
        return [f"{kind}:{ref.lower()}" if ref.startswith("0x") else name]
    rows = conn.execute("SELECT key FROM accounts WHERE ref = %s OR ref = %s ORDER BY key", (name, name.lower()))
    return [str(r[0]) for r in rows]


@dataclass(frozen=True)
class TraceLine:
    entry_id: int
    kind: str
    pool: str
    created_at: dt.datetime
    amount: int  # this account's posting in the entry
    running_balance: int
    event_count: int
    memo: str


def trace(conn: Conn, account: str, limit: int = 100) -> list[TraceLine]:
    """The entries behind ``account``'s balance, oldest first, with the running balance (last ``limit``)."""
    rows = conn.execute(
        "SELECT * FROM (SELECT e.id, e.kind, e.pool, e.created_at, p.amount::text, "
        "(sum(p.amount) OVER (ORDER BY e.id))::text, e.event_count, e.memo "
        "FROM postings p JOIN journal_entries e ON e.id = p.entry_id WHERE p.account = %s ORDER BY e.id DESC) t "
        "ORDER BY id DESC LIMIT %s",
        (account, limit),
    ).fetchall()
    return [TraceLine(int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), r[7]) for r in reversed(rows)]


@dataclass(frozen=True)
class EventLine:
    event_id: str
    stream_id: str
    agent: str
    model: str
    cost: int
    amount: int  # what this event posted to the traced account


def entry_events(conn: Conn, entry_id: int, account: str, limit: int = 1000) -> list[EventLine]:
    """The events of a usage entry and what each posted to ``account`` (recomputed by the pure split)."""
    rows = conn.execute(
        "SELECT event_id::text, stream_id, agent, model, cost::text, payer, owner, pool, fee_bps, contributors "
        "FROM usage_events WHERE entry_id = %s ORDER BY event_id LIMIT %s",
        (entry_id, limit),
    ).fetchall()
    out = []
    for eid, sid, agent, model, cost, payer, owner, pool, fee_bps, contributors in rows:
        postings = sp.event_postings(int(cost), payer, owner, pool, int(fee_bps), _contributors(contributors))
        amount = sum(a for acct, a in postings if acct == account)
        out.append(EventLine(eid, sid, agent, model, int(cost), amount))
    return out


def _contributors(wire: str) -> list[tuple[str, int]]:
    out = []
    for part in filter(None, wire.split(",")):
        account, bps, _role = part.split(":")
        out.append((account, int(bps)))
    return out


PERIODS = ("Hour", "Day", "Month")


def period_start(period: str, now: dt.datetime) -> dt.datetime:
    """Start (UTC) of the budget period containing ``now``."""
    now = now.astimezone(dt.UTC)
    if period == "Hour":
        return now.replace(minute=0, second=0, microsecond=0)
    if period == "Day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "Month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"period: {period!r} is not one of {PERIODS}")


def agent_spend(conn: Conn, agent: str, since: dt.datetime, until: dt.datetime | None = None) -> tuple[int, int]:
    """``(base units, events)`` an Agent (``namespace/name``) spent in whole hours from ``since`` to ``until``."""
    row = conn.execute(
        "SELECT coalesce(sum(amount), 0)::text, coalesce(sum(events), 0) FROM agent_spend_hourly "
        "WHERE agent = %s AND hour_start >= %s AND (%s::timestamptz IS NULL OR hour_start < %s)",
        (agent, since, until, until),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def spend_this_period(conn: Conn, agent: str, period: str, now: dt.datetime | None = None) -> int:
    return agent_spend(conn, agent, period_start(period, now or dt.datetime.now(dt.UTC)))[0]


def reverse_event(conn: Conn, event_id: str, memo: str) -> int:
    """Post the exact negation of one event's split as a new ``reversal`` entry; returns its id.

    Runs in the caller's transaction (commit it). An event can be reversed once:
    a second call raises ``LedgerError`` (unique ``reverses_event_id``).
    """
    row = conn.execute(
        "SELECT cost::text, payer, owner, pool, fee_bps, contributors, agent, finished_at_ms, entry_id "
        "FROM usage_events WHERE event_id = %s",
        (str(uuid.UUID(event_id)),),
    ).fetchone()
    if row is None:
        raise LedgerError(f"event {event_id}: not in the ledger")
    cost, payer, owner, pool, fee_bps, contributors, agent, finished_at_ms, entry_id = row
    if entry_id is None:
        raise LedgerError(f"event {event_id}: cost 0, nothing to reverse")
    already = conn.execute("SELECT id FROM journal_entries WHERE reverses_event_id = %s", (event_id,)).fetchone()
    if already:
        raise LedgerError(f"event {event_id}: already reversed by entry {already[0]}")
    postings = sp.aggregate(
        (a, -v) for a, v in sp.event_postings(int(cost), payer, owner, pool, int(fee_bps), _contributors(contributors))
    )
    entry = journal.Entry("reversal", postings, pool=pool, event_count=1, memo=memo, reverses_event_id=event_id)
    (new_id,) = journal.post(conn, [entry]).entry_ids
    conn.execute(
        "UPDATE agent_spend_hourly SET amount = amount - %s WHERE agent = %s AND hour_start = to_timestamp(%s * 3600)",
        (int(cost), agent, int(finished_at_ms) // 3_600_000),
    )
    return new_id
