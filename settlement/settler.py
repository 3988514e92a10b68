"""The settler: per RewardPool, close epochs and publish one root transaction per epoch.

``Settler.step(now_s)`` is one idempotent pass for one pool, shaped like
``TxManager.step``: **observe** the ledger (and, when a publication is at
stake, the contract), **decide** one action with the pure ``decide``, **apply**
it; repeat until the decision is to wait (at most ``MAX_ACTIONS`` per pass).

The actions, in the order ``decide`` considers them:

1. refuse (``IdentityChanged``, ``DistributorInUse``, ``ContractStateMismatch``)
   when the spec's chain identity is not the one the pool's settlement state
   belongs to, or the contract holds state this pool's ledger did not publish:
   publishing the pool's cumulative amounts there could pay them twice;
2. record the identity (chain id, distributor, token, epochSeconds) on the first
   pass; it can be re-recorded only while the pool has no epoch at all;
3. close the newest finished epoch (snapshot, payouts, tree, proofs; ``epochs``);
4. drive the in-flight publication, if any, through the transaction manager;
   confirmed → (crash point ``after_confirmed``) → the ledger commit (closing
   entry + ``settled``, one transaction); reverted or nonce lost → reopen;
5. otherwise publish the newest closed epoch: one transaction whatever the number
   of payees (it also covers any older closed epochs: roots are cumulative).
   A root equal to the last settled one needs no transaction.

A restart at any point re-enters the same pass: the intent name
``publish:<pool>:<epoch>`` makes ``submit`` return the persisted transaction
instead of signing another, and the contract rejects a second publication of an
epoch, so a root is paid for once. Chain errors never lose anything: the epoch
stays closed, the backlog shows in ``lagEpochs``/``pendingAmount`` and the
metrics, and the next pass catches up.

Database: a pass borrows one connection from a bounded ``ConnectionPool``
(shared by all pools of the operator) and takes the pool's advisory lock on it
for the pass, so two settlers never drive one pool at once and no connection is
held between passes. A pass that cannot reach PostgreSQL returns
``database_available=False`` (status ``Degraded``/``DatabaseUnavailable``, the
``openledger_settlement_database_up`` gauge at 0); the next pass reconnects.

Used by the RewardPool controller (a Kopf timer) and by ``openledger settler run``
(a standalone process, which is how the crash tests drive it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from web3 import Web3

from openledger.settlement import epochs as ep
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.distributor import PUBLISH_GAS, Distributor, DistributorState, publish_calldata
from openledger.settlement.chain.rpc import Chain, make_web3
from openledger.settlement.chain.txmanager import TxManager
from openledger.settlement.connections import ConnectionPool, DatabaseUnavailable, PoolBusy
from openledger.settlement.crash import crash_point
from openledger.settlement.errors import ChainUnavailable, ContractReverted, invariant
from openledger.settlement.metrics import (
    BLOCK_REASONS,
    DATABASE_UP,
    EPOCHS_SETTLED,
    LAG_EPOCHS,
    PENDING_BASE_UNITS,
    PUBLICATION_BLOCKED,
    SETTLED_BASE_UNITS,
)
from openledger.settlement.pool import ChainIdentity, ChainSecrets, PoolConfig, PoolStatus, database_unavailable

log = logging.getLogger(__name__)
ZERO_ROOT = "0x" + "00" * 32
MAX_ACTIONS = 12  # one pass: record, close, adopt, read, drive, commit, publish … then wait for the next
Conn = psycopg.Connection[Any]
Event = tuple[str, str, str]  # (type, reason, message) of a Kubernetes Event


# ------------------------------------------------------------------ observe


@dataclass(frozen=True)
class Observation:
    """What one iteration of a pass knows: the ledger's view of the pool, and the contract's when needed."""

    current_epoch: int
    recorded: ChainIdentity | None = None  # the identity the pool's settlement state belongs to
    distributor_holder: str | None = None  # the pool that recorded the spec's distributor, if any
    has_epochs: bool = False
    newest: ep.EpochRow | None = None  # newest epoch in any state
    settled: ep.EpochRow | None = None
    inflight: ep.EpochRow | None = None  # publishing
    inflight_tx: str = ""  # the transaction manager's state of the in-flight intent
    inflight_tx_hash: str | None = None
    orphan: tuple[int, str] | None = None  # (epoch, tx hash): a live intent whose epoch is still "closed"
    candidate: ep.EpochRow | None = None  # newest closed
    contract: DistributorState | None = None  # read (``ReadContract``) only when a publication is at stake
    driven: bool = False  # the in-flight transaction was already stepped in this pass


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Refuse:
    reason: str
    message: str


@dataclass(frozen=True)
class RecordIdentity:
    replace: bool = False  # the pool has no epoch yet: the spec's identity replaces the recorded one


@dataclass(frozen=True)
class Close:
    epoch: int


@dataclass(frozen=True)
class Adopt:
    epoch: int
    tx_hash: str


@dataclass(frozen=True)
class Drive:
    epoch: int


@dataclass(frozen=True)
class Commit:
    epoch: int
    tx_hash: str | None
    how: str  # "confirmed" | "found on chain" | "unchanged root"


@dataclass(frozen=True)
class Reopen:
    epoch: int
    abandon: bool
    detail: str = ""


@dataclass(frozen=True)
class Publish:
    epoch: int


@dataclass(frozen=True)
class ReadContract:
    """A publication is at stake: observe the contract's state before deciding (chain reads only then)."""


