"""The settlement metrics the alerts and dashboards use move with what really happens on anvil.

``openledger_settlement_gas_spent_wei_total`` adds the receipts' gasUsed x effectiveGasPrice of each
confirmed root; ``openledger_settlement_publication_blocked`` is 1 while the settler refuses to
publish and back to 0 once it publishes again.
"""

from __future__ import annotations

from typing import Any

import psycopg

from openledger.settlement.chain.deploy import Deployment, deploy
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.metrics import BLOCK_REASONS, GAS_SPENT_WEI, PUBLICATION_BLOCKED

from .conftest import Signer, mine
from .test_settler_anvil import EPOCH_S, OWNER, POOL, settle, settler_for
from .usage import ingest, usage_event

DbConn = psycopg.Connection[Any]


def gas_spent(pool: str) -> int:
    return int(GAS_SPENT_WEI.labels(pool)._value.get())


def blocked(pool: str) -> dict[str, float]:
    return {reason: PUBLICATION_BLOCKED.labels(pool, reason)._value.get() for reason in BLOCK_REASONS}


def test_gas_spent_adds_the_receipts_of_the_confirmed_roots(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str, db_conn: DbConn
) -> None:
    before = gas_spent(POOL)
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(3)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
        ingest(settle_db, [usage_event(POOL, OWNER)])
        settle(settler, chain, now_s=3 * EPOCH_S + 1)
    hashes = [r[0] for r in db_conn.execute("SELECT tx_hash FROM settlement_txs WHERE state = 'confirmed'")]
    assert len(hashes) == 2  # one root per epoch
    receipts = [chain.w3.eth.get_transaction_receipt(h) for h in hashes]
    paid = sum(int(r["gasUsed"]) * int(r["effectiveGasPrice"]) for r in receipts)
    assert paid > 0
    assert gas_spent(POOL) - before == paid


def test_publication_blocked_is_set_while_the_settler_refuses_and_cleared_when_it_publishes(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(2)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
    assert set(blocked(POOL).values()) == {0}
    fresh = deploy(chain.w3, signer.key, token=deployment.token)
    ingest(settle_db, [usage_event(POOL, OWNER)])
    with settler_for(fresh, signer, settle_db, eth_rpc_url) as edited:  # spec.chain.distributorAddress edited
        status = edited.step(3 * EPOCH_S + 1)
        mine(chain)
    assert status.blocked_reason == "IdentityChanged"
    assert blocked(POOL) == {reason: float(reason == "IdentityChanged") for reason in BLOCK_REASONS}
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as back:  # the edit reverted
        settle(back, chain, now_s=3 * EPOCH_S + 1)
    assert set(blocked(POOL).values()) == {0}
