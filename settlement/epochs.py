"""Epochs of a RewardPool: close (snapshot), cumulative payouts with ``minPayout``, ledger commit.

Life of an epoch in the ledger's ``epochs`` table (``status``)::

    closed  -- snapshot taken: cutoff entry id, payouts + proofs, root, total
       |        (the tree is persisted before anything is sent to the chain)
    publishing -- the publication transaction is persisted (tx_hash set)
       |
    settled -- confirmed `confirmations` deep AND the closing entry committed
    superseded -- a later epoch's root was settled first (cumulative roots
                  include everything before them, so nothing is lost)

Epoch numbers are ``floor(unix_time / epochSeconds)``: an epoch closes once its
end has passed; epochs a stopped settler missed are not replayed one by one (the
next close covers them, cumulatively). The contract requires increasing, not
consecutive, epochs.

Payouts are cumulative per payee address (owner and contributor earnings of the
pool's models, from ``ledger.queries.cumulative_earnings``). ``minPayout``: a
payee's leaf moves up to its current earnings only once the increase since the
previous epoch's leaf reaches ``minPayout``; until then smaller amounts roll over,
accumulating, to later epochs. A leaf never goes down (a reversal after a payout
shows as a negative ledger balance instead).

Closing entry (at settlement, one ``transfer`` journal entry per settled epoch,
posted by ``ledger.journal.post`` like every other entry):
each payee's account is debited the increase of its leaf and
``external:distributor:<pool>`` is credited the sum, so a payee's ledger balance
is always "earned, not yet in a confirmed root" and the distributor account is
"what the chain holds for the pool". The entry has ``pool = ''`` so that it does
not count as pool earnings.

Every function here may run more than once: closing an existing epoch returns
it; committing a settled epoch is a no-op (the epoch row is locked and checked).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from openledger.settlement.errors import invariant
from openledger.settlement.ledger import journal, queries
from openledger.settlement.ledger import split as sp
from openledger.settlement.merkle import MerkleTree, build_tree

log = logging.getLogger(__name__)
Conn = psycopg.Connection[Any]

CLOSED, PUBLISHING, SETTLED, SUPERSEDED = "closed", "publishing", "settled", "superseded"


def epoch_of(now_s: float, epoch_seconds: int) -> int:
    """The epoch that contains ``now_s`` (unix seconds)."""
    if epoch_seconds <= 0:
        raise ValueError(f"epochSeconds: {epoch_seconds} must be positive")
    return int(now_s // epoch_seconds)


def distributor_account(pool: str) -> str:
    return f"{sp.EXTERNAL}:distributor:{pool}"


# ------------------------------------------------------------------- pure


def payout_amounts(earned: Mapping[str, int], previous: Mapping[str, int], min_payout: int) -> dict[str, int]:
    """Leaf amounts of the next tree: ``earned`` where it grew by >= ``min_payout``, else ``previous``."""
    if min_payout < 0:
        raise ValueError(f"minPayout: {min_payout} is negative")
    amounts: dict[str, int] = {}
    for account in previous.keys() | earned.keys():
        before = previous.get(account, 0)
        now = earned.get(account, 0)
        amount = now if now > before and now - before >= max(min_payout, 1) else before
        if amount:
            amounts[account] = amount
    return amounts


def leaf_increases(new: Mapping[str, int], settled: Mapping[str, int]) -> dict[str, int]:
    """Per payee, how much the settled leaf grows; raises if any leaf would shrink."""
    increases = {}
    for account, amount in new.items():
        delta = amount - settled.get(account, 0)
        invariant(delta >= 0, f"payout of {account} would decrease from {settled.get(account, 0)} to {amount}")
        if delta:
            increases[account] = delta
    invariant(all(a in new for a in settled), "a settled payee is missing from a later tree")
    return increases


def allocate_debits(increases: Mapping[str, int], balances: Mapping[str, int]) -> dict[str, int]:
    """Closing-entry debits per ledger account for per-address increases.

    An address may hold an owner and a contributor account; the owner account is
    debited first up to its positive balance, the contributor account the rest
    (and the owner account any remainder when there is no contributor account).
    """
    debits: dict[str, int] = {}
    for address, delta in increases.items():
        owner, contributor = sp.owner_account(address), sp.contributor_account(address)
        accounts = [a for a in (owner, contributor) if a in balances] or [owner]
        left = delta
        for i, account in enumerate(accounts):
            take = left if i == len(accounts) - 1 else min(left, max(balances.get(account, 0), 0))
            if take:
                debits[account] = debits.get(account, 0) + take
            left -= take
        invariant(left == 0, f"closing entry for {address} leaves {left} unallocated")
    return debits


# --------------------------------------------------------------- records


@dataclass(frozen=True)
class EpochRow:
    pool: str
    epoch: int
    status: str
    cutoff_entry_id: int
    root: str
    total: int
    payee_count: int
    tx_hash: str | None


def _epoch_row(r: tuple[Any, ...]) -> EpochRow:
    return EpochRow(
        r[0], int(r[1]), r[2], int(r[3] or 0), r[4] or "0x" + "00" * 32, int(r[5] or 0), int(r[6] or 0), r[7]
    )


_EPOCH_COLS = "pool, epoch, status, cutoff_entry_id, root, total::text, payee_count, tx_hash"


def get_epoch(conn: Conn, pool: str, epoch: int) -> EpochRow | None:
    row = conn.execute(f"SELECT {_EPOCH_COLS} FROM epochs WHERE pool = %s AND epoch = %s", (pool, epoch)).fetchone()
    return _epoch_row(row) if row else None


def latest_epoch(conn: Conn, pool: str, statuses: tuple[str, ...]) -> EpochRow | None:
    row = conn.execute(
        f"SELECT {_EPOCH_COLS} FROM epochs WHERE pool = %s AND status = ANY(%s) ORDER BY epoch DESC LIMIT 1",
        (pool, list(statuses)),
    ).fetchone()
    return _epoch_row(row) if row else None


def count_epochs(conn: Conn, pool: str, statuses: tuple[str, ...]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM epochs WHERE pool = %s AND status = ANY(%s)", (pool, list(statuses))
    ).fetchone()
    return int(row[0]) if row else 0


def payouts_of(conn: Conn, pool: str, epoch: int | None) -> dict[str, int]:
    if epoch is None:
        return {}
    rows = conn.execute(
        "SELECT account, amount::text FROM settlement_payouts WHERE pool = %s AND epoch = %s", (pool, epoch)
    ).fetchall()
    return {str(a): int(v) for a, v in rows}


def earned_of(conn: Conn, pool: str, epoch: int) -> int:
    """All payees' cumulative earnings at the epoch's cutoff (rolled-over amounts included)."""
    row = conn.execute(
        "SELECT earned::text FROM settlement_epoch_totals WHERE pool = %s AND epoch = %s", (pool, epoch)
    ).fetchone()
    return int(row[0]) if row else 0


def proof_of(conn: Conn, pool: str, epoch: int, account: str) -> tuple[int, list[bytes]] | None:
    row = conn.execute(
        "SELECT amount::text, proof FROM settlement_payouts WHERE pool = %s AND epoch = %s AND account = %s",
        (pool, epoch, account.lower()),
    ).fetchone()
    if row is None:
        return None
    raw = bytes(row[1])
    return int(row[0]), [raw[i : i + 32] for i in range(0, len(raw), 32)]


# ------------------------------------------------------------------ close


@dataclass(frozen=True)
class ClosedEpoch:
    row: EpochRow
    tree: MerkleTree | None  # None when the epoch was closed before (loaded, not rebuilt)


def close_epoch(conn: Conn, pool: str, epoch: int, min_payout: int) -> ClosedEpoch:
    """Snapshot ``pool`` at the current journal head as ``epoch``: payouts, tree, proofs. Idempotent.

    ``conn`` must be in autocommit mode; this opens its own short transactions.
    The cutoff is taken under the journal lock (no later-committing entry can
    have a lower id), then the tree is built outside any lock.
    """
    existing = get_epoch(conn, pool, epoch)
    if existing is not None:
        return ClosedEpoch(existing, None)
    newest = latest_epoch(conn, pool, (CLOSED, PUBLISHING, SETTLED, SUPERSEDED))
    invariant(
        newest is None or newest.epoch < epoch, f"epoch {epoch} of {pool} is not after {newest.epoch if newest else 0}"
    )
    with conn.transaction():
        cutoff = queries.journal_cutoff(conn)
    earned = queries.cumulative_earnings(conn, pool, cutoff)
    previous = payouts_of(conn, pool, newest.epoch if newest else None)
    amounts = payout_amounts(earned, previous, min_payout)
    tree = build_tree(amounts)
    proofs = tree.all_proofs()
    root = "0x" + tree.root.hex()
    buffer = io.StringIO()
    for account, (_, amount) in tree.positions.items():
        proof_hex = "".join(p.hex() for p in proofs[account])
        buffer.write(f"{pool}\t{epoch}\t{account}\t{amount}\t{earned.get(account, 0)}\t\\\\x{proof_hex}\n")
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO epochs (pool, epoch, status, closed_at, cutoff_entry_id, root, total, payee_count)"
            " VALUES (%s, %s, 'closed', now(), %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING epoch",
            (pool, epoch, cutoff, root, tree.total, len(tree)),
        ).fetchone()
        if inserted is None:  # a concurrent closer won; use its snapshot
            row = get_epoch(conn, pool, epoch)
            assert row is not None
            return ClosedEpoch(row, None)
        below = sum(1 for a, e in earned.items() if e > amounts.get(a, 0))
        conn.execute(
            "INSERT INTO settlement_epoch_totals (pool, epoch, earned, payees_below_min) VALUES (%s, %s, %s, %s)",
            (pool, epoch, sum(earned.values()), below),
        )
        with conn.cursor().copy(
            "COPY settlement_payouts (pool, epoch, account, amount, earned, proof) FROM STDIN"
        ) as copy:
            copy.write(buffer.getvalue())
    log.info(
        "epoch closed",
        extra={
            "action": "epoch.closed",
            "pool": pool,
            "epoch": epoch,
            "root": root,
            "payees": len(tree),
            "cutoff": cutoff,
        },
    )
    row = get_epoch(conn, pool, epoch)
    assert row is not None
    return ClosedEpoch(row, tree)


def mark_publishing(conn: Conn, pool: str, epoch: int, tx_hash: str) -> None:
    conn.execute(
        "UPDATE epochs SET status = 'publishing', tx_hash = %s WHERE pool = %s AND epoch = %s AND status = 'closed'",
        (tx_hash, pool, epoch),
    )


def reopen(conn: Conn, pool: str, epoch: int) -> None:
    """A publication that failed (reverted, nonce lost): back to ``closed`` to publish again."""
    conn.execute(
        "UPDATE epochs SET status = 'closed', tx_hash = NULL WHERE pool = %s AND epoch = %s AND status = 'publishing'",
        (pool, epoch),
    )


def commit_settlement(conn: Conn, pool: str, epoch: int, tx_hash: str | None) -> int:
    """The ledger commit of a confirmed root: closing entry + ``settled``, in ONE transaction.

    Returns the closing entry's id (0 when no leaf grew). Idempotent: an epoch
    already settled returns 0 without writing.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT status FROM epochs WHERE pool = %s AND epoch = %s FOR UPDATE", (pool, epoch)
        ).fetchone()
        invariant(row is not None, f"epoch {epoch} of {pool} does not exist")
        assert row is not None
        if row[0] == SETTLED:
            return 0
        invariant(row[0] in (CLOSED, PUBLISHING), f"epoch {epoch} of {pool} is {row[0]}, cannot settle")
        settled = latest_epoch(conn, pool, (SETTLED,))
        invariant(settled is None or settled.epoch < epoch, f"epoch {epoch} of {pool} is older than a settled one")
        increases = leaf_increases(
            payouts_of(conn, pool, epoch), payouts_of(conn, pool, settled.epoch if settled else None)
        )
        entry_id = _post_closing_entry(conn, pool, epoch, increases) if increases else 0
        conn.execute(
            "UPDATE epochs SET status = 'settled', tx_hash = coalesce(%s, tx_hash) WHERE pool = %s AND epoch = %s",
            (tx_hash, pool, epoch),
        )
        conn.execute(
            "UPDATE epochs SET status = 'superseded'"
            " WHERE pool = %s AND epoch < %s AND status IN ('closed', 'publishing')",
            (pool, epoch),
        )
    log.info("epoch settled", extra={"action": "epoch.settled", "pool": pool, "epoch": epoch, "entry_id": entry_id})
    return entry_id