@dataclass(frozen=True)
class Wait:
    """Nothing more this pass (a transaction is pending, or all is settled)."""


Action = Refuse | RecordIdentity | Close | Adopt | Drive | Commit | Reopen | Publish | ReadContract | Wait
TERMINAL = (Refuse, Wait)


# ------------------------------------------------------------------- decide


def expected_identity(config: PoolConfig, recorded_token: str = "") -> ChainIdentity:
    """The identity the spec names (a spec without a token means the recorded/contract's one)."""
    return ChainIdentity(
        chain_id=config.chain_id,
        distributor=config.distributor.lower(),
        token=(config.token or recorded_token).lower(),
        epoch_seconds=config.epoch_seconds,
    )


def on_chain(contract: DistributorState | None, row: ep.EpochRow) -> bool:
    """The contract already holds ``row``'s root (published by an earlier attempt)."""
    return contract is not None and contract.epoch >= row.epoch and "0x" + contract.root.hex() == row.root


def decide(config: PoolConfig, obs: Observation) -> Action:
    """The one next action for a pool. Pure: everything it needs is in ``obs``."""
    held_elsewhere = obs.distributor_holder not in (None, config.pool)
    if obs.recorded is not None:
        diffs = obs.recorded.differences(expected_identity(config, obs.recorded.token))
        if diffs and (obs.has_epochs or held_elsewhere):
            return Refuse("IdentityChanged", _identity_message(config, obs.recorded, diffs))
        if diffs:
            return RecordIdentity(replace=True)
    if held_elsewhere:
        return Refuse(
            "DistributorInUse",
            f"spec.chain.distributorAddress: {config.distributor} already settles RewardPool {obs.distributor_holder};"
            " one distributor serves one pool (deploy another distributor for this pool)",
        )
    if obs.recorded is None:
        return RecordIdentity()
    due = obs.current_epoch - 1
    if due >= 1 and (obs.newest is None or obs.newest.epoch < due):
        return Close(due)
    if config.paused:
        return Wait()
    if obs.orphan is not None:
        return Adopt(*obs.orphan)
    if obs.inflight is not None:
        return _decide_inflight(obs.inflight, obs)
    return _decide_candidate(config, obs)


