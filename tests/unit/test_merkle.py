"""Merkle trees for the cumulative distribution (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openledger.settlement.merkle import (
    MerkleError,
    build_tree,
    keccak256,
    leaf_hash,
    leaf_preimage,
    process_proof,
    verify,
)

ALICE = "0x" + "aa" * 20
BOB = "0x" + "bb" * 20

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
payouts = st.dictionaries(addresses, st.integers(min_value=0, max_value=2**256 - 1), min_size=1, max_size=40)


def test_keccak_is_ethereum_keccak_not_sha3() -> None:
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


def test_leaf_matches_openzeppelin_standard_merkle_tree_encoding() -> None:
    # abi.encode(address, uint256): 12 zero bytes, the address, the amount as 32 bytes.
    preimage = leaf_preimage(ALICE, 5)
    assert preimage == bytes(12) + bytes.fromhex("aa" * 20) + (5).to_bytes(32, "big")
    assert leaf_hash(ALICE, 5) == keccak256(keccak256(preimage))


def test_single_payee_tree_root_is_its_leaf_and_proof_is_empty() -> None:
    tree = build_tree({ALICE: 7})
    assert tree.root == leaf_hash(ALICE, 7)
    assert tree.proof(ALICE) == []
    assert verify(tree.root, ALICE, 7, [])


def test_two_payees_hash_the_sorted_pair() -> None:
    tree = build_tree({ALICE: 1, BOB: 2})
    a, b = sorted([leaf_hash(ALICE, 1), leaf_hash(BOB, 2)])
    assert tree.root == keccak256(a + b)


def test_tree_does_not_depend_on_input_order_or_address_case() -> None:
    one = build_tree({ALICE: 1, BOB: 2})
    two = build_tree({BOB.upper().replace("0X", "0x"): 2, ALICE: 1})
    assert one.root == two.root


def test_wrong_amount_or_account_does_not_verify() -> None:
    tree = build_tree({ALICE: 1, BOB: 2, "0x" + "cc" * 20: 3})
    proof = tree.proof(ALICE)
    assert verify(tree.root, ALICE, 1, proof)
    assert not verify(tree.root, ALICE, 2, proof)
    assert not verify(tree.root, BOB, 1, proof)


@pytest.mark.parametrize(
    ("account", "amount", "field"),
    [("0x1234", 1, "account"), ("nothex" * 7, 1, "account"), (ALICE, -1, "amount"), (ALICE, 2**256, "amount")],
)
def test_bad_input_names_the_field(account: str, amount: int, field: str) -> None:
    with pytest.raises(MerkleError, match=field):
        build_tree({account: amount})


def test_duplicate_address_in_different_case_is_rejected() -> None:
    with pytest.raises(MerkleError, match="twice"):
        build_tree({ALICE: 1, ALICE.upper().replace("0X", "0x"): 2})


def test_empty_tree_has_zero_root() -> None:
    tree = build_tree({})
    assert tree.root == bytes(32) and len(tree) == 0 and tree.all_proofs() == {}


@settings(max_examples=60, deadline=None)
@given(payouts)
def test_every_proof_verifies_and_all_proofs_equals_single_proofs(amounts: dict[str, int]) -> None:
    tree = build_tree(amounts)
    proofs = tree.all_proofs()
    assert set(proofs) == {a.lower() for a in amounts}
    for account, amount in amounts.items():
        assert proofs[account.lower()] == tree.proof(account)
        assert process_proof(leaf_hash(account, amount), proofs[account.lower()]) == tree.root
    assert tree.total == sum(amounts.values())


@settings(max_examples=40, deadline=None)
@given(payouts, st.integers(min_value=1, max_value=10**30))
def test_a_changed_amount_changes_the_root(amounts: dict[str, int], delta: int) -> None:
    before = build_tree(amounts).root
    changed = dict(amounts)
    key = next(iter(changed))
    changed[key] = (changed[key] + delta) % 2**256
    if changed[key] != amounts[key]:
        assert build_tree(changed).root != before
