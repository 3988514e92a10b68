"""The transaction manager: sign, persist, broadcast, watch, bump, confirm — crash-safe.

Life of an *intent* (a named payload such as ``publish:ns/pool:7``):

1. ``submit``: in ONE PostgreSQL transaction lock the sender's nonce row, pick the
   nonce, sign, insert the raw transaction; COMMIT; only then broadcast. A crash
   anywhere leaves either nothing or a persisted transaction we can resend.
2. ``step``: read the intent's attempts, observe the chain, ``decide`` (pure, in
   ``decisions.py``) and perform that one action. Called in a loop by the settler
   and after every restart, it reconciles by nonce: mined → recorded; in the pool →
   wait; gone → rebroadcast the same bytes; stuck → a fee bump (a new attempt with
   the same nonce, persisted before broadcast); receipt gone or block changed →
   reorg, resubmit; ``confirmations`` deep → confirmed.

Idempotency: ``submit`` for an intent that already has a live family returns it;
``step`` may run any number of times (see ``decisions``). A nonce is mined at most
once, so an intent's payload executes at most once per family; a new family is
only planned after a foreign transaction consumed the nonce (``NonceConsumed``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from eth_account import Account
from web3 import Web3

from openledger.settlement.chain.decisions import (
    Action,
    Attempt,
    Broadcast,
    Bump,
    Confirm,
    FeePolicy,
    Fees,
    Mined,
    NonceConsumed,
    Observation,
    Receipt,
    Reorged,
    TxState,
    Wait,
    decide,
    initial_fees,
)
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.crash import crash_point
from openledger.settlement.errors import ChainUnavailable, SettlementInvariant
from openledger.settlement.metrics import FEE_BUMPS, GAS_SPENT_WEI, REORGS, TRANSACTIONS

log = logging.getLogger(__name__)

LIVE_STATES = (TxState.SIGNED.value, TxState.BROADCAST.value, TxState.MINED.value)


@dataclass(frozen=True)
class TxStatus:
    """Where an intent stands. ``state``: pending | confirmed | reverted | failed | none."""

    intent: str
    state: str
    tx_hash: str | None = None
    nonce: int | None = None
    block_number: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class _Row:
    id: int
    nonce: int
    attempt: int
    tx_hash: str
    raw_tx: bytes
    to_address: str
    data: bytes
    gas: int
    max_fee: int
    tip: int
    state: str
    block_number: int | None
    block_hash: str | None
    age_s: float

    def as_attempt(self) -> Attempt:
        return Attempt(
            tx_hash=self.tx_hash,
            attempt=self.attempt,
            max_fee_per_gas=self.max_fee,
            max_priority_fee_per_gas=self.tip,
            state=TxState(self.state),
            age_s=self.age_s,
            block_number=self.block_number,
            block_hash=self.block_hash,
        )


_SELECT = (
    "SELECT id, nonce, attempt, tx_hash, raw_tx, to_address, data, gas, max_fee_per_gas, max_priority_fee_per_gas,"
    " state, block_number, block_hash, extract(epoch from now() - updated_at)::float8"
    " FROM settlement_txs"
)


_INSERT = (
    "INSERT INTO settlement_txs (intent, chain_id, sender, nonce, attempt, tx_hash, raw_tx, to_address, data,"
    " gas, max_fee_per_gas, max_priority_fee_per_gas, state)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'signed')"
)


def _row(r: tuple[Any, ...]) -> _Row:
    return _Row(
        r[0],
        r[1],
        r[2],
        r[3],
        bytes(r[4]),
        r[5],
        bytes(r[6]),
        r[7],
        int(r[8]),
        int(r[9]),
        r[10],
        r[11],
        r[12],
        float(r[13]),
    )


class TxManager:
    """One signer on one chain. Not thread-safe; one per settler loop."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        chain: Chain,
        signer_key: str,
        chain_id: int,
        policy: FeePolicy,
        *,
        pool: str = "",
    ) -> None:
        """``pool``: the RewardPool whose transactions these are (labels the gas spent; "" counts none)."""
        if not conn.autocommit:
            raise ValueError(
                "conn: the transaction manager needs an autocommit connection (it opens its own transactions)"
            )
        self.conn = conn
        self.chain = chain
        self._key = signer_key
        self.sender = Account.from_key(signer_key).address.lower()
        self.chain_id = chain_id
        self.policy = policy
        self.pool = pool

    def __repr__(self) -> str:  # never show the key
        return f"TxManager(sender={self.sender}, chain_id={self.chain_id})"

    # ------------------------------------------------------------------ reads

    def _family(self, intent: str) -> list[_Row]:
        """The live family of ``intent`` (attempts of its newest non-failed nonce)."""
        rows = [_row(r) for r in self.conn.execute(_SELECT + " WHERE intent = %s ORDER BY nonce, attempt", (intent,))]
        live = [r for r in rows if r.state != TxState.FAILED.value]
        if not live:
            return []
        nonce = live[-1].nonce
        return [r for r in live if r.nonce == nonce]

    def status(self, intent: str) -> TxStatus:
        family = self._family(intent)
        if not family:
            failed = self.conn.execute("SELECT 1 FROM settlement_txs WHERE intent = %s LIMIT 1", (intent,)).fetchone()
            return TxStatus(intent, "failed" if failed else "none")
        done = next((r for r in family if r.state == TxState.CONFIRMED.value), None)
        if done is not None:
            status = self.conn.execute("SELECT receipt_status FROM settlement_txs WHERE id = %s", (done.id,)).fetchone()
            state = "confirmed" if status and status[0] == 1 else "reverted"
            return TxStatus(intent, state, done.tx_hash, done.nonce, done.block_number)
        mined = next((r for r in family if r.block_hash is not None), family[-1])
        return TxStatus(intent, "pending", mined.tx_hash, mined.nonce, mined.block_number, mined.state)

    def abandon(self, intent: str) -> None:
        """Give up the live family of ``intent`` (it reverted): a later ``submit`` signs a new nonce."""
        self.conn.execute(
            "UPDATE settlement_txs SET state = 'failed', updated_at = now() WHERE intent = %s AND state <> 'failed'",
            (intent,),
        )

    def open_intents(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT intent FROM settlement_txs WHERE chain_id = %s AND sender = %s AND state = ANY(%s)",
            (self.chain_id, self.sender, list(LIVE_STATES)),
        )
        return sorted(r[0] for r in rows)

    # ----------------------------------------------------------------- submit

    def _sign(self, nonce: int, to: str, data: bytes, gas: int, fees: Fees) -> tuple[str, bytes]:
        tx = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": Web3.to_checksum_address(to),
            "value": 0,
            "data": data,
            "gas": gas,
            "maxFeePerGas": fees.max_fee_per_gas,
            "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
        }
        signed = Account.sign_transaction(tx, self._key)
        tx_hash = signed.hash.hex()
        return (tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash), bytes(signed.raw_transaction)

    def submit(self, intent: str, to: str, data: bytes, gas: int) -> TxStatus:
        """Sign and persist one transaction for ``intent`` (unless one is live), then broadcast it."""
        if self._family(intent):
            return self.status(intent)
        # Chain reads first: if the chain is down we fail before touching the database.
        chain_nonce = self.chain.nonce(self.sender, "latest")
        fees = initial_fees(self.chain.next_base_fee(), self.policy)
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO settlement_nonces (chain_id, sender, next_nonce) VALUES (%s, %s, %s)"
                " ON CONFLICT (chain_id, sender) DO NOTHING",
                (self.chain_id, self.sender, chain_nonce),
            )
            row = self.conn.execute(
                "SELECT next_nonce FROM settlement_nonces WHERE chain_id = %s AND sender = %s FOR UPDATE",
                (self.chain_id, self.sender),
            ).fetchone()
            assert row is not None
            nonce = max(int(row[0]), chain_nonce)
            tx_hash, raw = self._sign(nonce, to, data, gas, fees)
            self.conn.execute(
                _INSERT,
                (
                    intent,
                    self.chain_id,
                    self.sender,
                    nonce,
                    0,
                    tx_hash,
                    raw,
                    to.lower(),
                    data,
                    gas,
                    fees.max_fee_per_gas,
                    fees.max_priority_fee_per_gas,
                ),
            )
            self.conn.execute(
                "UPDATE settlement_nonces SET next_nonce = %s WHERE chain_id = %s AND sender = %s",
                (nonce + 1, self.chain_id, self.sender),
            )
        TRANSACTIONS.labels("submitted").inc()
        log.info(
            "transaction signed", extra={"action": "tx.signed", "intent": intent, "nonce": nonce, "tx_hash": tx_hash}
        )
        crash_point("before_broadcast")
        self._broadcast(tx_hash, raw)
        return self.status(intent)

    def _broadcast(self, tx_hash: str, raw: bytes) -> None:
        self.chain.send_raw(raw)
        crash_point("after_broadcast")
        self.conn.execute(
            "UPDATE settlement_txs SET state = 'broadcast', updated_at = now() WHERE tx_hash = %s AND state = 'signed'",
            (tx_hash,),
        )

    # ------------------------------------------------------------------- step

    def observe(self, family: list[_Row]) -> Observation:
        receipts: dict[str, Receipt] = {}
        in_pool: set[str] = set()
        for r in family:
            receipt = self.chain.receipt(r.tx_hash)
            if receipt is not None:
                receipts[r.tx_hash] = receipt
            elif self.chain.in_pool(r.tx_hash):
                in_pool.add(r.tx_hash)
        return Observation(
            head=self.chain.head(),
            mined_nonce=self.chain.nonce(self.sender, "latest"),
            base_fee=self.chain.next_base_fee(),
            receipts=receipts,
            in_pool=frozenset(in_pool),
        )

    def step(self, intent: str) -> TxStatus:
        """Reconcile ``intent`` once with the chain (raises ``ChainUnavailable`` when it is down)."""
        family = self._family(intent)
        if not family or any(r.state == TxState.CONFIRMED.value for r in family):
            return self.status(intent)
        obs = self.observe(family)
        action = decide(family[0].nonce, [r.as_attempt() for r in family], obs, self.policy)
        self._apply(intent, family, action)
        return self.status(intent)

    def _apply(self, intent: str, family: list[_Row], action: Action) -> None:
        ids = [r.id for r in family]
        extra = {"intent": intent, "nonce": family[0].nonce}
        if isinstance(action, Wait):
            if action.reason == "pending":
                self.conn.execute(
                    "UPDATE settlement_txs SET state = 'broadcast' WHERE id = ANY(%s) AND state = 'signed'", (ids,)
                )
            return
        if isinstance(action, Broadcast):
            newest = family[-1]
            log.info("rebroadcasting", extra={"action": "tx.rebroadcast", **extra, "tx_hash": action.tx_hash})
            TRANSACTIONS.labels("rebroadcast").inc()
            row = next(r for r in family if r.tx_hash == action.tx_hash)
            self._broadcast(row.tx_hash, row.raw_tx if row else newest.raw_tx)
            return
        if isinstance(action, Bump):
            newest = family[-1]
            tx_hash, raw = self._sign(newest.nonce, newest.to_address, newest.data, newest.gas, action.fees)
            self.conn.execute(
                _INSERT,
                (
                    intent,
                    self.chain_id,
                    self.sender,
                    newest.nonce,
                    newest.attempt + 1,
                    tx_hash,
                    raw,
                    newest.to_address,
                    newest.data,
                    newest.gas,
                    action.fees.max_fee_per_gas,
                    action.fees.max_priority_fee_per_gas,
                ),
            )
            FEE_BUMPS.inc()
            log.info(
                "fee bump",
                extra={
                    "action": "tx.bump",
                    **extra,
                    "tx_hash": tx_hash,
                    "max_fee_per_gas": action.fees.max_fee_per_gas,
                },
            )
            self._broadcast(tx_hash, raw)
            return
        if isinstance(action, Mined | Confirm):
            receipt = action.receipt
            if isinstance(action, Mined) and action.reorg_seen:
                REORGS.inc()
                log.warning("reorg: receipt moved", extra={"action": "tx.reorg", **extra, "tx_hash": receipt.tx_hash})
            state = TxState.CONFIRMED.value if isinstance(action, Confirm) else TxState.MINED.value
            with self.conn.transaction():
                self.conn.execute(
                    "UPDATE settlement_txs SET state = 'replaced', block_number = NULL, block_hash = NULL,"
                    " updated_at = now() WHERE id = ANY(%s) AND tx_hash <> %s",
                    (ids, receipt.tx_hash),
                )
                self.conn.execute(
                    "UPDATE settlement_txs SET state = %s, block_number = %s, block_hash = %s, receipt_status = %s,"
                    " updated_at = now() WHERE tx_hash = %s",
                    (state, receipt.block_number, receipt.block_hash, receipt.status, receipt.tx_hash),
                )
            if isinstance(action, Confirm):
                TRANSACTIONS.labels("confirmed" if receipt.status == 1 else "reverted").inc()
                if self.pool:  # a reverted transaction burnt its gas too
                    GAS_SPENT_WEI.labels(self.pool).inc(receipt.gas_used * receipt.effective_gas_price)
                log.info("transaction confirmed", extra={"action": "tx.confirmed", **extra, "tx_hash": receipt.tx_hash})
            else:
                log.info("transaction mined", extra={"action": "tx.mined", **extra, "tx_hash": receipt.tx_hash})
                crash_point("after_mined")
            return
        if isinstance(action, Reorged):
            REORGS.inc()
            log.warning("reorg: receipt gone", extra={"action": "tx.reorg", **extra, "tx_hash": action.tx_hash})
            self.conn.execute(
                "UPDATE settlement_txs SET state = 'broadcast', block_number = NULL, block_hash = NULL,"
                " receipt_status = NULL, updated_at = now() WHERE id = ANY(%s)",
                (ids,),
            )
            return
        if isinstance(action, NonceConsumed):
            TRANSACTIONS.labels("nonce_consumed").inc()
            log.error("nonce taken by a foreign transaction", extra={"action": "tx.nonce_consumed", **extra})
            self.conn.execute(
                "UPDATE settlement_txs SET state = 'failed', updated_at = now() WHERE id = ANY(%s)", (ids,)
            )
            return
        raise SettlementInvariant(f"unknown action {action!r}")  # pragma: no cover

    def wait(self, intent: str, timeout_s: float, poll_interval_s: float = 0.2) -> TxStatus:
        """Step until confirmed/reverted/failed or ``timeout_s``; chain errors are retried."""
        deadline = time.monotonic() + timeout_s
        status = self.status(intent)
        while time.monotonic() < deadline:
            try:
                status = self.step(intent)
            except ChainUnavailable:
                status = self.status(intent)
            if status.state in ("confirmed", "reverted", "failed", "none"):
                return status
            time.sleep(poll_interval_s)
        return status


__all__ = ["TxManager", "TxStatus"]
