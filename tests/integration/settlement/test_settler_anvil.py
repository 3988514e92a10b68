"""The settler end to end on anvil + PostgreSQL: epochs, one root per epoch, claims, the ledger."""

from __future__ import annotations

from typing import Any

import psycopg
from eth_account import Account
from web3 import Web3

from openledger.settlement import epochs as ep
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import Distributor, claim_calldata, claim_gas, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.settler import ChainSecrets, PoolConfig, Settler

from .conftest import Signer, mine, new_signer
from .usage import ingest, usage_event

DbConn = psycopg.Connection[Any]
POOL = "team-a/pool"
EPOCH_S = 100
OWNER = "0x" + "a1" * 20
DATA = "0x" + "b2" * 20


def settler_for(d: Deployment, signer: Signer, url: str, rpc: str, *, min_payout: int = 0) -> Settler:
    config = PoolConfig(
        pool=POOL,
        epoch_seconds=EPOCH_S,
        min_payout=min_payout,
        chain_id=d.chain_id,
        distributor=d.distributor,
        confirmations=2,
    )
    return Settler(config, ChainSecrets(rpc, signer.key), url, FeePolicy(stuck_after_s=2.0))


def settle(settler: Settler, chain: Chain, now_s: float, passes: int = 12) -> None:
    """Step the settler (mining blocks between passes) until nothing is in flight."""
    for _ in range(passes):
        status = settler.step(now_s)
        if status.lag_epochs == 0:
            return
        mine(chain)
    raise AssertionError(f"not settled after {passes} passes: {status}")


def claim(chain: Chain, d: Deployment, claimer: Signer, account: str, amount: int, proof: list[bytes]) -> int:
    """Submit a claim from ``claimer``; returns the receipt status (1 ok, 0 reverted)."""
    w3 = chain.w3
    tx = {
        "type": 2,
        "chainId": d.chain_id,
        "nonce": chain.nonce(claimer.address, "pending"),
        "to": Web3.to_checksum_address(d.distributor),
        "data": claim_calldata(account, amount, proof),
        "gas": claim_gas(len(proof)),
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
        "value": 0,
    }
    tx_hash = w3.eth.send_raw_transaction(Account.sign_transaction(tx, claimer.key).raw_transaction)
    return int(w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)["status"])


