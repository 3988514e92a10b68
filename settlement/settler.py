"""The settler: per RewardPool, close epochs and publish one root transaction per epoch.

``Settler.step(now_s)`` is one idempotent pass for one pool:

1. close the newest finished epoch (snapshot, payouts, tree, proofs; ``epochs``);
2. drive the in-flight publication, if any, through the transaction manager;
   confirmed → (crash point ``after_confirmed``) → the ledger commit (closing
   entry + ``settled``, one transaction); reverted or nonce lost → reopen;
3. otherwise publish the newest closed epoch: one transaction whatever the number
   of payees (it also covers any older closed epochs: roots are cumulative).
   A root equal to the last settled one needs no transaction.

A restart at any point re-enters the same pass: the intent name
``publish:<pool>:<epoch>`` makes ``submit`` return the persisted transaction
instead of signing another, and the contract rejects a second publication of an
epoch, so a root is paid for once. Chain errors never lose anything: the epoch
stays closed, the backlog shows in ``lagEpochs``/``pendingAmount`` and the
metrics, and the next pass catches up.

Used by the RewardPool controller (a Kopf timer) and by ``openledger settler run``
(a standalone process, which is how the crash tests drive it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from web3 import Web3

from openledger.settlement import epochs as ep
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.distributor import PUBLISH_GAS, Distributor, publish_calldata
from openledger.settlement.chain.rpc import Chain, make_web3
from openledger.settlement.chain.txmanager import TxManager
from openledger.settlement.crash import crash_point
from openledger.settlement.errors import ChainUnavailable, ConfigError
from openledger.settlement.metrics import EPOCHS_SETTLED, LAG_EPOCHS, PENDING_BASE_UNITS, SETTLED_BASE_UNITS

log = logging.getLogger(__name__)
ZERO_ROOT = "0x" + "00" * 32


@dataclass(frozen=True)
class PoolConfig:
    """What the settler needs of a RewardPool spec (no secrets)."""

    pool: str  # namespace/name
    epoch_seconds: int
    min_payout: int  # base units
    chain_id: int
    distributor: str
    confirmations: int = 2
    paused: bool = False

    def __post_init__(self) -> None:
        if self.epoch_seconds <= 0:
            raise ConfigError(f"spec.epochSeconds: {self.epoch_seconds} must be positive")
        if self.confirmations < 1:
            raise ConfigError(f"spec.chain.confirmations: {self.confirmations} must be at least 1")
        if not Web3.is_address(self.distributor):
            raise ConfigError(f"spec.chain.distributorAddress: {self.distributor!r} is not an address")


@dataclass(frozen=True)
class ChainSecrets:
    """Read from Kubernetes Secrets (or the environment); never logged, never in status."""

    rpc_url: str = field(repr=False)
    signer_key: str = field(repr=False)


@dataclass(frozen=True)
class PoolStatus:
    """What the controller writes to ``status`` (amounts as int base units)."""

    current_epoch: int
    last_settled_epoch: int
    last_root: str
    last_tx_hash: str
    pending_amount: int
    settled_total: int
    lag_epochs: int
    chain_reachable: bool
    chain_message: str = ""
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message) for Kubernetes Events
    publishing_epoch: int = 0


class Settler:
    """Settles one pool. Holds a PostgreSQL connection (autocommit) and a transaction manager."""

    def __init__(self, config: PoolConfig, secrets: ChainSecrets, database_url: str, policy: FeePolicy | None = None) -> None:
        self.config = config
        self.conn: psycopg.Connection[Any] = psycopg.connect(database_url, autocommit=True, connect_timeout=5)
        self.chain = Chain(make_web3(secrets.rpc_url))
        self.policy = replace(policy or FeePolicy(), confirmations=config.confirmations)
        self.txm = TxManager(self.conn, self.chain, secrets.signer_key, config.chain_id, self.policy)
        self.distributor = Distributor(self.chain, config.distributor)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Settler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def intent(self, epoch: int) -> str:
        return f"publish:{self.config.pool}:{epoch}"

    # ----------------------------------------------------------------- step

    def step(self, now_s: float | None = None) -> PoolStatus:
        """One pass (see the module docstring). Chain errors are reported, not raised."""
        now_s = time.time() if now_s is None else now_s
        pool = self.config.pool
        events: list[tuple[str, str, str]] = []
        current = ep.epoch_of(now_s, self.config.epoch_seconds)
        reachable, message = True, ""
        newest = ep.latest_epoch(self.conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
        due = current - 1
        if due >= 1 and (newest is None or newest.epoch < due):
            closed = ep.close_epoch(self.conn, pool, due, self.config.min_payout)
            events.append(("Normal", "EpochClosed", f"epoch {due} closed: {closed.row.payee_count} payees, root {closed.row.root}"))
        if not self.config.paused:
            try:
                events += self._publish_step()
            except ChainUnavailable as exc:
                reachable, message = False, str(exc)
                log.warning("chain unavailable", extra={"action": "settle.chain_down", "pool": pool})
        return self.status(current, reachable, message, tuple(events))

    def _publish_step(self) -> list[tuple[str, str, str]]:
        pool = self.config.pool
        events: list[tuple[str, str, str]] = []
        inflight = ep.latest_epoch(self.conn, pool, (ep.PUBLISHING,))
        if inflight is None:
            # A crash between submit and mark_publishing leaves a live intent for a closed epoch.
            candidate = ep.latest_epoch(self.conn, pool, (ep.CLOSED,))
            if candidate is not None and self.txm.status(self.intent(candidate.epoch)).state != "none":
                status = self.txm.status(self.intent(candidate.epoch))
                if status.tx_hash and status.state != "failed":
                    ep.mark_publishing(self.conn, pool, candidate.epoch, status.tx_hash)
                    inflight = ep.get_epoch(self.conn, pool, candidate.epoch)
        if inflight is not None:
            status = self.txm.step(self.intent(inflight.epoch))
            if status.state == "confirmed":
                crash_point("after_confirmed")
                ep.commit_settlement(self.conn, pool, inflight.epoch, status.tx_hash)
                EPOCHS_SETTLED.labels(pool).inc()
                events.append(("Normal", "EpochSettled", f"epoch {inflight.epoch} settled in {status.tx_hash}"))
                return events
            if status.state in ("reverted", "failed"):
                done = self._already_on_chain(inflight)
                if done:
                    ep.commit_settlement(self.conn, pool, inflight.epoch, status.tx_hash)
                    EPOCHS_SETTLED.labels(pool).inc()
                    events.append(("Normal", "EpochSettled", f"epoch {inflight.epoch} settled (found on chain)"))
                else:
                    ep.reopen(self.conn, pool, inflight.epoch)
                    events.append(("Warning", "PublicationFailed", f"epoch {inflight.epoch}: transaction {status.state}"))
            return events
        candidate = ep.latest_epoch(self.conn, pool, (ep.CLOSED,))
        if candidate is None:
            return events
        settled = ep.latest_epoch(self.conn, pool, (ep.SETTLED,))
        if candidate.root == (settled.root if settled else ZERO_ROOT):
            ep.commit_settlement(self.conn, pool, candidate.epoch, None)  # nothing new: no transaction
            return events
        if self._already_on_chain(candidate):
            ep.commit_settlement(self.conn, pool, candidate.epoch, None)
            return events
        intent = self.intent(candidate.epoch)
        if self.txm.status(intent).state == "failed" or self.txm.status(intent).state == "reverted":
            intent = f"{intent}:retry{int(time.time())}"
        data = publish_calldata(candidate.epoch, bytes.fromhex(candidate.root[2:]), candidate.total)
        self._preflight(data)
        status = self.txm.submit(intent, self.config.distributor, data, PUBLISH_GAS)
        if status.tx_hash:
            ep.mark_publishing(self.conn, pool, candidate.epoch, status.tx_hash)
            events.append(("Normal", "RootPublished", f"epoch {candidate.epoch} root {candidate.root} in {status.tx_hash}"))
        return events

    def _already_on_chain(self, row: ep.EpochRow) -> bool:
        state = self.distributor.state()
        return state.epoch >= row.epoch and "0x" + state.root.hex() == row.root

    def _preflight(self, data: bytes) -> None:
        """Simulate the publication; a revert (no allowance, no funds, no role) is reported, not sent."""
        tx = {"from": Web3.to_checksum_address(self.txm.sender), "to": self.distributor.address, "data": data}
        self.chain.call("publish.preflight", lambda: self.chain.w3.eth.call(tx))  # type: ignore[arg-type]

    # --------------------------------------------------------------- status

    def status(self, current: int, reachable: bool = True, message: str = "", events: tuple[tuple[str, str, str], ...] = ()) -> PoolStatus:
        pool = self.config.pool
        settled = ep.latest_epoch(self.conn, pool, (ep.SETTLED,))
        last_tx = self.conn.execute(
            "SELECT tx_hash FROM epochs WHERE pool = %s AND status = 'settled' AND tx_hash IS NOT NULL ORDER BY epoch DESC LIMIT 1",
            (pool,),
        ).fetchone()
        newest = ep.latest_epoch(self.conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
        settled_total = settled.total if settled else 0
        earned = ep.earned_of(self.conn, pool, newest.epoch) if newest else 0
        lag = ep.count_epochs(self.conn, pool, (ep.CLOSED, ep.PUBLISHING))
        publishing = ep.latest_epoch(self.conn, pool, (ep.PUBLISHING,))
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


def run(settler: Settler, stop: Any, interval_s: float = 1.0) -> None:
    """Loop ``step`` until ``stop`` (a threading.Event) is set. Database errors are retried."""
    while not stop.is_set():
        try:
            status = settler.step()
            log.debug("settler pass", extra={"action": "settle.pass", "pool": settler.config.pool, "lag": status.lag_epochs})
        except psycopg.OperationalError:
            log.warning("database unavailable", extra={"action": "settle.db_down", "pool": settler.config.pool})
        stop.wait(interval_s)


__all__ = ["ChainSecrets", "PoolConfig", "PoolStatus", "Settler", "run"]