def _post_closing_entry(conn: Conn, pool: str, epoch: int, increases: Mapping[str, int]) -> int:
    """The epoch's closing entry through ``journal.post`` (lock, ids, postings, balances, sum-to-zero)."""
    accounts = [k for a in increases for k in (sp.owner_account(a), sp.contributor_account(a))]
    balances = {
        str(k): int(v)
        for k, v in conn.execute(
            "SELECT account, balance::text FROM account_balances WHERE account = ANY(%s)", (accounts,)
        ).fetchall()
    }
    debits = allocate_debits(increases, balances)
    postings = {account: -amount for account, amount in debits.items()}
    target = distributor_account(pool)
    postings[target] = postings.get(target, 0) + sum(increases.values())
    entry = journal.Entry(kind="transfer", postings=postings, memo=f"settlement {pool} epoch {epoch}")
    return journal.post(conn, [entry]).first_id


__all__ = [
    "CLOSED",
    "PUBLISHING",
    "SETTLED",
    "SUPERSEDED",
    "ClosedEpoch",
    "EpochRow",
    "allocate_debits",
    "close_epoch",
    "commit_settlement",
    "count_epochs",
    "distributor_account",
    "earned_of",
    "epoch_of",
    "get_epoch",
    "latest_epoch",
    "leaf_increases",
    "mark_publishing",
    "payout_amounts",
    "payouts_of",
    "proof_of",
    "reopen",
]
