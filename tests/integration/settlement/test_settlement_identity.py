"""Settlement state belongs to one chain identity: no edit or re-creation makes a contract pay twice.

Each test settles a pool on one distributor (claims paid), then points the same
pool's settler at something else — another distributor, another epoch length, a
distributor another pool uses — and checks that nothing is published there: the
cumulative history a contract already paid is never published to another one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg

from openledger.settlement import epochs as ep
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.deploy import Deployment, deploy
from openledger.settlement.chain.distributor import Distributor, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.ledger.verify import verify
from openledger.settlement.settler import ChainSecrets, PoolConfig, Settler

from .conftest import Signer, mine, new_signer
from .test_settler_anvil import EPOCH_S, OWNER, POOL, claim, settle, settler_for
from .usage import ingest, usage_event

DbConn = psycopg.Connection[Any]


def settle_first_contract_and_claim(
    settle_db: str, d: Deployment, chain: Chain, signer: Signer, rpc: str, db_conn: DbConn
) -> int:
    """Epoch 1 settled on ``d`` and the owner's claim paid; returns what the contract paid."""
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(3)])
    with settler_for(d, signer, settle_db, rpc) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
    amount, proof = ep.proof_of(db_conn, POOL, 1, OWNER)  # type: ignore[misc]
    assert claim(chain, d, new_signer(chain), OWNER, amount, proof) == 1
    return int(amount)


def untouched(chain: Chain, d: Deployment) -> bool:
    state = Distributor(chain, d.distributor).state()
    return state.epoch == 0 and state.cumulative_total == 0 and token_balance(chain, d.token, d.distributor) == 0


def test_editing_the_distributor_never_republishes_the_paid_history(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    paid = settle_first_contract_and_claim(settle_db, deployment, chain, signer, eth_rpc_url, db_conn)
    fresh = deploy(chain.w3, signer.key, token=deployment.token)
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(fresh, signer, settle_db, eth_rpc_url) as edited:  # spec.chain.distributorAddress edited
        for now_s in (3 * EPOCH_S + 1, 3 * EPOCH_S + 2, 4 * EPOCH_S + 1):
            status = edited.step(now_s)
            mine(chain)
    assert status.blocked_reason == "IdentityChanged", status
    assert "spec.chain.distributorAddress" in status.blocked_message and "new RewardPool" in status.blocked_message
    assert untouched(chain, fresh)  # the owner cannot claim its `paid` a second time there
    assert token_balance(chain, deployment.token, OWNER) == paid
    # Back on its own contract, the pool settles on, cumulatively (the new usage only is new money).
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as back:
        settle(back, chain, now_s=4 * EPOCH_S + 1)
        status = back.step(4 * EPOCH_S + 1)
    assert status.blocked_reason == "" and status.last_settled_epoch == 3
    assert Distributor(chain, deployment.distributor).state().cumulative_total == status.settled_total > paid


def test_a_pool_whose_identity_row_is_missing_still_refuses_a_contract_that_did_not_pay_its_history(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    # As after a re-created pool on a ledger upgraded from before identities were recorded.
    settle_first_contract_and_claim(settle_db, deployment, chain, signer, eth_rpc_url, db_conn)
    db_conn.execute("DELETE FROM settlement_pools WHERE pool = %s", (POOL,))
    fresh = deploy(chain.w3, signer.key, token=deployment.token)
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(fresh, signer, settle_db, eth_rpc_url) as recreated:
        status = recreated.step(3 * EPOCH_S + 1)
        mine(chain)
        status = recreated.step(3 * EPOCH_S + 2)
    assert status.blocked_reason == "ContractStateMismatch", status
    assert untouched(chain, fresh)


def test_two_pools_never_share_a_distributor(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    settle_first_contract_and_claim(settle_db, deployment, chain, signer, eth_rpc_url, db_conn)
    root = Distributor(chain, deployment.distributor).state().root
    other = "team-b/pool"
    ingest(settle_db, [usage_event(other, "0x" + "c3" * 20) for _ in range(2)])
    config = PoolConfig(pool=other, epoch_seconds=EPOCH_S, min_payout=0, chain_id=deployment.chain_id,
                        distributor=deployment.distributor.lower())  # fmt: skip
    with Settler(config, ChainSecrets(eth_rpc_url, signer.key), settle_db, FeePolicy(stuck_after_s=2.0)) as second:
        status = second.step(3 * EPOCH_S + 1)
    assert status.blocked_reason == "DistributorInUse" and POOL in status.blocked_message
    assert Distributor(chain, deployment.distributor).state().root == root
    assert ep.latest_epoch(db_conn, other, (ep.CLOSED, ep.SETTLED)) is None  # nothing closed under it either


def test_changing_epoch_seconds_is_refused_not_reported_up_to_date(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    settle_first_contract_and_claim(settle_db, deployment, chain, signer, eth_rpc_url, db_conn)
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settler.config = replace(settler.config, epoch_seconds=EPOCH_S * 10)  # epoch numbers would go backwards
        status = settler.step(3 * EPOCH_S + 1)
    assert status.blocked_reason == "IdentityChanged" and "spec.epochSeconds: 100 -> 1000" in status.blocked_message


def test_ledger_verify_checks_each_distributor_against_the_ledger(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    settle_first_contract_and_claim(settle_db, deployment, chain, signer, eth_rpc_url, db_conn)
    report = verify(db_conn, full=False, rpc_url=eth_rpc_url)
    assert report.ok, [str(d) for d in report.drifts]
    assert report.stats["chain_pools_checked"] == 1
    # Drift: the ledger's record points at a contract that paid something else (here: nothing at all).
    fresh = deploy(chain.w3, signer.key, token=deployment.token)
    db_conn.execute("UPDATE settlement_pools SET distributor = %s WHERE pool = %s", (fresh.distributor.lower(), POOL))
    report = verify(db_conn, full=False, rpc_url=eth_rpc_url)
    assert [d.check for d in report.drifts] == ["chain_cumulative", "chain_funded"]  # it holds and paid nothing
    assert POOL in report.drifts[0].where
    # A pool recorded on another chain id is skipped, not compared with this chain's contracts.
    db_conn.execute("UPDATE settlement_pools SET chain_id = 1 WHERE pool = %s", (POOL,))
    report = verify(db_conn, full=False, rpc_url=eth_rpc_url)
    assert report.ok and report.stats["chain_pools_other_chain"] == 1


def test_ledger_verify_is_not_fooled_by_an_epoch_settled_while_it_reads(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn,
    monkeypatch: Any,
) -> None:  # fmt: skip
    """A settler that confirms a root and commits it to the ledger between verify's snapshot and its read
    of the contract is a race, not drift (the walkthrough's ``kill -9`` test saw it on the node)."""
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(3)])
    real_state = Distributor.state
    moved: list[int] = []
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)  # epoch 1: on chain and in the ledger
        ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(4)])

        def settle_next_epoch_then_state(self: Distributor) -> Any:
            if not moved:  # verify's snapshot is taken: epoch 2 is now confirmed on chain and committed
                moved.append(0)  # the settler's own reads of the contract pass straight through
                settle(settler, chain, now_s=3 * EPOCH_S + 1)
                moved[0] = real_state(self).epoch
            return real_state(self)

        monkeypatch.setattr(Distributor, "state", settle_next_epoch_then_state)
        report = verify(db_conn, full=False, rpc_url=eth_rpc_url)
    assert moved == [2]
    assert report.ok, [str(d) for d in report.drifts]
    assert (report.stats["chain_pools_checked"], report.stats["chain_pools_in_flight"]) == (1, 0)
