"""The transaction manager against a real anvil and PostgreSQL."""

from __future__ import annotations

import psycopg

from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import PUBLISH_GAS, Distributor, publish_calldata
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.chain.txmanager import TxManager

from .conftest import Signer, mine

ROOT = b"\x11" * 32


def publish(tm: TxManager, d: Deployment, epoch: int, total: int = 10**18) -> str:
    status = tm.submit(f"publish:test:{epoch}", d.distributor, publish_calldata(epoch, ROOT, total), PUBLISH_GAS)
    assert status.tx_hash is not None
    return status.tx_hash


def test_submitted_transaction_is_persisted_and_confirmed(
    txmanager: TxManager, deployment: Deployment, chain: Chain, db_conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    publish(txmanager, deployment, 1)
    row = db_conn.execute("SELECT nonce, state, length(raw_tx) FROM settlement_txs").fetchone()
    assert row is not None and row[2] > 100
    assert txmanager.step("publish:test:1").state == "pending"  # mined, 1 of 2 confirmations
    mine(chain)
    status = txmanager.wait("publish:test:1", timeout_s=10)
    assert status.state == "confirmed"
    assert Distributor(chain, deployment.distributor).state().epoch == 1


def test_submit_twice_for_one_intent_signs_once(txmanager: TxManager, deployment: Deployment) -> None:
    first = publish(txmanager, deployment, 1)
    assert publish(txmanager, deployment, 1) == first


def test_dropped_transaction_is_rebroadcast_with_the_same_nonce(
    txmanager: TxManager, deployment: Deployment, chain: Chain
) -> None:
    chain.rpc("evm_setAutomine", [False])
    tx_hash = publish(txmanager, deployment, 1)
    assert chain.in_pool(tx_hash)
    chain.rpc("anvil_dropTransaction", [tx_hash])
    assert not chain.in_pool(tx_hash)
    txmanager.step("publish:test:1")  # gone -> rebroadcast
    assert chain.in_pool(tx_hash)
    mine(chain, 2)
    assert txmanager.wait("publish:test:1", timeout_s=10).state == "confirmed"


def test_base_fee_spike_bumps_fees_by_at_least_ten_percent(
    txmanager: TxManager, deployment: Deployment, chain: Chain, db_conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    from openledger.settlement.metrics import FEE_BUMPS

    bumps_before = FEE_BUMPS._value.get()
    chain.rpc("evm_setAutomine", [False])
    tx_hash = publish(txmanager, deployment, 1)
    first_fee = int(db_conn.execute("SELECT max_fee_per_gas FROM settlement_txs").fetchone()[0])  # type: ignore[index]
    # The next block's base fee is far above what the transaction offers: it cannot be mined.
    chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(first_fee * 3)])
    mine(chain)
    assert chain.receipt(tx_hash) is None
    status = txmanager.step("publish:test:1")
    fees = [int(r[0]) for r in db_conn.execute("SELECT max_fee_per_gas FROM settlement_txs ORDER BY attempt")]
    assert len(fees) >= 2 and fees[1] >= fees[0] * 110 // 100
    assert FEE_BUMPS._value.get() >= bumps_before + 1
    mine(chain, 3)
    status = txmanager.wait("publish:test:1", timeout_s=20)
    assert status.state == "confirmed"
    assert Distributor(chain, deployment.distributor).state().epoch == 1


def test_reorg_that_removes_the_receipt_resubmits_and_confirms(
    txmanager: TxManager, deployment: Deployment, chain: Chain
) -> None:
    from openledger.settlement.metrics import REORGS

    reorgs_before = REORGS._value.get()
    tx_hash = publish(txmanager, deployment, 1)
    txmanager.step("publish:test:1")
    mined_in = chain.receipt(tx_hash)
    assert mined_in is not None
    # Replace the last block (the one holding our transaction) with an empty one.
    chain.rpc("anvil_reorg", [1, []])
    assert chain.receipt(tx_hash) is None or chain.receipt(tx_hash).block_hash != mined_in.block_hash  # type: ignore[union-attr]
    txmanager.step("publish:test:1")  # receipt gone: reorg recorded
    txmanager.step("publish:test:1")  # rebroadcast, mined again (automine)
    mine(chain, 2)
    status = txmanager.wait("publish:test:1", timeout_s=20)
    assert status.state == "confirmed"
    assert REORGS._value.get() >= reorgs_before + 1
    assert Distributor(chain, deployment.distributor).state().epoch == 1


def test_restart_after_broadcast_before_recording_waits_then_records(
    db_conn: psycopg.Connection[tuple[object, ...]],
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    policy: FeePolicy,
) -> None:
    chain.rpc("evm_setAutomine", [False])
    first = TxManager(db_conn, chain, signer.key, chain.chain_id(), policy)
    tx_hash = publish(first, deployment, 1)
    db_conn.execute("UPDATE settlement_txs SET state = 'signed'")  # as if we died before recording
    restarted = TxManager(db_conn, chain, signer.key, chain.chain_id(), policy)
    assert restarted.open_intents() == ["publish:test:1"]
    assert restarted.step("publish:test:1").detail == "broadcast"  # in the pool: wait, recorded
    mine(chain, 2)
    status = restarted.wait("publish:test:1", timeout_s=10)
    assert status.state == "confirmed" and status.tx_hash == tx_hash


def test_foreign_transaction_on_our_nonce_fails_the_family(
    txmanager: TxManager, deployment: Deployment, chain: Chain, signer: Signer
) -> None:
    from eth_account import Account

    chain.rpc("evm_setAutomine", [False])
    tx_hash = publish(txmanager, deployment, 1)
    chain.rpc("anvil_dropTransaction", [tx_hash])
    # Someone else with the same key sends a plain transfer on that nonce.
    nonce = chain.nonce(signer.address)
    tx = {
        "type": 2,
        "chainId": chain.chain_id(),
        "nonce": nonce,
        "to": signer.address,
        "value": 1,
        "gas": 21000,
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
    }
    chain.send_raw(bytes(Account.sign_transaction(tx, signer.key).raw_transaction))
    mine(chain)
    assert txmanager.step("publish:test:1").state == "failed"
    # A new family for the same intent gets the next nonce and goes through.
    chain.rpc("evm_setAutomine", [True])
    again = publish(txmanager, deployment, 1)
    assert again != tx_hash
    mine(chain)
    assert txmanager.wait("publish:test:1", timeout_s=10).state == "confirmed"