def _decide_inflight(inflight: ep.EpochRow, obs: Observation) -> Action:
    if obs.inflight_tx == "pending":
        return Wait() if obs.driven else Drive(inflight.epoch)
    if obs.inflight_tx == "confirmed":
        return Commit(inflight.epoch, obs.inflight_tx_hash, "confirmed")
    if obs.inflight_tx == "none":  # no transaction was ever persisted for it: publish again
        return Reopen(inflight.epoch, abandon=False)
    if obs.contract is None:
        return ReadContract()
    if on_chain(obs.contract, inflight):  # reverted/failed, yet an earlier attempt got it there
        return Commit(inflight.epoch, obs.inflight_tx_hash, "found on chain")
    return Reopen(inflight.epoch, abandon=True, detail=f"transaction {obs.inflight_tx}")


def _decide_candidate(config: PoolConfig, obs: Observation) -> Action:
    candidate = obs.candidate
    if candidate is None:
        return Wait()
    settled_root = obs.settled.root if obs.settled else ZERO_ROOT
    if candidate.root == settled_root:
        return Commit(candidate.epoch, None, "unchanged root")
    if obs.contract is None:
        return ReadContract()
    if on_chain(obs.contract, candidate):
        return Commit(candidate.epoch, None, "found on chain")
    contract_root = "0x" + obs.contract.root.hex()
    if contract_root != settled_root:
        return Refuse(
            "ContractStateMismatch",
            f"distributor {config.distributor} holds epoch {obs.contract.epoch} root {contract_root}"
            f" (cumulative {obs.contract.cumulative_total}) but this pool last settled root {settled_root}:"
            " the contract has paid or holds state this pool's ledger did not publish there, and publishing"
            " cumulative amounts to it could pay them twice. Point spec.chain at the contract that holds this"
            " pool's history, or create a new RewardPool (another name) for a fresh contract.",
        )
    return Publish(candidate.epoch)


def _identity_message(config: PoolConfig, recorded: ChainIdentity, diffs: list[str]) -> str:
    return (
        f"settlement state of {config.pool} belongs to chain {recorded.chain_id} distributor {recorded.distributor}"
        f" (token {recorded.token}, epochSeconds {recorded.epoch_seconds}); the spec differs ("
        + "; ".join(diffs)
        + "). Nothing is published: the new contract would pay the pool's whole cumulative history again."
        " Restore the recorded values, or create a new RewardPool (another name) for the new contract."
    )


# ------------------------------------------------------------------ settler


