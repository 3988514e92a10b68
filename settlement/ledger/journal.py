"""Posting journal entries: the one way anything writes to the journal.

A journal entry is a set of postings ``(account, amount)`` that sum to exactly
zero (credits positive, debits negative, integers in base units), plus the
entry's metadata (``kind``, ``pool``, event count, memo, the event it reverses).
``post(conn_or_cursor, entries)`` writes one or more entries inside the
caller's transaction and does every step each of them needs, in this order:

1. checks each entry (precondition): at least one posting, every amount a
   non-zero ``int``, every account a valid ``<kind>:<ref>`` key, the sum zero;
2. takes the journal lock *shared* (``pg_advisory_xact_lock_shared``): writers
   never wait for each other, while ``queries.journal_cutoff`` takes it
   exclusive and so waits for every entry in flight before it picks an
   epoch's cutoff id;
3. reserves the ids with one ``nextval`` of ``journal_entry_id_seq`` (its
   increment is ``JOURNAL_ID_BLOCK``, so one call reserves that many
   consecutive ids): entry ``i`` gets ``first + i``;
4. inserts the entries, the accounts it has not seen, the postings (``COPY``),
   and adds the deltas to the cached ``account_balances``;
5. reads the postings back (postcondition): each entry has postings and sums
   to zero, or ``InvariantViolation`` is raised and the transaction must be
   rolled back.

Used by the ingest batch writer (one ``usage`` entry per pool of a batch), by
reversals (``kind='reversal'``) and by epoch closing entries
(``kind='transfer'``). What is specific to a caller (usage events and spend
for ingest, the spend correction of a reversal, the epoch row) stays with it,
in the same transaction.

Not idempotent by itself: posting the same entry twice posts it twice. Each
caller makes its write idempotent with its own unique key in the same
transaction (the event id for usage, ``reverses_event_id`` for reversals, the
epoch row for closing entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import psycopg
from psycopg.rows import tuple_row

from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import InvariantViolation, invariant
from openledger.settlement.ledger.models import JOURNAL_ID_BLOCK

# pg_advisory_xact_lock key: writers take it shared, journal_cutoff exclusive.
JOURNAL_LOCK_KEY = 0x4F4C4A4E4C  # "OLJNL"
EntryKind = Literal["usage", "reversal", "transfer"]
ENTRY_KINDS: tuple[EntryKind, ...] = get_args(EntryKind)


@dataclass(frozen=True)
class Entry:
    """One journal entry to post: its postings and metadata.

    ``postings`` maps account key (``"owner:0x…"``) to a non-zero integer amount
    in base units; they must sum to zero. Every posting row carries the entry's
    ``pool`` (``""`` for entries that belong to no pool, like closing entries).
    ``amount`` (the entry's size, stored on ``journal_entries``) is the sum of
    the credits.
    """

    kind: EntryKind
    postings: Mapping[str, int]
    pool: str = ""
    event_count: int = 0
    memo: str = ""
    reverses_event_id: str | None = None

    @property
    def amount(self) -> int:
        return sum(a for a in self.postings.values() if a > 0)


@dataclass(frozen=True)
class Posted:
    """What ``post`` wrote: one id per entry (consecutive, in the order given)."""

    entry_ids: list[int] = field(default_factory=list)
    postings: int = 0
    accounts: frozenset[str] = frozenset()

    @property
    def first_id(self) -> int:
        return self.entry_ids[0]


Target = psycopg.Connection[Any] | psycopg.Cursor[Any]


def check_entry(entry: Entry) -> None:
    """The precondition of one entry (pure); raises ``InvariantViolation`` naming what is wrong."""
    where = f"{entry.kind} entry of pool {entry.pool!r}"
    invariant(entry.kind in ENTRY_KINDS, f"{where}: kind must be one of {ENTRY_KINDS}")
    invariant(bool(entry.postings), f"{where}: has no postings")
    for account, amount in entry.postings.items():
        invariant(type(amount) is int, f"{where}: amount of {account} is {type(amount).__name__}, not int")
        invariant(amount != 0, f"{where}: posting of 0 to {account}")
    total = sum(entry.postings.values())
    invariant(total == 0, f"{where}: postings sum to {total}, not 0")


def post(target: Target, entries: Sequence[Entry], *, known_accounts: Set[str] = frozenset()) -> Posted:
    """Post ``entries`` in the caller's transaction; returns their ids (see the module docstring).

    ``known_accounts``: accounts the caller knows exist already (a cache), so
    their ``INSERT … ON CONFLICT DO NOTHING`` can be skipped. The caller
    commits; on any exception it must roll back.
    """
    if not entries:
        return Posted()
    invariant(len(entries) <= JOURNAL_ID_BLOCK, f"{len(entries)} entries; one id block holds {JOURNAL_ID_BLOCK}")
    for entry in entries:
        check_entry(entry)
    conn = target if isinstance(target, psycopg.Connection) else target.connection
    cur = conn.cursor(row_factory=tuple_row)  # the caller's transaction, whatever its row factory
    first = _reserve_ids(cur)
    ids = [first + i for i in range(len(entries))]
    with cur.copy(
        "COPY journal_entries (id, kind, pool, event_count, amount, reverses_event_id, memo) FROM STDIN"
    ) as copy:
        for entry_id, e in zip(ids, entries, strict=True):
            copy.write_row((entry_id, e.kind, e.pool, e.event_count, e.amount, e.reverses_event_id, e.memo))
    accounts = {a for e in entries for a in e.postings}
    _insert_accounts(cur, sorted(accounts - known_accounts))
    rows = 0
    with cur.copy("COPY postings (entry_id, account, pool, amount) FROM STDIN") as copy:
        for entry_id, e in zip(ids, entries, strict=True):
            for account, amount in e.postings.items():
                copy.write_row((entry_id, account, e.pool, amount))
                rows += 1
    _add_to_balances(cur, entries, ids[-1])
    _check_balanced(cur, entries, ids)
    return Posted(ids, rows, frozenset(accounts))


def _reserve_ids(cur: psycopg.Cursor[tuple[Any, ...]]) -> int:
    row = cur.execute(
        "SELECT pg_advisory_xact_lock_shared(%s), nextval('journal_entry_id_seq')", (JOURNAL_LOCK_KEY,)
    ).fetchone()
    if row is None:
        raise InvariantViolation("nextval returned no row")
    return int(str(row[1]))


def _insert_accounts(cur: psycopg.Cursor[Any], accounts: list[str]) -> None:
    if not accounts:
        return
    kinds, refs = [], []
    for account in accounts:
        try:
            kind, ref = sp.parse_account(account)
        except ValueError as exc:
            raise InvariantViolation(str(exc)) from None
        kinds.append(kind)
        refs.append(ref)
    cur.execute(
        "INSERT INTO accounts (key, kind, ref) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]) "
        "ON CONFLICT (key) DO NOTHING",
        (array_literal(accounts), array_literal(kinds), array_literal(refs)),
    )


def _add_to_balances(cur: psycopg.Cursor[Any], entries: Sequence[Entry], last_id: int) -> None:
    deltas: dict[str, int] = {}
    for entry in entries:
        for account, amount in entry.postings.items():
            deltas[account] = deltas.get(account, 0) + amount
    changed = sorted((a, d) for a, d in deltas.items() if d)
    if not changed:
        return
    cur.execute(
        "INSERT INTO account_balances (account, balance, last_entry_id) "
        "SELECT a, b, %s FROM unnest(%s::text[], %s::numeric[]) AS x(a, b) "
        "ON CONFLICT (account) DO UPDATE SET balance = account_balances.balance + EXCLUDED.balance, "
        "last_entry_id = GREATEST(account_balances.last_entry_id, EXCLUDED.last_entry_id), updated_at = now()",
        (last_id, array_literal([a for a, _ in changed]), array_literal([str(d) for _, d in changed])),
    )


def _check_balanced(cur: psycopg.Cursor[tuple[Any, ...]], entries: Sequence[Entry], ids: list[int]) -> None:
    """Postcondition, read back inside the transaction: every entry has postings that sum to zero."""
    rows = cur.execute(
        "SELECT entry_id, sum(amount)::text FROM postings WHERE pool = ANY(%s) AND entry_id BETWEEN %s AND %s "
        "GROUP BY entry_id",
        (sorted({e.pool for e in entries}), ids[0], ids[-1]),
    ).fetchall()
    sums = {int(r[0]): int(r[1]) for r in rows}
    unbalanced = [(i, s) for i, s in sorted(sums.items()) if s != 0]
    invariant(not unbalanced, f"entries do not balance after writing: {unbalanced[:5]}")
    missing = sorted(set(ids) - set(sums))
    invariant(not missing, f"entries without postings after writing: {missing[:5]}")


def array_literal(items: Sequence[str]) -> str:
    """A PostgreSQL array literal, passed as one text parameter (psycopg's list dumper costs
    microseconds per element). Every element is double-quoted and escaped."""
    return "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}"


__all__ = ["ENTRY_KINDS", "JOURNAL_LOCK_KEY", "Entry", "Posted", "array_literal", "check_entry", "post"]