def test_epochs_settle_with_one_transaction_each_and_claims_pay_the_ledger_amounts(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    payees = [("0x" + f"{i:040x}", 1000) for i in range(1, 6)]
    ingest(settle_db, [usage_event(POOL, OWNER, ((DATA, 1500),)) for _ in range(20)])
    ingest(settle_db, [usage_event(POOL, "0x" + f"{i:040x}", ()) for i, _ in enumerate(payees, 1)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)  # closes and settles epoch 1
        status = settler.step(2 * EPOCH_S + 1)
        assert status.last_settled_epoch == 1 and status.pending_amount == 0 and status.lag_epochs == 0
        txs = db_conn.execute("SELECT count(DISTINCT nonce) FROM settlement_txs").fetchone()
        assert txs is not None and txs[0] == 1  # one transaction for 7 payees

        # More usage, next epoch: a second root, cumulative.
        ingest(settle_db, [usage_event(POOL, OWNER, ((DATA, 1500),)) for _ in range(5)])
        settle(settler, chain, now_s=3 * EPOCH_S + 1)
        status = settler.step(3 * EPOCH_S + 1)
        assert status.last_settled_epoch == 2
        state = Distributor(chain, deployment.distributor).state()
        assert state.epoch == 2 and "0x" + state.root.hex() == status.last_root
        assert state.cumulative_total == status.settled_total

        # Every payee claims with the served proof; amounts equal the ledger to the base unit.
        claimer = new_signer(chain)
        earned = db_conn.execute(
            "SELECT account, amount::text FROM settlement_payouts WHERE pool = %s AND epoch = 2", (POOL,)
        ).fetchall()
        assert len(earned) == 7
        for account, amount_text in earned:
            amount, proof = ep.proof_of(db_conn, POOL, 2, account)  # type: ignore[misc]
            assert claim(chain, deployment, claimer, account, amount, proof) == 1
            assert token_balance(chain, deployment.token, account) == int(amount_text)
        # A replayed claim pays nothing (it reverts: nothing to claim).
        account, amount_text = earned[0]
        amount, proof = ep.proof_of(db_conn, POOL, 2, account)  # type: ignore[misc]
        assert claim(chain, deployment, claimer, account, amount, proof) == 0
        assert token_balance(chain, deployment.token, account) == int(amount_text)

        # The ledger: payee balances are 0 (all in a confirmed root), the distributor account holds the total.
        ledger_total = db_conn.execute(
            "SELECT balance::text FROM account_balances WHERE account = %s", (ep.distributor_account(POOL),)
        ).fetchone()
        assert ledger_total is not None and int(ledger_total[0]) == state.cumulative_total
        on_chain_claimed = sum(Distributor(chain, deployment.distributor).claimed(a) for a, _ in earned)
        assert on_chain_claimed == state.cumulative_total
        unpaid = db_conn.execute(
            "SELECT coalesce(sum(balance), 0)::text FROM account_balances"
            " WHERE account LIKE 'owner:%' OR account LIKE 'contributor:%'"
        ).fetchone()
        assert unpaid is not None and int(unpaid[0]) == 0
        # The ledger's own checks accept the closing entries (balanced, caches right, no drift).
        from openledger.settlement.ledger.verify import verify

        report = verify(db_conn, full=True)
        assert report.ok, [str(d) for d in report.drifts]


def test_min_payout_rolls_small_amounts_over_until_they_add_up(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    one_event = usage_event(POOL, OWNER).cost * 95 // 100  # owner's share of one event (5 % fee)
    with settler_for(deployment, signer, settle_db, eth_rpc_url, min_payout=one_event * 3) as settler:
        ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(2)])
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
        assert ep.payouts_of(db_conn, POOL, 1) == {}
        assert settler.step(2 * EPOCH_S + 1).pending_amount == 2 * one_event
        ingest(settle_db, [usage_event(POOL, OWNER)])
        settle(settler, chain, now_s=3 * EPOCH_S + 1)
        assert ep.payouts_of(db_conn, POOL, 2) == {OWNER: 3 * one_event}
        assert Distributor(chain, deployment.distributor).state().cumulative_total == 3 * one_event


def test_epoch_without_new_earnings_needs_no_transaction(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
        settle(settler, chain, now_s=3 * EPOCH_S + 1)
        assert settler.step(3 * EPOCH_S + 1).last_settled_epoch == 2
        count = db_conn.execute("SELECT count(*) FROM settlement_txs").fetchone()
        assert count is not None and count[0] == 1


def test_publication_that_would_revert_is_blocked_not_sent(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    from openledger.settlement.chain.deploy import deploy

    poor = new_signer(chain)  # the settler role, but no tokens and no allowance to fund the root
    d = deploy(chain.w3, signer.key, token=deployment.token, settler=poor.address)
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(d, poor, settle_db, eth_rpc_url) as settler:
        status = settler.step(2 * EPOCH_S + 1)
        assert status.chain_reachable and status.lag_epochs == 1
        assert "reverted" in status.blocked_message
        assert any(reason == "PublicationBlocked" for _, reason, _ in status.events)
        sent = db_conn.execute("SELECT count(*) FROM settlement_txs").fetchone()
        assert sent is not None and sent[0] == 0


def test_a_second_settler_for_the_same_pool_stands_by_while_a_pass_holds_the_pool(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as first:
        first.step(2 * EPOCH_S + 1)
        # Another settler in the middle of a pass holds the pool's advisory lock on its connection.
        with psycopg.connect(settle_db, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"settler:{POOL}",))
            standby = first.step(3 * EPOCH_S + 1)
            assert "another settler" in standby.chain_message
            assert ep.get_epoch(db_conn, POOL, 2) is None  # it closed nothing
            # Released explicitly: closing the session frees it too, but PostgreSQL ends a session asynchronously.
            other.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"settler:{POOL}",))
        # The lock is per pass, not per process: once released, the pool settles on.
        assert first.step(3 * EPOCH_S + 1).current_epoch == 3
        assert ep.get_epoch(db_conn, POOL, 2) is not None


def test_reorg_of_the_publication_before_confirmation_resubmits_and_pays_once(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(3)])
    config = PoolConfig(
        pool=POOL,
        epoch_seconds=EPOCH_S,
        min_payout=0,
        chain_id=deployment.chain_id,
        distributor=deployment.distributor,
        confirmations=3,
    )
    with Settler(config, ChainSecrets(eth_rpc_url, signer.key), settle_db, FeePolicy(stuck_after_s=2.0)) as settler:
        settler.step(2 * EPOCH_S + 1)  # closes epoch 1, publishes (automine: mined at once)
        settler.step(2 * EPOCH_S + 1)  # records the receipt
        tx = db_conn.execute("SELECT tx_hash, block_hash FROM settlement_txs").fetchone()
        assert tx is not None and tx[1] is not None
        chain.rpc("anvil_reorg", [1, []])  # the block with the publication is replaced
        assert Distributor(chain, deployment.distributor).state().epoch == 0
        settle(settler, chain, now_s=2 * EPOCH_S + 1, passes=20)
        status = settler.step(2 * EPOCH_S + 1)
        state = Distributor(chain, deployment.distributor).state()
        assert status.last_settled_epoch == 1 and state.epoch == 1
        assert state.funded == state.cumulative_total == status.settled_total  # funded once
        closing = db_conn.execute("SELECT count(*) FROM journal_entries WHERE kind = 'transfer'").fetchone()
        assert closing is not None and closing[0] == 1
