"""``openledger ledger verify``: the ledger checks itself, and against the stream.

Quick checks (SQL, what the worker runs periodically):

* every entry's postings sum to exactly zero, and every entry has postings;
* each posting carries its entry's pool; each entry's amount is its credits;
* cached balances equal the sum of postings, account by account;
* each usage entry's events: count and total cost match the entry, the payers'
  debits equal minus the cost; every event that cost something has an entry;
* the per-agent spend cache equals the events' costs (less reversals).

Full checks add, in one streaming pass: each usage entry's postings equal the
sum of its events' splits recomputed by ``split.event_postings``, each
reversal is the exact negation of its event's split — and, with a Redis URL,
every stream entry delivered and acknowledged is in the ledger (or
dead-lettered / quarantined): counts in the stream and the ledger reconcile.
The event id is the primary key of ``usage_events``, so no event is there twice.

With an RPC URL (``rpc_url``), the chain too, per pool recorded in
``settlement_pools`` on that chain: the distributor's cumulative total equals the
ledger's ``external:distributor:<pool>`` balance (what the confirmed roots
committed), and its funded total is not below it. A root confirmed on chain whose
ledger commit is still to come (an epoch in ``publishing``/``closed`` with that
root and total) is in flight, not drift; a pool on another chain id is skipped.
Each pool is compared in a snapshot of its own, between two reads of the contract
that agree, so a settler working meanwhile is never mistaken for drift.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from openledger.settlement.ledger import metrics as m
from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.ingest import event_id_of
from openledger.settlement.ledger.queries import _contributors

if TYPE_CHECKING:
    from openledger.settlement.chain.distributor import Distributor, DistributorState

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Drift:
    check: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"DRIFT {self.check}: {self.where}: {self.detail}"


@dataclass
class VerifyReport:
    drifts: list[Drift] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.drifts


_QUICK_CHECKS: list[tuple[str, str]] = [
    (
        "entry_balances",
        "SELECT 'entry ' || entry_id, 'postings sum to ' || sum(amount) FROM postings "
        "GROUP BY entry_id HAVING sum(amount) <> 0",
    ),
    (
        "entry_has_postings",
        "SELECT 'entry ' || e.id, 'has no postings' FROM journal_entries e "
        "WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.entry_id = e.id)",
    ),
    (
        "posting_account",
        "SELECT 'entry ' || p.entry_id || ' account ' || p.account, 'account does not exist' FROM postings p "
        "WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.key = p.account)",
    ),
    (
        "posting_pool",
        "SELECT 'entry ' || e.id || ' account ' || p.account, 'posting pool ' || quote_literal(p.pool) || "
        "' but entry pool ' || quote_literal(e.pool) FROM postings p JOIN journal_entries e ON e.id = p.entry_id "
        "WHERE p.pool <> e.pool",
    ),
    (
        "entry_amount",
        "SELECT 'entry ' || e.id, 'amount ' || e.amount || ' but credits ' || coalesce(c.credits, 0) "
        "FROM journal_entries e "
        "LEFT JOIN (SELECT entry_id, sum(amount) AS credits FROM postings WHERE amount > 0 GROUP BY entry_id) c "
        "ON c.entry_id = e.id WHERE e.amount <> coalesce(c.credits, 0)",
    ),
    (
        "cached_balance",
        "SELECT 'account ' || coalesce(b.account, s.account), 'cached ' || coalesce(b.balance::text, 'none') || "
        "' but postings sum to ' || coalesce(s.total, 0) FROM account_balances b "
        "FULL JOIN (SELECT account, sum(amount) AS total FROM postings GROUP BY account) s ON s.account = b.account "
        "WHERE coalesce(b.balance, 0) <> coalesce(s.total, 0)",
    ),
    (
        "entry_events",
        "WITH ev AS (SELECT entry_id, count(*) AS n, sum(cost) AS c FROM usage_events WHERE entry_id IS NOT NULL "
        "GROUP BY entry_id) SELECT 'entry ' || coalesce(e.id, ev.entry_id), "
        "CASE WHEN e.id IS NULL THEN ev.n || ' events point at a missing entry' "
        "ELSE 'entry says ' || e.event_count || ' events / ' || e.amount || "
        "' but has ' || coalesce(ev.n, 0) || ' events costing ' || coalesce(ev.c, 0) END "
        "FROM (SELECT * FROM journal_entries WHERE kind = 'usage') e FULL JOIN ev ON ev.entry_id = e.id "
        "WHERE e.id IS NULL OR ev.entry_id IS NULL OR e.event_count <> ev.n OR e.amount <> ev.c",
    ),
    (
        "payer_debits",
        "WITH ev AS (SELECT entry_id, sum(cost) AS c FROM usage_events WHERE entry_id IS NOT NULL GROUP BY entry_id), "
        "d AS (SELECT entry_id, -sum(amount) AS debit FROM postings WHERE account LIKE 'agent:%%' GROUP BY entry_id) "
        "SELECT 'entry ' || ev.entry_id, 'events cost ' || ev.c || ' but payers were debited ' || coalesce(d.debit, 0) "
        "FROM ev LEFT JOIN d USING (entry_id) WHERE ev.c <> coalesce(d.debit, 0)",
    ),
    (
        "unposted_events",
        "SELECT 'event ' || event_id, CASE WHEN cost > 0 THEN 'cost ' || cost || ' but no entry' "
        "ELSE 'cost 0 but entry ' || entry_id END FROM usage_events "
        "WHERE (cost > 0 AND entry_id IS NULL) OR (cost = 0 AND entry_id IS NOT NULL)",
    ),
    (
        "agent_spend",
        "WITH ev AS (SELECT agent, sum(cost) AS c FROM usage_events GROUP BY agent), "
        "rv AS (SELECT u.agent, sum(u.cost) AS c FROM journal_entries e JOIN usage_events u "
        "ON u.event_id = e.reverses_event_id GROUP BY u.agent), "
        "sp AS (SELECT agent, sum(amount) AS c FROM agent_spend_hourly GROUP BY agent) "
        "SELECT 'agent ' || coalesce(ev.agent, sp.agent), 'spend cache ' || coalesce(sp.c, 0) || "
        "' but events cost ' || (coalesce(ev.c, 0) - coalesce(rv.c, 0)) "
        "FROM ev FULL JOIN sp ON sp.agent = ev.agent LEFT JOIN rv ON rv.agent = coalesce(ev.agent, sp.agent) "
        "WHERE coalesce(sp.c, 0) <> coalesce(ev.c, 0) - coalesce(rv.c, 0)",
    ),
]

_MAX_DRIFTS_PER_CHECK = 20


def verify(conn: Conn, *, full: bool = True, redis_url: str | None = None, stream: str = "", group: str = "",
           dead_letter_stream: str = "", rpc_url: str | None = None) -> VerifyReport:  # fmt: skip
    """Run the checks in one repeatable-read snapshot; set the ``last_verify`` metrics."""
    report = VerifyReport()
    # Redis first: whatever was acknowledged before this read was committed before it,
    # so the database snapshot taken afterwards must contain it.
    acked = _stream_snapshot(report, redis_url, stream, group, dead_letter_stream) if full and redis_url else None
    conn.rollback()
    # One read-only snapshot, whatever mode the caller's connection is in.
    saved = (conn.autocommit, conn.isolation_level, conn.read_only)
    conn.autocommit = False
    conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    try:
        for check, sql in _QUICK_CHECKS:
            rows = conn.execute(sql + f" LIMIT {_MAX_DRIFTS_PER_CHECK}").fetchall()
            report.drifts += [Drift(check, str(r[0]), str(r[1])) for r in rows]
        for name, sql in (
            ("entries", "SELECT count(*) FROM journal_entries"),
            ("postings", "SELECT count(*) FROM postings"),
            ("events", "SELECT count(*) FROM usage_events"),
            ("quarantined", "SELECT count(*) FROM usage_quarantine"),
            ("accounts", "SELECT count(*) FROM accounts"),
        ):
            row = conn.execute(sql).fetchone()
            report.stats[name] = int(row[0]) if row else 0
        if full:
            _verify_splits(conn, report)
            if acked is not None:
                _verify_stream(conn, report, stream, acked)
        if rpc_url:
            verify_chain(conn, report, rpc_url)
    finally:
        conn.rollback()
        conn.autocommit, conn.isolation_level, conn.read_only = saved
    m.LAST_VERIFY_SUCCESS.set(1 if report.ok else 0)
    m.LAST_VERIFY_DRIFTS.set(len(report.drifts))
    m.LAST_VERIFY_TIMESTAMP.set(time.time())
    return report


def _verify_splits(conn: Conn, report: VerifyReport) -> None:
    """Recompute every usage entry from its events, and every reversal from its event."""
    stored: dict[int, dict[str, int]] = {}
    for entry_id, account, amount in conn.execute("SELECT entry_id, account, amount::text FROM postings"):
        stored.setdefault(int(entry_id), {})[account] = int(amount)
    expected: dict[int, dict[str, int]] = {}
    sql = (
        "SELECT entry_id, cost::text, payer, owner, pool, fee_bps, contributors FROM usage_events "
        "WHERE entry_id IS NOT NULL"
    )
    with conn.cursor(name="verify_events") as cur:
        cur.itersize = 20_000
        cur.execute(sql)
        for entry_id, cost, payer, owner, pool, fee_bps, contributors in cur:
            totals = expected.setdefault(int(entry_id), {})
            for account, amount in sp.event_postings(
                int(cost), payer, owner, pool, int(fee_bps), _contributors(contributors)
            ):
                totals[account] = totals.get(account, 0) + amount
    rows = conn.execute(
        "SELECT e.id, u.cost::text, u.payer, u.owner, u.pool, u.fee_bps, u.contributors FROM journal_entries e "
        "JOIN usage_events u ON u.event_id = e.reverses_event_id WHERE e.kind = 'reversal'"
    ).fetchall()
    for entry_id, cost, payer, owner, pool, fee_bps, contributors in rows:
        postings = sp.event_postings(int(cost), payer, owner, pool, int(fee_bps), _contributors(contributors))
        expected[int(entry_id)] = sp.aggregate((a, -v) for a, v in postings)
    kinds = dict(conn.execute("SELECT id, kind FROM journal_entries").fetchall())
    found = 0
    for entry_id, totals in sorted(expected.items()):
        want = sp.aggregate(totals.items())
        have = stored.get(entry_id, {})
        if want != have and found < _MAX_DRIFTS_PER_CHECK:
            found += 1
            diff = {
                a: (have.get(a, 0), want.get(a, 0))
                for a in sorted(set(want) | set(have))
                if have.get(a, 0) != want.get(a, 0)
            }
            report.drifts.append(Drift("entry_split", f"entry {entry_id}", f"stored vs recomputed per account: {diff}"))
    for entry_id, kind in kinds.items():
        if kind in ("usage", "reversal") and int(entry_id) not in expected and found < _MAX_DRIFTS_PER_CHECK:
            found += 1
            report.drifts.append(Drift("entry_split", f"entry {entry_id}", f"{kind} entry has no events"))


def _stream_snapshot(report: VerifyReport, redis_url: str, stream: str, group: str, dead: str) -> list[str] | None:
    """Event ids of the entries the group delivered and acknowledged (not pending, not dead-lettered)."""
    from openledger.settlement.ledger.redisraw import RawRedis, RedisReplyError

    r = RawRedis(redis_url)
    try:
        last_delivered = None
        try:
            for raw in r.execute("XINFO", "GROUPS", stream):
                info = dict(zip(raw[0::2], raw[1::2], strict=False))
                if info.get(b"name") == group.encode():
                    last_delivered = info[b"last-delivered-id"]
        except RedisReplyError:
            pass
        if last_delivered is None:
            report.drifts.append(Drift("stream", stream, f"stream or consumer group {group!r} does not exist"))
            return None
        pending: set[bytes] = set()
        start = b"-"
        while True:
            rows = r.execute("XPENDING", stream, group, start, "+", 10_000)
            pending.update(row[0] for row in rows)
            if len(rows) < 10_000:
                break
            start = b"(" + rows[-1][0]
        dead_ids = {f[f.index(b"dead_id") + 1] for _, f in _xrange(r, dead) if b"dead_id" in f[0::2]} if dead else set()
        ids: list[str] = []
        entries = undelivered = bad = 0
        ld = _sid(last_delivered)
        for sid, kv in _xrange(r, stream):
            entries += 1
            if _sid(sid) > ld:
                undelivered += 1
                continue
            if sid in pending or sid in dead_ids:
                continue
            try:
                ids.append(str(uuid.UUID(event_id_of(kv).decode())))
            except ValueError:
                bad += 1
                if bad <= _MAX_DRIFTS_PER_CHECK:
                    where = f"{stream} {sid.decode()}"
                    report.drifts.append(Drift("stream", where, "acknowledged, not a valid event, not dead-lettered"))
    finally:
        r.close()
    report.stats.update(
        stream_entries=entries, stream_undelivered=undelivered, stream_pending=len(pending),
        stream_dead_lettered=len(dead_ids),
    )  # fmt: skip
    return ids


def _verify_stream(conn: Conn, report: VerifyReport, stream: str, acked: list[str]) -> None:
    """Every acknowledged event is in the ledger (or quarantined): the stream and the ledger reconcile."""
    unique = sorted(set(acked))
    missing = [
        str(row[0])
        for row in conn.execute(
            "SELECT v FROM unnest(%s::uuid[]) AS v "
            "WHERE NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.event_id = v) "
            "AND NOT EXISTS (SELECT 1 FROM usage_quarantine q WHERE q.event_id = v) LIMIT 1000",
            (unique,),
        )
    ]
    report.stats.update(stream_distinct_events=len(unique), stream_missing=len(missing))
    for eid in missing[:_MAX_DRIFTS_PER_CHECK]:
        report.drifts.append(Drift("stream", f"event {eid}", f"acknowledged on {stream} but not in the ledger"))


def verify_chain(conn: Conn, report: VerifyReport, rpc_url: str) -> None:
    """Each pool's distributor on the chain at ``rpc_url`` against the ledger's account for it.

    A settler may confirm a root, and then commit it to the ledger, while this runs. So each pool is
    compared in a snapshot of its own, taken between two reads of the contract that agree: the
    chain did not move, so the ledger in that snapshot must hold exactly the contract's total, or
    the epoch of the contract's root must be confirmed-but-uncommitted there (in flight). A contract
    that keeps moving through every attempt is counted in flight, never drift.
    """
    from openledger.settlement.chain.distributor import Distributor
    from openledger.settlement.chain.rpc import Chain, make_web3
    from openledger.settlement.errors import ChainUnavailable

    recorded = conn.execute("SELECT count(*) FROM settlement_pools").fetchone()
    if not recorded or not recorded[0]:
        report.stats.update(chain_pools_checked=0)
        return  # nothing settled yet: no chain to ask
    chain = Chain(make_web3(rpc_url))
    try:
        chain_id = chain.chain_id()
    except ChainUnavailable as exc:
        report.drifts.append(Drift("chain", "rpc", f"cannot read the chain: {exc}"))
        return
    rows = conn.execute(
        "SELECT pool, distributor FROM settlement_pools WHERE chain_id = %s ORDER BY pool", (chain_id,)
    ).fetchall()
    skipped = conn.execute("SELECT count(*) FROM settlement_pools WHERE chain_id <> %s", (chain_id,)).fetchone()
    checked = in_flight = 0
    for pool, distributor in rows:
        where = f"pool {pool} distributor {distributor}"
        contract = Distributor(chain, distributor)
        try:
            observed = _stable_observation(conn, contract, pool)
        except ChainUnavailable as exc:
            report.drifts.append(Drift("chain", where, f"cannot read the contract: {exc}"))
            continue
        checked += 1
        if observed is None:
            in_flight += 1
            continue
        state, ledger, pending = observed
        if state.cumulative_total != ledger:
            if pending:
                in_flight += 1
                continue
            report.drifts.append(Drift("chain_cumulative", where, f"contract cumulative total"
                                       f" {state.cumulative_total} but the ledger's account {ledger}"))  # fmt: skip
        if state.funded < max(state.cumulative_total, ledger):
            report.drifts.append(Drift("chain_funded", where, f"contract funded {state.funded} below cumulative"
                                       f" {state.cumulative_total} / ledger {ledger}"))  # fmt: skip
    report.stats.update(chain_pools_checked=checked, chain_pools_in_flight=in_flight,
                        chain_pools_other_chain=int(skipped[0]) if skipped else 0)  # fmt: skip


_CHAIN_ATTEMPTS = 5


def _stable_observation(conn: Conn, contract: Distributor, pool: str) -> tuple[DistributorState, int, bool] | None:
    """(contract state, the ledger's balance for the pool, whether the state's root is in flight) from a
    snapshot taken while the contract did not move; None if it moved through every attempt."""
    for attempt in range(_CHAIN_ATTEMPTS):
        before = contract.state()
        conn.rollback()  # the next query takes a fresh snapshot: after ``before``
        row = conn.execute(
            "SELECT coalesce((SELECT balance FROM account_balances WHERE account = 'external:distributor:' || %s),"
            " 0)::text, EXISTS (SELECT 1 FROM epochs WHERE pool = %s AND status IN ('closed', 'publishing')"
            " AND root = %s AND total = %s)",
            (pool, pool, "0x" + before.root.hex(), before.cumulative_total),
        ).fetchone()
        if contract.state() == before:
            assert row is not None
            return before, int(row[0]), bool(row[1])
        time.sleep(0.2 * (attempt + 1))
    return None


def _sid(stream_id: bytes) -> tuple[int, int]:
    ms, _, seq = stream_id.partition(b"-")
    return int(ms), int(seq or 0)


def _xrange(r: Any, stream: str) -> Any:
    start = b"-"
    while True:
        rows = r.execute("XRANGE", stream, start, "+", "COUNT", 10_000)
        yield from rows
        if len(rows) < 10_000:
            return
        start = b"(" + rows[-1][0]
