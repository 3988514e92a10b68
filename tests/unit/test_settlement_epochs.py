"""Pure epoch rules: minPayout roll-over, leaf increases, closing-entry allocation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openledger.settlement.epochs import allocate_debits, epoch_of, leaf_increases, payout_amounts
from openledger.settlement.errors import SettlementInvariant

A, B = "0x" + "aa" * 20, "0x" + "bb" * 20


def test_epoch_is_unix_time_divided_by_length() -> None:
    assert epoch_of(7199.9, 3600) == 1 and epoch_of(7200, 3600) == 2
    with pytest.raises(ValueError, match="epochSeconds"):
        epoch_of(1, 0)


def test_amounts_below_min_payout_roll_over_until_they_add_up() -> None:
    assert payout_amounts({A: 40}, {}, 100) == {}
    assert payout_amounts({A: 99}, {}, 100) == {}
    assert payout_amounts({A: 100}, {}, 100) == {A: 100}
    # Paid 100; 50 more earned is below the minimum: the leaf stays at 100.
    assert payout_amounts({A: 150}, {A: 100}, 100) == {A: 100}
    assert payout_amounts({A: 200}, {A: 100}, 100) == {A: 200}


def test_a_leaf_never_goes_down_after_a_reversal() -> None:
    assert payout_amounts({A: 80}, {A: 100}, 0) == {A: 100}
    assert payout_amounts({}, {A: 100}, 0) == {A: 100}


def test_negative_min_payout_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match="minPayout"):
        payout_amounts({}, {}, -1)


earnings = st.dictionaries(st.sampled_from([A, B, "0x" + "cc" * 20]), st.integers(0, 10**24), max_size=3)


@given(earnings, earnings, st.integers(0, 10**23))
def test_payouts_are_monotone_and_never_exceed_what_was_earned(
    earned: dict[str, int], previous: dict[str, int], min_payout: int
) -> None:
    amounts = payout_amounts(earned, previous, min_payout)
    for account, amount in amounts.items():
        assert amount >= previous.get(account, 0)
        assert amount <= max(earned.get(account, 0), previous.get(account, 0))
        if amount > previous.get(account, 0):
            assert amount - previous.get(account, 0) >= min_payout
    assert all(a in amounts for a, v in previous.items() if v)


def test_leaf_increases_are_the_differences_and_refuse_decreases() -> None:
    assert leaf_increases({A: 10, B: 5}, {A: 4}) == {A: 6, B: 5}
    with pytest.raises(SettlementInvariant, match="decrease"):
        leaf_increases({A: 3}, {A: 4})
    with pytest.raises(SettlementInvariant, match="missing"):
        leaf_increases({A: 4}, {A: 4, B: 1})


def test_closing_debits_take_the_owner_account_first_then_contributor() -> None:
    balances = {f"owner:{A}": 30, f"contributor:{A}": 50}
    assert allocate_debits({A: 70}, balances) == {f"owner:{A}": 30, f"contributor:{A}": 40}
    assert allocate_debits({B: 9}, {f"contributor:{B}": 9}) == {f"contributor:{B}": 9}
    assert allocate_debits({B: 9}, {}) == {f"owner:{B}": 9}
