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
from dataclasses import replace
from typing import Any

import psycopg
from web3 import Web3

from openledger.settlement import epochs as ep
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.distributor import PUBLISH_GAS, Distributor, publish_calldata
from openledger.settlement.chain.rpc import Chain, make_web3
from openledger.settlement.chain.txmanager import TxManager
from openledger.settlement.crash import crash_point
from openledger.settlement.errors import ChainUnavailable, ContractReverted
from openledger.settlement.ledger.db import libpq_url
from openledger.settlement.metrics import EPOCHS_SETTLED, LAG_EPOCHS, PENDING_BASE_UNITS, SETTLED_BASE_UNITS
from openledger.settlement.pool import ChainSecrets, PoolConfig, PoolStatus

log = logging.getLogger(__name__)
ZERO_ROOT = "0x" + "00" * 32


class Settler:
    """Settles one pool. Holds a PostgreSQL connection (autocommit) and a transaction manager."""

    def __init__(
        self, config: PoolConfig, secrets: ChainSecrets, database_url: str, policy: FeePolicy | None = None
    ) -> None:
        self.config = config
        self.conn: psycopg.Connection[Any] = psycopg.connect(
            libpq_url(database_url), autocommit=True, connect_timeout=5
        )
        self.chain = Chain(make_web3(secrets.rpc_url))
        self.policy = replace(policy or FeePolicy(), confirmations=config.confirmations)
        self.txm = TxManager(self.conn, self.chain, secrets.signer_key, config.chain_id, self.policy)
        self.distributor = Distributor(self.chain, config.distributor)
        self._owns_pool = False

    def _own_pool(self) -> bool:
        """One settler per pool: a session advisory lock on the pool's name (held until close)."""
        if not self._owns_pool:
            row = self.conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (f"settler:{self.config.pool}",)
            ).fetchone()
            self._owns_pool = bool(row and row[0])
        return self._owns_pool

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
        reachable, message, blocked = True, "", ""
        if not self._own_pool():
            return self.status(current, True, "another settler holds this pool; standing by")
        newest = ep.latest_epoch(self.conn, pool, (ep.CLOSED, ep.PUBLISHING, ep.SETTLED, ep.SUPERSEDED))
        due = current - 1
        if due >= 1 and (newest is None or newest.epoch < due):
            closed = ep.close_epoch(self.conn, pool, due, self.config.min_payout)
            # An epoch that changed nothing (same root) is not worth an Event every epoch.
            if newest is None or closed.row.root != newest.root:
                events.append(
                    (
                        "Normal",
                        "EpochClosed",
                        f"epoch {due} closed: {closed.row.payee_count} payees, root {closed.row.root}",
                    )
                )
        if not self.config.paused:
            try:
                events += self._publish_step()
            except ChainUnavailable as exc:
                reachable, message = False, str(exc)
                log.warning("chain unavailable", extra={"action": "settle.chain_down", "pool": pool})
            except ContractReverted as exc:
                blocked = str(exc)
                events.append(("Warning", "PublicationBlocked", blocked))
                log.warning("publication blocked", extra={"action": "settle.blocked", "pool": pool, "reason": blocked})
        return replace(self.status(current, reachable, message, tuple(events)), blocked_message=blocked)

    def _publish_step(self) -> list[tuple[str, str, str]]:
        pool = self.config.pool
        events: list[tuple[str, str, str]] = []
        inflight = ep.latest_epoch(self.conn, pool, (ep.PUBLISHING,))
        if inflight is None:
            # A crash between submit and mark_publishing leaves a live intent for a closed epoch.
            prefix = f"publish:{pool}:"
            for intent in self.txm.open_intents():
                if intent.startswith(prefix) and intent[len(prefix) :].isdigit():
                    epoch = int(intent[len(prefix) :])
                    status = self.txm.status(intent)
                    if status.tx_hash:
                        ep.mark_publishing(self.conn, pool, epoch, status.tx_hash)
            inflight = ep.latest_epoch(self.conn, pool, (ep.PUBLISHING,))
        if inflight is not None:
            status = self.txm.step(self.intent(inflight.epoch))
            if status.state == "confirmed":
                crash_point("after_confirmed")
                ep.commit_settlement(self.conn, pool, inflight.epoch, status.tx_hash)
                EPOCHS_SETTLED.labels(pool).inc()
                events.append(("Normal", "EpochSettled", f"epoch {inflight.epoch} settled in {status.tx_hash}"))
                return events
            if status.state == "none":  # no transaction was ever persisted for it: publish again
                ep.reopen(self.conn, pool, inflight.epoch)
                return events
            if status.state in ("reverted", "failed"):
                done = self._already_on_chain(inflight)
                if done:
                    ep.commit_settlement(self.conn, pool, inflight.epoch, status.tx_hash)
                    EPOCHS_SETTLED.labels(pool).inc()
                    events.append(("Normal", "EpochSettled", f"epoch {inflight.epoch} settled (found on chain)"))
                else:
                    self.txm.abandon(self.intent(inflight.epoch))
                    ep.reopen(self.conn, pool, inflight.epoch)
                    events.append(
                        ("Warning", "PublicationFailed", f"epoch {inflight.epoch}: transaction {status.state}")
                    )
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
        data = publish_calldata(candidate.epoch, bytes.fromhex(candidate.root[2:]), candidate.total)
        self._preflight(data)
        status = self.txm.submit(intent, self.config.distributor, data, PUBLISH_GAS)
        if status.tx_hash:
            ep.mark_publishing(self.conn, pool, candidate.epoch, status.tx_hash)
            events.append(
                ("Normal", "RootPublished", f"epoch {candidate.epoch} root {candidate.root} in {status.tx_hash}")
            )
        return events

    def _already_on_chain(self, row: ep.EpochRow) -> bool:
        state = self.distributor.state()
        return state.epoch >= row.epoch and "0x" + state.root.hex() == row.root

    def _preflight(self, data: bytes) -> None:
        """Simulate the publication; a revert (no allowance, no funds, no role) is reported, not sent."""
        tx = {"from": Web3.to_checksum_address(self.txm.sender), "to": self.distributor.address, "data": data}
        self.chain.call("publish.preflight", lambda: self.chain.w3.eth.call(tx))  # type: ignore[arg-type]

    # --------------------------------------------------------------- status

    def status(
        self, current: int, reachable: bool = True, message: str = "", events: tuple[tuple[str, str, str], ...] = ()
    ) -> PoolStatus:
        pool = self.config.pool
        settled = ep.latest_epoch(self.conn, pool, (ep.SETTLED,))
        last_tx = self.conn.execute(
            "SELECT tx_hash FROM epochs WHERE pool = %s AND status = 'settled' AND tx_hash IS NOT NULL"
            " ORDER BY epoch DESC LIMIT 1",
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
            log.debug(
                "settler pass", extra={"action": "settle.pass", "pool": settler.config.pool, "lag": status.lag_epochs}
            )
        except psycopg.OperationalError:
            log.warning("database unavailable", extra={"action": "settle.db_down", "pool": settler.config.pool})
        stop.wait(interval_s)


__all__ = ["ChainSecrets", "PoolConfig", "PoolStatus", "Settler", "run"]
