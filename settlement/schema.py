"""Tables of the settlement path (transactions, payouts with proofs), on the ledger's metadata.

They live in the ledger's database and migration chain (revision
``0100_settlement``, after the ledger's base) so one ``openledger db upgrade``
creates everything. The ledger's ``epochs`` table is the epoch life cycle;
these tables hold what the settler adds to it:

- ``settlement_txs``: every signed transaction, persisted with its nonce BEFORE
  it is broadcast (one row per fee-bump attempt; the same nonce groups them).
- ``settlement_nonces``: the next nonce per (chain, sender), locked while signing.
- ``settlement_epoch_totals``: per closed epoch, what all payees had earned at the
  cutoff (the base of ``pendingAmount``, including amounts rolled over by ``minPayout``).
- ``settlement_payouts``: per pool, epoch and payee address the cumulative
  amount of the epoch's tree and its Merkle proof (what claims are served from).
- ``settlement_pools`` (revision ``0300_settlement_identity``): the chain identity
  a pool's settlement state belongs to — chain id, distributor, token, epoch
  length — recorded by its first settler pass and never changed. One distributor
  serves one pool (unique), so no edit or re-creation can publish a pool's
  cumulative history to a contract that did not pay it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
)

from openledger.settlement.ledger.models import Base, Money

metadata = Base.metadata

TX_STATES = ("signed", "broadcast", "mined", "confirmed", "replaced", "failed")

settlement_txs = Table(
    "settlement_txs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("intent", Text, nullable=False),  # e.g. "publish:ns/pool:7"
    Column("chain_id", BigInteger, nullable=False),
    Column("sender", Text, nullable=False),
    Column("nonce", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("tx_hash", Text, nullable=False, unique=True),
    Column("raw_tx", LargeBinary, nullable=False),
    Column("to_address", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("gas", BigInteger, nullable=False),
    Column("max_fee_per_gas", Money, nullable=False),
    Column("max_priority_fee_per_gas", Money, nullable=False),
    Column("state", Text, nullable=False, server_default="signed"),
    Column("block_number", BigInteger),
    Column("block_hash", Text),
    Column("receipt_status", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("chain_id", "sender", "nonce", "attempt", name="uq_settlement_txs_nonce_attempt"),
    CheckConstraint("state IN ('signed','broadcast','mined','confirmed','replaced','failed')", name="state"),
    Index("ix_settlement_txs_intent", "intent"),
)

settlement_nonces = Table(
    "settlement_nonces",
    metadata,
    Column("chain_id", BigInteger, nullable=False),
    Column("sender", Text, nullable=False),
    Column("next_nonce", BigInteger, nullable=False),
    PrimaryKeyConstraint("chain_id", "sender", name="pk_settlement_nonces"),
)

settlement_payouts = Table(
    "settlement_payouts",
    metadata,
    Column("pool", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("account", Text, nullable=False),  # 0x… lower-case payee address
    Column("amount", Money, nullable=False),  # cumulative, as in the leaf
    Column("earned", Money, nullable=False),  # cumulative earnings at the cutoff (>= amount)
    Column("proof", LargeBinary, nullable=False),  # 32-byte siblings, leaf to root
    PrimaryKeyConstraint("pool", "epoch", "account", name="pk_settlement_payouts"),
)

settlement_epoch_totals = Table(
    "settlement_epoch_totals",
    metadata,
    Column("pool", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("earned", Money, nullable=False),  # all payees' cumulative earnings at the cutoff
    Column("payees_below_min", Integer, nullable=False),  # payees whose increase rolled over
    PrimaryKeyConstraint("pool", "epoch", name="pk_settlement_epoch_totals"),
)

settlement_pools = Table(
    "settlement_pools",
    metadata,
    Column("pool", Text, primary_key=True),  # namespace/name
    Column("chain_id", BigInteger, nullable=False),
    Column("distributor", Text, nullable=False),  # 0x… lower-case
    Column("token", Text, nullable=False),  # 0x… lower-case
    Column("epoch_seconds", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("chain_id", "distributor", name="uq_settlement_pools_distributor"),
)

__all__ = [
    "TX_STATES",
    "metadata",
    "settlement_epoch_totals",
    "settlement_nonces",
    "settlement_payouts",
    "settlement_pools",
    "settlement_txs",
]
