"""RewardDistributor on anvil: proofs from merkle.py verify on chain; roles, pause, epochs; gas."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from web3 import Web3

from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import Distributor, claim_calldata, publish_calldata, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.merkle import build_tree

from .conftest import Signer, new_signer


def send(chain: Chain, signer: Signer, to: str, data: bytes, gas: int = 1_000_000) -> dict[str, Any]:
    tx = {
        "type": 2,
        "chainId": chain.chain_id(),
        "nonce": chain.nonce(signer.address, "pending"),
        "to": Web3.to_checksum_address(to),
        "data": data,
        "gas": gas,
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
        "value": 0,
    }
    tx_hash = chain.w3.eth.send_raw_transaction(Account.sign_transaction(tx, signer.key).raw_transaction)
    return dict(chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10))


def call_data(d: Deployment, chain: Chain, fn: str, *args: Any) -> bytes:
    contract = Distributor(chain, d.distributor).contract
    return bytes.fromhex(getattr(contract.functions, fn)(*args)._encode_transaction_data()[2:])


def payees(n: int, salt: int = 0) -> dict[str, int]:
    return {f"0x{i + 0x5000:040x}": 10**12 * (i + 1) + salt for i in range(n)}


def test_every_proof_of_a_tree_verifies_on_chain_and_pays_once(
    chain: Chain, deployment: Deployment, signer: Signer
) -> None:
    amounts = payees(33)  # not a power of two: some nodes have no sibling
    tree = build_tree(amounts)
    assert send(chain, signer, deployment.distributor, publish_calldata(1, tree.root, tree.total))["status"] == 1
    claimer = new_signer(chain)
    proofs = tree.all_proofs()
    for account, amount in amounts.items():
        assert (
            send(chain, claimer, deployment.distributor, claim_calldata(account, amount, proofs[account]))["status"]
            == 1
        )
        assert token_balance(chain, deployment.token, account) == amount
    account = next(iter(amounts))
    replay = send(chain, claimer, deployment.distributor, claim_calldata(account, amounts[account], proofs[account]))
    assert replay["status"] == 0 and token_balance(chain, deployment.token, account) == amounts[account]
    assert token_balance(chain, deployment.token, deployment.distributor) == 0  # funded exactly the total


def test_wrong_amount_is_rejected(chain: Chain, deployment: Deployment, signer: Signer) -> None:
    amounts = payees(4)
    tree = build_tree(amounts)
    send(chain, signer, deployment.distributor, publish_calldata(1, tree.root, tree.total))
    account = next(iter(amounts))
    bad = send(
        chain, signer, deployment.distributor, claim_calldata(account, amounts[account] + 1, tree.proof(account))
    )
    assert bad["status"] == 0


def test_epochs_must_increase_and_totals_must_not_decrease(
    chain: Chain, deployment: Deployment, signer: Signer
) -> None:
    root = b"\x01" * 32
    assert send(chain, signer, deployment.distributor, publish_calldata(5, root, 100))["status"] == 1
    assert send(chain, signer, deployment.distributor, publish_calldata(5, root, 200))["status"] == 0
    assert send(chain, signer, deployment.distributor, publish_calldata(4, root, 200))["status"] == 0
    assert send(chain, signer, deployment.distributor, publish_calldata(6, root, 99))["status"] == 0
    assert Distributor(chain, deployment.distributor).state().epoch == 5


def test_only_the_settler_role_publishes_and_only_the_pauser_pauses(
    chain: Chain, deployment: Deployment, signer: Signer
) -> None:
    stranger = new_signer(chain)
    assert send(chain, stranger, deployment.distributor, publish_calldata(1, b"\x01" * 32, 0))["status"] == 0
    assert send(chain, stranger, deployment.distributor, call_data(deployment, chain, "pause"))["status"] == 0
    assert Distributor(chain, deployment.distributor).has_settler_role(signer.address)
    assert not Distributor(chain, deployment.distributor).has_settler_role(stranger.address)


def test_paused_distributor_refuses_claims_until_unpaused(chain: Chain, deployment: Deployment, signer: Signer) -> None:
    amounts = payees(2)
    tree = build_tree(amounts)
    send(chain, signer, deployment.distributor, publish_calldata(1, tree.root, tree.total))
    assert send(chain, signer, deployment.distributor, call_data(deployment, chain, "pause"))["status"] == 1
    account = next(iter(amounts))
    data = claim_calldata(account, amounts[account], tree.proof(account))
    assert send(chain, signer, deployment.distributor, data)["status"] == 0
    assert send(chain, signer, deployment.distributor, call_data(deployment, chain, "unpause"))["status"] == 1
    assert send(chain, signer, deployment.distributor, data)["status"] == 1


@pytest.mark.parametrize("n_payees", [4096])
def test_gas_of_a_steady_publication_and_a_repeat_claim(
    chain: Chain, deployment: Deployment, signer: Signer, n_payees: int
) -> None:
    first, second = payees(n_payees), payees(n_payees, salt=1)
    t1, t2 = build_tree(first), build_tree(second)
    send(chain, signer, deployment.distributor, publish_calldata(1, t1.root, t1.total))
    send(chain, signer, deployment.distributor, call_data(deployment, chain, "fund", t2.total))
    account = next(iter(first))
    send(chain, signer, deployment.distributor, claim_calldata(account, first[account], t1.proof(account)))
    publish = send(chain, signer, deployment.distributor, publish_calldata(2, t2.root, t2.total))
    repeat = send(chain, signer, deployment.distributor, claim_calldata(account, second[account], t2.proof(account)))
    assert publish["status"] == 1 and repeat["status"] == 1
    assert publish["gasUsed"] <= 40_000, publish["gasUsed"]
    assert repeat["gasUsed"] <= 65_000, repeat["gasUsed"]
