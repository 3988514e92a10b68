"""The settler and PostgreSQL: bounded connections for any number of pools, and recovery after a restart."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from openledger.controllers import rewardpool_builder as rb
from openledger.local.platform import LocalPlatform
from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.connections import ConnectionPool, PoolBusy
from openledger.settlement.metrics import DATABASE_UP
from openledger.settlement.settler import ChainSecrets, PoolConfig, Settler

from .conftest import Signer
from .test_settler_anvil import EPOCH_S, OWNER, POOL, settle
from .usage import ingest, usage_event

POOL_SIZE = 3
POOLS = 100


def database_up(pool: str) -> float:
    return float(DATABASE_UP.labels(pool)._value.get())


def test_postgres_restart_degrades_the_pool_then_the_settler_reconnects_and_settles(
    local_platform: LocalPlatform,
    settle_db: str,
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    eth_rpc_url: str,
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER) for _ in range(2)])
    config = PoolConfig(pool=POOL, epoch_seconds=EPOCH_S, min_payout=0, chain_id=deployment.chain_id,
                        distributor=deployment.distributor, token=deployment.token)  # fmt: skip
    db = ConnectionPool(settle_db, max_size=2, acquire_timeout_s=5)
    settler = Settler(config, ChainSecrets(eth_rpc_url, signer.key), db, FeePolicy(stuck_after_s=2.0))
    try:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
        assert database_up(POOL) == 1
        local_platform.stop_component("postgres")
        try:
            down = settler.step(3 * EPOCH_S + 1)
            assert not down.database_available and down.blocked_reason == "DatabaseUnavailable"
            assert database_up(POOL) == 0
            doc = rb.pool_status(None, generation=1, models=1, paused=False, epoch_seconds=EPOCH_S, settled=down)
            settled_cond = next(c for c in doc["conditions"] if c["type"] == "Settled")
            assert doc["phase"] == "Degraded" and settled_cond["reason"] == "DatabaseUnavailable"
            assert settled_cond["status"] == "False"
        finally:
            local_platform.restart_component("postgres")
        # The same settler object (as the operator caches it) comes back by itself and settles the next epoch.
        ingest(settle_db, [usage_event(POOL, OWNER)])
        settle(settler, chain, now_s=3 * EPOCH_S + 1)
        status = settler.step(3 * EPOCH_S + 1)
        assert status.database_available and status.last_settled_epoch == 2 and status.pending_amount == 0
        assert database_up(POOL) == 1
        # The advisory lock was re-taken on the new connection and released after the pass.
        with psycopg.connect(settle_db, autocommit=True) as conn:
            held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
        assert held is not None and held[0] == 0
    finally:
        settler.close()
        db.close()


def test_a_hundred_pools_share_a_bounded_number_of_connections(settle_db: str, eth_rpc_url: str) -> None:
    db = ConnectionPool(settle_db, max_size=POOL_SIZE, acquire_timeout_s=60)
    secrets = ChainSecrets(eth_rpc_url, "0x" + "11" * 32)
    settlers = [
        Settler(
            PoolConfig(
                pool=f"ns/pool-{i}",
                epoch_seconds=EPOCH_S,
                min_payout=0,
                chain_id=31337,
                distributor=f"0x{i + 1:040x}",
                token="0x" + "01" * 20,
            ),
            secrets,
            db,
        )
        for i in range(POOLS)
    ]
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(settle_db, autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'openledger-settler' AND datname = current_database()"
                ).fetchone()
                peak = max(peak, int(row[0]) if row else 0)
                time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=16) as workers:  # the operator runs passes in worker threads
            statuses = list(workers.map(lambda s: s.step(2 * EPOCH_S + 1), settlers))
    finally:
        done.set()
        sampler.join()
        db.close()
    took_s = time.perf_counter() - started
    assert all(s.database_available and s.last_settled_epoch == 1 for s in statuses), statuses[:3]
    assert db.peak_open <= POOL_SIZE and 1 <= peak <= POOL_SIZE, (db.peak_open, peak)
    print(f"{POOLS} pools, pool size {POOL_SIZE}: peak {peak} connections, {took_s:.2f} s for one pass of each")


def test_a_busy_connection_pool_is_not_reported_as_postgres_down(settle_db: str) -> None:
    """Every connection lent for the whole wait: the pass is refused, PostgreSQL is not declared down."""
    pool = ConnectionPool(settle_db, max_size=1, acquire_timeout_s=0.2)
    try:
        with pool.connection() as held:
            held.execute("SELECT 1")
            with pytest.raises(PoolBusy, match="all 1 in use"), pool.connection():
                pass
        with pool.connection() as again:  # given back: lent again at once
            assert again.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()
