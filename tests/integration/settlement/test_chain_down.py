"""The chain goes away for a while: closing goes on, the backlog shows, settlement catches up."""

from __future__ import annotations

from typing import Any

import psycopg

from openledger.local.platform import LocalPlatform
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import Distributor
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.metrics import CHAIN_ERRORS

from .conftest import Signer, mine
from .test_settler_anvil import EPOCH_S, OWNER, POOL, settle, settler_for
from .usage import ingest, usage_event

DbConn = psycopg.Connection[Any]


def chain_errors() -> float:
    return sum(s.value for m in CHAIN_ERRORS.collect() for s in m.samples if s.name.endswith("_total"))


def test_chain_down_grows_the_backlog_then_one_transaction_catches_up(
    local_platform: LocalPlatform,
    settle_db: str,
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    eth_rpc_url: str,
    db_conn: DbConn,
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(3)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
        saved = chain.rpc("anvil_dumpState", [])
        errors_before = chain_errors()
        local_platform.stop_component("anvil")
        try:
            ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(2)])
            down = settler.step(3 * EPOCH_S + 1)
            assert not down.chain_reachable and "chain RPC" in down.chain_message
            assert down.lag_epochs == 1 and down.pending_amount > 0 and down.last_settled_epoch == 1
            ingest(settle_db, [usage_event(POOL, OWNER)])
            down = settler.step(4 * EPOCH_S + 1)
            assert down.lag_epochs == 2 and down.current_epoch == 4
            assert chain_errors() > errors_before
        finally:
            local_platform.restart_component("anvil")
            chain.rpc("anvil_loadState", [saved])
        settle(settler, chain, now_s=4 * EPOCH_S + 1)
        status = settler.step(4 * EPOCH_S + 1)
        assert status.chain_reachable and status.lag_epochs == 0 and status.pending_amount == 0
        assert status.last_settled_epoch == 3
        state = Distributor(chain, deployment.distributor).state()
        assert state.epoch == 3 and state.cumulative_total == status.settled_total
        # Epoch 2 was covered by epoch 3's cumulative root: two publications in all.
        published = db_conn.execute("SELECT count(DISTINCT intent) FROM settlement_txs").fetchone()
        superseded = db_conn.execute("SELECT status FROM epochs WHERE pool = %s AND epoch = 2", (POOL,)).fetchone()
        assert published is not None and published[0] == 2
        assert superseded is not None and superseded[0] == "superseded"
    mine(chain)
