"""What the transaction manager does next: pure decisions over persisted attempts.

One *family* is every attempt (fee bump) we signed for one nonce of one sender;
all attempts carry the same payload, so whichever is mined does the job. The
shell reads the family from PostgreSQL, observes the chain, calls ``decide`` and
performs the returned action, persisting before it broadcasts anything.

Decision table (first match wins)::

    an attempt has a receipt
        block hash differs from the one recorded   -> Mined (reorg_seen=True)
        not recorded yet                           -> Mined
        head - block + 1 >= confirmations          -> Confirm
        else                                       -> Wait (confirming)
    no receipt, but one was recorded               -> Reorged (receipt gone: clear, then rebroadcast)
    the sender's mined nonce count > our nonce     -> NonceConsumed (another transaction used it)
    newest attempt in the pool
        cannot pay the base fee, or older than stuck_after_s -> Bump (or Wait at the cap)
        else                                       -> Wait (pending)
    nothing in the pool
        newest attempt cannot pay the base fee     -> Bump (or Broadcast at the cap)
        else                                       -> Broadcast the newest attempt (same nonce)

Every rule may run any number of times: rebroadcasting a signed transaction is a
no-op for the chain, and a nonce can be mined once only, which is what makes a
family pay at most once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class TxState(StrEnum):
    SIGNED = "signed"  # persisted, maybe broadcast (we crash-safely assume "maybe")
    BROADCAST = "broadcast"  # the node accepted it at least once
    MINED = "mined"  # a receipt was seen (block recorded)
    CONFIRMED = "confirmed"  # `confirmations` blocks deep: final for us
    REPLACED = "replaced"  # a sibling attempt of the same nonce was mined
    FAILED = "failed"  # the nonce went to a transaction that is not ours


@dataclass(frozen=True)
class Attempt:
    """One signed transaction as persisted (before it was ever broadcast)."""

    tx_hash: str
    attempt: int
    max_fee_per_gas: int
    max_priority_fee_per_gas: int
    state: TxState
    age_s: float  # since it was signed (or last bumped)
    block_number: int | None = None
    block_hash: str | None = None


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    block_hash: str
    status: int  # 1 success, 0 reverted
    gas_used: int = 0
    effective_gas_price: int = 0  # wei per gas actually paid (base fee + tip)


@dataclass(frozen=True)
class Observation:
    """What the chain says now about one family."""

    head: int  # latest block number
    mined_nonce: int  # eth_getTransactionCount(sender, "latest")
    base_fee: int  # base fee of the next block (estimate)
    receipts: Mapping[str, Receipt]  # by tx hash, only those found
    in_pool: frozenset[str]  # tx hashes the node reports as pending


@dataclass(frozen=True)
class FeePolicy:
    priority_fee: int = 10**9  # 1 gwei tip
    base_fee_multiplier: int = 2  # max fee = multiplier * base fee + tip
    bump_percent: int = 12  # >= 10 (what nodes require to replace)
    max_fee_cap: int = 500 * 10**9  # never offer more than this per gas
    stuck_after_s: float = 30.0
    confirmations: int = 2

    def __post_init__(self) -> None:
        if self.bump_percent < 10:
            raise ValueError(f"bump_percent: {self.bump_percent} is below the 10 % nodes require")
        if self.confirmations < 1:
            raise ValueError(f"confirmations: {self.confirmations} must be at least 1")


@dataclass(frozen=True)
class Fees:
    max_fee_per_gas: int
    max_priority_fee_per_gas: int


# --------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Wait:
    reason: str  # "pending" | "confirming" | "at_fee_cap"


@dataclass(frozen=True)
class Broadcast:
    tx_hash: str  # rebroadcast this persisted attempt (same nonce, same bytes)


@dataclass(frozen=True)
class Bump:
    fees: Fees  # sign a new attempt with these fees, persist it, then broadcast


@dataclass(frozen=True)
class Mined:
    receipt: Receipt
    reorg_seen: bool  # the block recorded before is no longer canonical


@dataclass(frozen=True)
class Confirm:
    receipt: Receipt


@dataclass(frozen=True)
class Reorged:
    tx_hash: str  # its recorded receipt is gone: clear block fields, rebroadcast


@dataclass(frozen=True)
class NonceConsumed:
    nonce: int  # a transaction we did not sign took the nonce: re-plan the intent


Action = Wait | Broadcast | Bump | Mined | Confirm | Reorged | NonceConsumed


def initial_fees(base_fee: int, policy: FeePolicy) -> Fees:
    tip = min(policy.priority_fee, policy.max_fee_cap)
    return Fees(min(policy.base_fee_multiplier * base_fee + tip, policy.max_fee_cap), tip)


def _percent_up(value: int, percent: int) -> int:
    return -(-value * (100 + percent) // 100)  # ceiling, integers only


def bumped_fees(current: Fees, base_fee: int, policy: FeePolicy) -> Fees | None:
    """Fees for a replacement: both fields up by >= bump_percent, the max fee also covering
    the base fee; ``None`` when the cap does not allow a valid replacement."""
    tip = _percent_up(current.max_priority_fee_per_gas, policy.bump_percent)
    max_fee = max(
        _percent_up(current.max_fee_per_gas, policy.bump_percent), policy.base_fee_multiplier * base_fee + tip
    )
    max_fee = min(max_fee, policy.max_fee_cap)
    tip = min(tip, max_fee)
    if max_fee < _percent_up(current.max_fee_per_gas, 10) or tip < _percent_up(current.max_priority_fee_per_gas, 10):
        return None
    return Fees(max_fee, tip)


def decide(nonce: int, attempts: Sequence[Attempt], obs: Observation, policy: FeePolicy) -> Action:
    """The next step for the family of ``nonce``; ``attempts`` ordered by attempt number."""
    if not attempts:
        raise ValueError("attempts: a family has at least one persisted attempt")
    newest = attempts[-1]
    recorded = next((a for a in attempts if a.block_hash is not None), None)

    for a in attempts:
        receipt = obs.receipts.get(a.tx_hash)
        if receipt is None:
            continue
        if a.block_hash != receipt.block_hash:
            return Mined(receipt, reorg_seen=a.block_hash is not None or (recorded is not None and recorded is not a))
        if obs.head - receipt.block_number + 1 >= policy.confirmations:
            return Confirm(receipt)
        return Wait("confirming")

    if recorded is not None:
        return Reorged(recorded.tx_hash)
    if obs.mined_nonce > nonce:
        return NonceConsumed(nonce)

    current = Fees(newest.max_fee_per_gas, newest.max_priority_fee_per_gas)
    underpriced = newest.max_fee_per_gas < obs.base_fee
    if any(a.tx_hash in obs.in_pool for a in attempts):
        if underpriced or newest.age_s >= policy.stuck_after_s:
            fees = bumped_fees(current, obs.base_fee, policy)
            return Bump(fees) if fees is not None else Wait("at_fee_cap")
        return Wait("pending")
    if underpriced:
        fees = bumped_fees(current, obs.base_fee, policy)
        if fees is not None:
            return Bump(fees)
    return Broadcast(newest.tx_hash)


__all__ = [
    "Action",
    "Attempt",
    "Broadcast",
    "Bump",
    "Confirm",
    "FeePolicy",
    "Fees",
    "Mined",
    "NonceConsumed",
    "Observation",
    "Receipt",
    "Reorged",
    "TxState",
    "Wait",
    "bumped_fees",
    "decide",
    "initial_fees",
]
