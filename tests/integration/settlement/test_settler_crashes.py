"""A real settler process killed at each step pays exactly once after it is restarted."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psycopg
import pytest

from openledger.local.processes import ManagedProcess, pid_alive, spawn
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import Distributor, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.crash import CRASH_ENV, CRASH_EXIT_STATUS, CRASH_STEPS
from openledger.settlement.ledger.verify import verify

from .conftest import Signer, mine
from .usage import ingest, usage_event

POOL = "crash/pool"
OWNER = "0x" + "c1" * 20
DATA = "0x" + "d2" * 20
EPOCH_S = 100
NOW_S = 2 * EPOCH_S + 1  # epoch 1 is due


def start_settler(
    tmp_path: Path, url: str, rpc: str, d: Deployment, signer: Signer, crash_at: str | None, run: int
) -> ManagedProcess:
    env = {"DATABASE_URL": url, "ETH_RPC_URL": rpc, "OPENLEDGER_SIGNER_KEY": signer.key, CRASH_ENV: crash_at or ""}
    argv = [
        sys.executable,
        "-m",
        "openledger.cli",
        "settler",
        "run",
        "--pool",
        POOL,
        "--epoch-seconds",
        str(EPOCH_S),
        "--chain-id",
        str(d.chain_id),
        "--distributor",
        d.distributor,
        "--confirmations",
        "2",
        "--interval-s",
        "0.1",
        "--now-s",
        str(NOW_S),
    ]
    return spawn(f"settler-{run}", argv, tmp_path / f"settler-{run}.log", detached=False, env=env)


def exit_status(process: ManagedProcess, chain: Chain, timeout_s: float) -> int | None:
    """Wait for the process to exit, mining a block now and then (confirmations need blocks)."""
    import os

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == process.pid:
            return os.waitstatus_to_exitcode(status)
        mine(chain)
        time.sleep(0.3)
    return None


def settled(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status FROM epochs WHERE pool = %s AND epoch = 1", (POOL,)).fetchone()
    return row is not None and row[0] == "settled"


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_settler_killed_at_each_step_pays_exactly_once(
    step: str, tmp_path: Path, settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER, ((DATA, 2000),)) for _ in range(10)])
    balance_before = token_balance(chain, deployment.token, signer.address)

    first = start_settler(tmp_path, settle_db, eth_rpc_url, deployment, signer, step, 1)
    try:
        code = exit_status(first, chain, timeout_s=60)
        assert code == CRASH_EXIT_STATUS, (
            f"settler did not crash at {step}: {code}\n{(tmp_path / 'settler-1.log').read_text()[-3000:]}"
        )
    finally:
        first.stop()
    assert not settled(settle_db)

    second = start_settler(tmp_path, settle_db, eth_rpc_url, deployment, signer, None, 2)
    try:
        deadline = time.monotonic() + 60
        while not settled(settle_db) and time.monotonic() < deadline:
            assert pid_alive(second.pid), (tmp_path / "settler-2.log").read_text()[-3000:]
            mine(chain)
            time.sleep(0.3)
        assert settled(settle_db), (tmp_path / "settler-2.log").read_text()[-3000:]
    finally:
        second.stop()

    state = Distributor(chain, deployment.distributor).state()
    with psycopg.connect(settle_db) as conn:
        total = conn.execute("SELECT total::text FROM epochs WHERE pool = %s AND epoch = 1", (POOL,)).fetchone()
        ok_txs = conn.execute("SELECT count(*) FROM settlement_txs WHERE receipt_status = 1").fetchone()
        closing = conn.execute("SELECT count(*) FROM journal_entries WHERE kind = 'transfer'").fetchone()
    with psycopg.connect(settle_db, autocommit=True) as conn:
        report = verify(conn, full=True)
    assert report.ok, [str(d) for d in report.drifts]
    assert total is not None and ok_txs is not None and closing is not None
    assert state.epoch == 1 and state.cumulative_total == int(total[0])
    # Funded once: the settler paid exactly the epoch's total, one publication, one closing entry.
    assert state.funded == int(total[0])
    assert token_balance(chain, deployment.token, signer.address) == balance_before - int(total[0])
    assert ok_txs[0] == 1 and closing[0] == 1
