"""The revenue split: exact, balanced, remainders on the owner."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import InvariantViolation, PoisonEvent

ADDR = st.integers(min_value=1, max_value=2**160 - 1).map(lambda n: f"0x{n:040x}")
COST = st.integers(min_value=0, max_value=10**30)


@st.composite
def shares(draw: st.DrawFn) -> tuple[int, list[int]]:
    # Any fee with any shares summing to <= 10000: shares are of what the fee leaves.
    fee = draw(st.integers(min_value=0, max_value=10_000))
    parts: list[int] = []
    left = 10_000
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        bps = draw(st.integers(min_value=0, max_value=left))
        parts.append(bps)
        left -= bps
    return fee, parts


@given(cost=COST, fee_shares=shares())
def test_split_adds_up_to_the_cost_exactly(cost: int, fee_shares: tuple[int, list[int]]) -> None:
    fee_bps, parts = fee_shares
    split = sp.split_cost(cost, fee_bps, parts)
    assert split.fee + sum(split.contributors) + split.owner == cost
    assert split.fee == cost * fee_bps // 10_000
    assert all(c == (cost - split.fee) * bps // 10_000 for c, bps in zip(split.contributors, parts, strict=True))
    assert split.owner >= 0


@given(cost=COST, fee_shares=shares())
def test_rounding_remainder_lands_on_the_owner_and_is_smaller_than_one_unit_per_payee(
    cost: int, fee_shares: tuple[int, list[int]]
) -> None:
    fee_bps, parts = fee_shares
    split = sp.split_cost(cost, fee_bps, parts)
    exact_owner_share = (cost - split.fee) * (10_000 - sum(parts)) // 10_000
    assert 0 <= split.owner - exact_owner_share <= len(parts)


@given(
    cost=COST,
    payer=ADDR,
    owner=ADDR,
    pool=st.sampled_from(["", "ns/pool", "b/p2"]),
    fee_shares=shares(),
    data=st.data(),
)
def test_every_event_entry_balances_to_zero(
    cost: int, payer: str, owner: str, pool: str, fee_shares: tuple[int, list[int]], data: st.DataObject
) -> None:
    fee_bps, parts = fee_shares
    contributors = [(data.draw(ADDR), bps) for bps in parts]
    postings = sp.event_postings(cost, payer, owner, pool, fee_bps, contributors)
    assert sum(a for _, a in postings) == 0
    if cost:
        assert (sp.agent_account(payer), -cost) in postings
    else:
        assert postings == []
    assert sum(sp.aggregate(postings).values()) == 0


def test_worked_example_from_the_design() -> None:
    # cost 1000, fee 5 % -> 50; contributor 15 % of 950 -> 142 (142.5 rounded down); owner the rest.
    assert sp.split_cost(1000, 500, [1500]) == sp.Split(1000, 50, (142,), 808)


def test_fee_goes_to_the_protocol_when_no_pool_settles_the_model() -> None:
    postings = sp.event_postings(100, "0x" + "a" * 40, "0x" + "b" * 40, "", 100, [])
    assert ("protocol:fees", 1) in postings


def test_addresses_are_case_insensitive_accounts() -> None:
    assert sp.owner_account("0xABcd" + "0" * 36) == "owner:0xabcd" + "0" * 36


@pytest.mark.parametrize(
    ("cost", "fee_bps", "parts", "field"),
    [
        (-1, 0, [], "cost"),
        (1, 10_001, [], "fee_bps"),
        (1, 0, [5000, 5001], "contributors"),
        (1, 0, [-1], "contributors"),
    ],
)
def test_impossible_splits_are_rejected_naming_the_field(cost: int, fee_bps: int, parts: list[int], field: str) -> None:
    with pytest.raises(PoisonEvent, match=field):
        sp.split_cost(cost, fee_bps, parts)


def test_fee_plus_shares_above_10000_bps_is_split_not_refused() -> None:
    # A 5 % pool fee with contributors at 100 % of the rest: valid specs, so a valid split (was PoisonEvent).
    split = sp.split_cost(10_000, 500, [6000, 4000])
    assert (split.fee, split.contributors, split.owner) == (500, (5700, 3800), 0)
    split = sp.split_cost(999, 10_000, [10_000])
    assert (split.fee, split.contributors, split.owner) == (999, (0,), 0)


def test_aggregate_refuses_unbalanced_postings() -> None:
    with pytest.raises(InvariantViolation, match="sum to 1"):
        sp.aggregate([("a:x", 1)])


def test_parse_account_names_the_bad_account() -> None:
    assert sp.parse_account("pool_fee:ns/p") == ("pool_fee", "ns/p")
    with pytest.raises(ValueError, match="nope"):
        sp.parse_account("nope")
