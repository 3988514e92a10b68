"""``-o json|yaml`` on the ledger's read commands, on a real ledger holding amounts past 2**53."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from openledger.settlement import epochs as ep
from openledger.settlement.ledger import split as sp
from openledger.wire import Price
from tests.databases import fresh_database
from tests.integration.ledger.conftest import OWNERS, LedgerEnv, ThreadWorker, expected_balances, make_event

BIG_PRICE = Price(per_request=10**24 + 3)  # one request costs a million tokens of 18 decimals, plus 3 base units


@pytest.fixture
def ledger(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[LedgerEnv, dict[str, int]]]:
    with fresh_database(database_url, "output") as url:
        name = url.rsplit("/", 1)[1]
        env = LedgerEnv(url, redis_url, f"test:{name}:usage", f"test:{name}:dead", log_dir=tmp_path)
        events = [
            make_event(i, price=BIG_PRICE, cost=BIG_PRICE.per_request, input_tokens=0, output_tokens=0, outcome="ok",
                       agent="team-a/agent-0")
            for i in range(3)
        ]  # fmt: skip
        worker = ThreadWorker(env.config())
        try:
            env.produce(events)
            env.wait_for(lambda: env.count() == 3, 30, "the worker to ingest the events")
        finally:
            worker.close()
            env.redis.delete(env.stream, env.dead_letter_stream)
            env.redis.close()
        yield env, expected_balances(events)


def _cli(env: LedgerEnv, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "openledger.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env.cli_env())


def test_balance_trace_spend_and_verify_as_json_keep_amounts_exact(ledger: tuple[LedgerEnv, dict[str, int]]) -> None:
    env, balances = ledger
    account, amount = max(balances.items(), key=lambda item: item[1])
    assert amount > 2**53

    balance = _cli(env, "ledger", "balance", account, "-o", "json")
    assert balance.returncode == 0, balance.stderr
    assert json.loads(balance.stdout)["accounts"] == [
        {
            "account": account,
            "balance": str(amount),
            "decimal": f"{amount // 10**18}.{amount % 10**18:018d}".rstrip("0"),
        }
    ]

    trace = json.loads(_cli(env, "ledger", "trace", account, "--events", "-o", "json").stdout)
    (traced,) = trace["accounts"]
    assert traced["balance"] == str(amount)
    assert traced["entries"][-1]["running_balance"] == str(amount)
    assert sum(int(e["amount"]) for e in traced["entries"]) == amount
    assert all(isinstance(line["cost"], str) for e in traced["entries"] for line in e["event_lines"])

    spend = yaml.safe_load(_cli(env, "ledger", "spend", "team-a/agent-0", "-o", "yaml").stdout)
    assert spend == {"agent": "team-a/agent-0", "period": "Day", "spent": str(3 * BIG_PRICE.per_request)}

    verify = _cli(env, "ledger", "verify", "--no-chain", "--no-stream", "-o", "json")
    assert verify.returncode == 0, verify.stdout
    report = json.loads(verify.stdout)
    assert report["ok"] is True and report["drifts"] == [] and report["stats"]["events"] == 3


def test_table_output_is_unchanged_by_default(ledger: tuple[LedgerEnv, dict[str, int]]) -> None:
    env, balances = ledger
    account, amount = max(balances.items(), key=lambda item: item[1])
    balance = _cli(env, "ledger", "balance", account)
    assert balance.stdout.startswith(f"{account}\t{amount} (")
    assert _cli(env, "ledger", "spend", "team-a/agent-0").stdout.strip() == str(3 * BIG_PRICE.per_request)


def test_claim_prints_yaml_and_table_with_the_amount_exact(ledger: tuple[LedgerEnv, dict[str, int]]) -> None:
    env, _ = ledger
    pool, owner = "team-a/pool", OWNERS[0]
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        ep.close_epoch(conn, pool, 1, 0)
        ep.commit_settlement(conn, pool, 1, None)
    # Only event 0 is team-a/pool's (fee 500 bps, no contributors): its owner earned the cost less the fee.
    earned = dict(sp.event_postings(BIG_PRICE.per_request, "0x" + "1" * 40, owner, pool, 500, []))[f"owner:{owner}"]

    as_yaml = _cli(env, "claim", owner, "--pool", pool, "-o", "yaml")
    as_json = _cli(env, "claim", owner, "--pool", pool)
    table = _cli(env, "claim", owner, "--pool", pool, "-o", "table")

    claim = yaml.safe_load(as_yaml.stdout)
    assert claim == json.loads(as_json.stdout)  # JSON stays the default
    assert claim["amount"] == str(earned) and earned > 2**53 and claim["epoch"] == 1
    assert f"amount\t{earned}" in table.stdout.splitlines()
    assert f"proof\t{len(claim['proof'])} sibling(s)" in table.stdout