class Settler:
    """Settles one pool. Borrows a connection per pass from ``database`` (a pool, or a URL: a private pool of 1)."""

    def __init__(
        self,
        config: PoolConfig,
        secrets: ChainSecrets,
        database: str | ConnectionPool,
        policy: FeePolicy | None = None,
    ) -> None:
        self.config = config
        self._own_db = isinstance(database, str)
        self.db = ConnectionPool(database, max_size=1) if isinstance(database, str) else database
        self.chain = Chain(make_web3(secrets.rpc_url))
        self._key = secrets.signer_key
        self.policy = replace(policy or FeePolicy(), confirmations=config.confirmations)
        self.distributor = Distributor(self.chain, config.distributor)
        self._reasons = set(BLOCK_REASONS)  # every reason this pool's gauge may carry (a new one is added)

    def close(self) -> None:
        if self._own_db:
            self.db.close()

    def __enter__(self) -> Settler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def intent(self, epoch: int) -> str:
        return f"publish:{self.config.pool}:{epoch}"

    def txmanager(self, conn: Conn) -> TxManager:
        return TxManager(conn, self.chain, self._key, self.config.chain_id, self.policy, pool=self.config.pool)

    # ----------------------------------------------------------------- step

    def step(self, now_s: float | None = None) -> PoolStatus:
        """One pass (see the module docstring). Chain and database errors are reported, not raised."""
        now_s = time.time() if now_s is None else now_s
        current = ep.epoch_of(now_s, self.config.epoch_seconds)
        try:
            with self.db.connection() as conn:
                status = self._locked_pass(conn, current)
        except (DatabaseUnavailable, psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if not isinstance(exc, PoolBusy):  # a busy pool says nothing about PostgreSQL itself
                DATABASE_UP.labels(self.config.pool).set(0)
            log.warning(
                "database unavailable",
                extra={"action": "settle.db_down", "pool": self.config.pool, "error": type(exc).__name__},
            )
            return database_unavailable(current, f"PostgreSQL unavailable: {_first_line(exc)}")
        DATABASE_UP.labels(self.config.pool).set(1)
        return status

    def _locked_pass(self, conn: Conn, current: int) -> PoolStatus:
        key = f"settler:{self.config.pool}"
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not (row and row[0]):
            return self._status(conn, current, message="another settler holds this pool; standing by")
        try:
            return self._pass(conn, current)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))

    def _pass(self, conn: Conn, current: int) -> PoolStatus:
        txm = self.txmanager(conn)
        events: list[Event] = []
        reachable, message, blocked, reason = True, "", "", ""
        driven, contract = False, None
        try:
            for _ in range(MAX_ACTIONS):
                action = decide(self.config, self.observe(conn, txm, current, driven=driven, contract=contract))
                if isinstance(action, ReadContract):
                    contract = self.distributor.state()
                    continue
                if isinstance(action, Refuse):
                    blocked, reason = action.message, action.reason
                    events.append(("Warning", action.reason, action.message))
                    log.warning("publication refused", extra={"action": "settle.refused", "pool": self.config.pool,
                                                              "reason": action.reason})  # fmt: skip
                if isinstance(action, TERMINAL):
                    break
                events += self.apply(conn, txm, action)
                driven = driven or isinstance(action, Drive)
                contract = None  # an applied action may have changed what the contract holds
        except ChainUnavailable as exc:
            reachable, message = False, str(exc)
            log.warning("chain unavailable", extra={"action": "settle.chain_down", "pool": self.config.pool})
        except ContractReverted as exc:
            blocked, reason = str(exc), "PublicationBlocked"
            events.append(("Warning", "PublicationBlocked", blocked))
            log.warning("publication blocked", extra={"action": "settle.blocked", "pool": self.config.pool,
                                                      "reason": blocked})  # fmt: skip
        if reachable:  # a pass the chain cut short cannot tell whether the publication is still blocked
            self._publish_blocked(reason)
        status = self._status(conn, current, reachable, message, tuple(events))
        return replace(status, blocked_message=blocked, blocked_reason=reason)

    def _publish_blocked(self, reason: str) -> None:
        """``publication_blocked``: 1 for ``reason`` (if any), 0 for every other reason of the pool."""
        if reason:
            self._reasons.add(reason)
        for known in self._reasons:
            PUBLICATION_BLOCKED.labels(self.config.pool, known).set(1 if known == reason else 0)

    # -------------------------------------------------------------- observe

    def observe(
        self, conn: Conn, txm: TxManager, current: int, *, driven: bool, contract: DistributorState | None
    ) -> Observation:
        """The ledger's view of the pool (the contract's state comes from the pass, read on ``ReadContract``)."""
        pool, cfg = self.config.pool, self.config
        holder = conn.execute(
            "SELECT pool FROM settlement_pools WHERE chain_id = %s AND distributor = %s",
            (cfg.chain_id, cfg.distributor.lower()),
        ).fetchone()
        newest = ep.latest_epoch(conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
        inflight = ep.latest_epoch(conn, pool, (ep.PUBLISHING,))
        candidate = ep.latest_epoch(conn, pool, (ep.CLOSED,))
        tx = txm.status(self.intent(inflight.epoch)) if inflight is not None else None
        return Observation(
            current_epoch=current,
            recorded=_recorded_identity(conn, pool),
            distributor_holder=str(holder[0]) if holder else None,
            has_epochs=newest is not None,
            newest=newest,
            settled=ep.latest_epoch(conn, pool, (ep.SETTLED,)),
            inflight=inflight,
            inflight_tx=tx.state if tx else "",
            inflight_tx_hash=tx.tx_hash if tx else None,
            orphan=self._orphan(conn, txm) if inflight is None else None,
            candidate=candidate,
            contract=contract,
            driven=driven,
        )

    def _orphan(self, conn: Conn, txm: TxManager) -> tuple[int, str] | None:
        """A crash between ``submit`` and ``mark_publishing`` leaves a live intent for a closed epoch."""
        prefix = f"publish:{self.config.pool}:"
        for intent in txm.open_intents():
            suffix = intent[len(prefix) :]
            if not (intent.startswith(prefix) and suffix.isdigit()):
                continue
            row = ep.get_epoch(conn, self.config.pool, int(suffix))
            status = txm.status(intent)
            if status.tx_hash and row is not None and row.status == ep.CLOSED:
                return row.epoch, status.tx_hash
        return None

    # ---------------------------------------------------------------- apply

    def apply(self, conn: Conn, txm: TxManager, action: Action) -> list[Event]:
        """Perform one decided action; returns the Events it is worth."""
        pool = self.config.pool
        if isinstance(action, RecordIdentity):
            self._record_identity(conn, replace_existing=action.replace)
        elif isinstance(action, Close):
            before = ep.latest_epoch(conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
            closed = ep.close_epoch(conn, pool, action.epoch, self.config.min_payout)
            # An epoch that changed nothing (same root) is not worth an Event every epoch.
            if before is None or closed.row.root != before.root:
                message = f"epoch {action.epoch} closed: {closed.row.payee_count} payees, root {closed.row.root}"
                return [("Normal", "EpochClosed", message)]
        elif isinstance(action, Adopt):
            ep.mark_publishing(conn, pool, action.epoch, action.tx_hash)
        elif isinstance(action, Drive):
            txm.step(self.intent(action.epoch))
        elif isinstance(action, Commit):
            return self._commit(conn, action)
        elif isinstance(action, Reopen):
            if action.abandon:
                txm.abandon(self.intent(action.epoch))
            ep.reopen(conn, pool, action.epoch)
            if action.detail:
                return [("Warning", "PublicationFailed", f"epoch {action.epoch}: {action.detail}")]
        elif isinstance(action, Publish):
            return self._publish(conn, txm, action.epoch)
        return []

    def _record_identity(self, conn: Conn, *, replace_existing: bool) -> None:
        cfg = self.config
        token = (cfg.token or self.distributor.token()).lower()
        values = (cfg.chain_id, cfg.distributor.lower(), token, cfg.epoch_seconds, cfg.pool)
        try:
            if replace_existing:  # decide allows this only while the pool has no epoch
                conn.execute(
                    "UPDATE settlement_pools SET chain_id = %s, distributor = %s, token = %s, epoch_seconds = %s"
                    " WHERE pool = %s AND NOT EXISTS (SELECT 1 FROM epochs WHERE pool = settlement_pools.pool)",
                    values,
                )
            else:
                conn.execute(
                    "INSERT INTO settlement_pools (chain_id, distributor, token, epoch_seconds, pool)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    values,
                )
        except psycopg.errors.UniqueViolation:
            pass  # another pool holds the distributor: the next observation refuses
        log.info("chain identity recorded", extra={"action": "settle.identity", "pool": cfg.pool,
                                                   "distributor": cfg.distributor})  # fmt: skip

    def _commit(self, conn: Conn, action: Commit) -> list[Event]:
        pool = self.config.pool
        if action.how == "confirmed":
            crash_point("after_confirmed")
        ep.commit_settlement(conn, pool, action.epoch, action.tx_hash)
        if action.how == "unchanged root":
            return []
        EPOCHS_SETTLED.labels(pool).inc()
        where = f"in {action.tx_hash}" if action.how == "confirmed" else f"({action.how})"
        return [("Normal", "EpochSettled", f"epoch {action.epoch} settled {where}")]

    def _publish(self, conn: Conn, txm: TxManager, epoch: int) -> list[Event]:
        row = ep.get_epoch(conn, self.config.pool, epoch)
        invariant(row is not None, f"epoch {epoch} of {self.config.pool} vanished before publication")
        assert row is not None
        data = publish_calldata(row.epoch, bytes.fromhex(row.root[2:]), row.total)
        self._preflight(txm, data)
        status = txm.submit(self.intent(epoch), self.config.distributor, data, PUBLISH_GAS)
        if not status.tx_hash:
            return []
        ep.mark_publishing(conn, self.config.pool, epoch, status.tx_hash)
        return [("Normal", "RootPublished", f"epoch {epoch} root {row.root} in {status.tx_hash}")]

    def _preflight(self, txm: TxManager, data: bytes) -> None:
        """Simulate the publication; a revert (no allowance, no funds, no role) is reported, not sent."""
        tx = {"from": Web3.to_checksum_address(txm.sender), "to": self.distributor.address, "data": data}
        self.chain.call("publish.preflight", lambda: self.chain.w3.eth.call(tx))  # type: ignore[arg-type]

    # --------------------------------------------------------------- status

    def status(self, now_s: float | None = None) -> PoolStatus:
        """The pool's figures without a pass (raises when PostgreSQL is unavailable)."""
        current = ep.epoch_of(time.time() if now_s is None else now_s, self.config.epoch_seconds)
        with self.db.connection() as conn:
            return self._status(conn, current)

    def _status(
        self,
        conn: Conn,
        current: int,
        reachable: bool = True,
        message: str = "",
        events: tuple[Event, ...] = (),
    ) -> PoolStatus:
        pool = self.config.pool
        settled = ep.latest_epoch(conn, pool, (ep.SETTLED,))
        last_tx = conn.execute(
            "SELECT tx_hash FROM epochs WHERE pool = %s AND status = 'settled' AND tx_hash IS NOT NULL"
            " ORDER BY epoch DESC LIMIT 1",
            (pool,),
        ).fetchone()
        newest = ep.latest_epoch(conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
        settled_total = settled.total if settled else 0
        earned = ep.earned_of(conn, pool, newest.epoch) if newest else 0
        lag = ep.count_epochs(conn, pool, (ep.CLOSED, ep.PUBLISHING))
        publishing = ep.latest_epoch(conn, pool, (ep.PUBLISHING,))
        pending = max(earned - settled_total, 0)
        LAG_EPOCHS.labels(pool).set(lag)
        PENDING_BASE_UNITS.labels(pool).set(pending)
        SETTLED_BASE_UNITS.labels(pool).set(settled_total)
        return PoolStatus(
            current_epoch=current,
            last_settled_epoch=settled.epoch if settled else 0,
            last_root=settled.root if settled else ZERO_ROOT,
            last_tx_hash=str(last_tx[0]) if last_tx else "",
            pending_amount=pending,
            settled_total=settled_total,
            lag_epochs=lag,
            chain_reachable=reachable,
            chain_message=message,
            events=events,
            publishing_epoch=publishing.epoch if publishing else 0,
        )


def _recorded_identity(conn: Conn, pool: str) -> ChainIdentity | None:
    row = conn.execute(
        "SELECT chain_id, distributor, token, epoch_seconds FROM settlement_pools WHERE pool = %s", (pool,)
    ).fetchone()
    return ChainIdentity(int(row[0]), str(row[1]), str(row[2]), int(row[3])) if row else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def run(settler: Settler, stop: Any, interval_s: float = 1.0) -> None:
    """Loop ``step`` until ``stop`` (a threading.Event) is set; a pass reports database errors itself."""
    while not stop.is_set():
        status = settler.step()
        log.debug(
            "settler pass", extra={"action": "settle.pass", "pool": settler.config.pool, "lag": status.lag_epochs}
        )
        stop.wait(interval_s)


__all__ = [
    "Action",
    "ChainSecrets",
    "Observation",
    "PoolConfig",
    "PoolStatus",
    "Settler",
    "decide",
    "run",
]
