"""Pure decisions of the transaction manager."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openledger.settlement.chain.decisions import (
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
    bumped_fees,
    decide,
    initial_fees,
)

POLICY = FeePolicy(priority_fee=10**9, max_fee_cap=100 * 10**9, stuck_after_s=30, confirmations=3)
GWEI = 10**9


def attempt(
    n: int = 0, *, fee: int = 10 * GWEI, tip: int = GWEI, age: float = 1.0, block: tuple[int, str] | None = None
) -> Attempt:
    return Attempt(
        tx_hash=f"0x{n:064x}",
        attempt=n,
        max_fee_per_gas=fee,
        max_priority_fee_per_gas=tip,
        state=TxState.MINED if block else TxState.BROADCAST,
        age_s=age,
        block_number=block[0] if block else None,
        block_hash=block[1] if block else None,
    )


def obs(
    *,
    head: int = 100,
    mined_nonce: int = 5,
    base_fee: int = GWEI,
    receipts: dict[str, Receipt] | None = None,
    in_pool: set[str] | None = None,
) -> Observation:
    return Observation(
        head=head, mined_nonce=mined_nonce, base_fee=base_fee, receipts=receipts or {}, in_pool=frozenset(in_pool or ())
    )


def receipt(a: Attempt, block: int = 99, block_hash: str = "0xb1", status: int = 1) -> Receipt:
    return Receipt(a.tx_hash, block, block_hash, status)


def test_gone_from_pool_and_not_mined_is_rebroadcast_with_same_bytes() -> None:
    a = attempt()
    assert decide(5, [a], obs(), POLICY) == Broadcast(a.tx_hash)


def test_in_pool_and_fresh_waits() -> None:
    a = attempt()
    assert decide(5, [a], obs(in_pool={a.tx_hash}), POLICY) == Wait("pending")


def test_in_pool_too_long_is_bumped_at_least_ten_percent() -> None:
    a = attempt(age=31)
    action = decide(5, [a], obs(in_pool={a.tx_hash}), POLICY)
    assert isinstance(action, Bump)
    assert action.fees.max_fee_per_gas >= a.max_fee_per_gas * 110 // 100
    assert action.fees.max_priority_fee_per_gas >= a.max_priority_fee_per_gas * 110 // 100


def test_base_fee_above_our_max_fee_bumps_to_cover_it() -> None:
    a = attempt(fee=10 * GWEI)
    action = decide(5, [a], obs(base_fee=30 * GWEI, in_pool={a.tx_hash}), POLICY)
    assert isinstance(action, Bump) and action.fees.max_fee_per_gas >= 60 * GWEI


def test_bump_stops_at_the_cap() -> None:
    a = attempt(fee=POLICY.max_fee_cap, age=100)
    assert decide(5, [a], obs(in_pool={a.tx_hash}, base_fee=POLICY.max_fee_cap * 2), POLICY) == Wait("at_fee_cap")


def test_mined_is_recorded_then_confirmed_at_depth() -> None:
    a = attempt()
    r = receipt(a, block=99)
    assert decide(5, [a], obs(head=99, receipts={a.tx_hash: r}), POLICY) == Mined(r, reorg_seen=False)
    recorded = attempt(block=(99, r.block_hash))
    assert decide(5, [recorded], obs(head=100, receipts={a.tx_hash: r}), POLICY) == Wait("confirming")
    assert decide(5, [recorded], obs(head=101, receipts={a.tx_hash: r}), POLICY) == Confirm(r)


def test_an_older_attempt_mined_is_what_counts() -> None:
    first, second = attempt(0), attempt(1, fee=20 * GWEI, tip=2 * GWEI)
    r = receipt(first)
    assert decide(5, [first, second], obs(head=99, receipts={first.tx_hash: r}), POLICY) == Mined(r, reorg_seen=False)


def test_receipt_gone_is_a_reorg() -> None:
    a = attempt(block=(99, "0xb1"))
    assert decide(5, [a], obs(mined_nonce=5), POLICY) == Reorged(a.tx_hash)


def test_receipt_in_another_block_is_a_reorg_seen() -> None:
    a = attempt(block=(99, "0xb1"))
    r = receipt(a, block=100, block_hash="0xb2")
    assert decide(5, [a], obs(head=100, receipts={a.tx_hash: r}), POLICY) == Mined(r, reorg_seen=True)


def test_nonce_used_by_someone_else_is_reported() -> None:
    assert decide(5, [attempt()], obs(mined_nonce=6), POLICY) == NonceConsumed(5)


def test_gone_and_underpriced_is_bumped_not_resent() -> None:
    a = attempt(fee=5 * GWEI)
    assert isinstance(decide(5, [a], obs(base_fee=10 * GWEI), POLICY), Bump)


def test_empty_family_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="attempts"):
        decide(5, [], obs(), POLICY)


def test_policy_rejects_bumps_below_ten_percent() -> None:
    with pytest.raises(ValueError, match="bump_percent"):
        FeePolicy(bump_percent=5)


def test_initial_fees_cover_twice_the_base_fee() -> None:
    assert initial_fees(10 * GWEI, POLICY) == Fees(21 * GWEI, GWEI)


@given(st.integers(1, 10**12), st.integers(1, 10**11), st.integers(0, 10**12))
def test_bumped_fees_are_valid_replacements_or_none(max_fee: int, tip: int, base_fee: int) -> None:
    tip = min(tip, max_fee)
    policy = FeePolicy(max_fee_cap=10**12)
    fees = bumped_fees(Fees(max_fee, tip), base_fee, policy)
    if fees is not None:
        assert fees.max_fee_per_gas * 100 >= max_fee * 110
        assert fees.max_priority_fee_per_gas * 100 >= tip * 110
        assert fees.max_fee_per_gas <= policy.max_fee_cap
        assert fees.max_priority_fee_per_gas <= fees.max_fee_per_gas
