"""Fixtures of the ledger tests: a fresh database and fresh stream names per test.

Event factories, a stream producer, and helpers that run the worker either in
this process (a thread, for fast behavioural tests) or as a real
``openledger ledger-worker`` process (for kill -9 and restart tests).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

from openledger.gateway.ids import uuid7
from openledger.local.processes import ManagedProcess, spawn
from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.worker import LedgerWorker, WorkerConfig
from openledger.wire import Contributor, Price, UsageEvent
from tests.databases import fresh_database

PRICE = Price(per_request=10**12, per_input_token=3 * 10**9 + 7, per_output_token=11 * 10**9 + 3)
PAYERS = [f"0x{i:040x}" for i in range(1, 6)]
OWNERS = ["0x" + "b" * 40, "0x" + "e" * 40]
CONTRIBUTORS = [Contributor("0x" + "c" * 40, 1500), Contributor("0x" + "d" * 40, 333, "fine-tune")]
POOLS = [("team-a/pool", 500), ("team-b/pool", 250), ("", 0)]


def make_event(i: int, rng: random.Random | None = None, **overrides: object) -> UsageEvent:
    rng = rng or random.Random(i)
    tin, tout = rng.randint(0, 4000), rng.randint(0, 2000)
    ok = rng.random() > 0.05
    pool, fee = POOLS[i % len(POOLS)]
    now_ms = int(time.time() * 1000)
    fields: dict[str, object] = dict(
        event_id=uuid7(),
        agent=f"team-a/agent-{i % 5}",
        payer=PAYERS[i % len(PAYERS)],
        model="team-a/llama",
        owner=OWNERS[i % len(OWNERS)],
        price=PRICE,
        input_tokens=tin,
        output_tokens=tout,
        cost=PRICE.cost(tin, tout) if ok else 0,
        outcome="ok" if ok else "upstream_error",
        started_at_ms=now_ms - 20,
        finished_at_ms=now_ms,
        contributors=tuple(CONTRIBUTORS[: i % 3]),
        pool=pool,
        fee_bps=fee,
    )
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def expected_balances(events: list[UsageEvent]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for e in events:
        contributors = [(c.account, c.share_bps) for c in e.contributors]
        for account, amount in sp.event_postings(e.cost, e.payer, e.owner, e.pool, e.fee_bps, contributors):
            totals[account] = totals.get(account, 0) + amount
    return {a: v for a, v in totals.items() if v}


@dataclass
class LedgerEnv:
    database_url: str
    redis_url: str
    stream: str
    dead_letter_stream: str
    group: str = "ledger"
    log_dir: Path = field(default_factory=Path)
    redis: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url)

    def produce(self, events: list[UsageEvent] | list[dict[str, str]], chunk: int = 2000) -> None:
        for start in range(0, len(events), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for e in events[start : start + chunk]:
                pipe.xadd(self.stream, e.to_entry() if isinstance(e, UsageEvent) else e)  # type: ignore[arg-type]
            pipe.execute()

    def config(self, **overrides: object) -> WorkerConfig:
        values: dict[str, object] = dict(
            database_url=self.database_url,
            redis_url=self.redis_url,
            stream=self.stream,
            group=self.group,
            dead_letter_stream=self.dead_letter_stream,
            claim_idle_ms=1000,
            claim_interval_s=0.2,
            block_ms=50,
            max_deliveries=3,
        )
        values.update(overrides)
        return WorkerConfig(**values)  # type: ignore[arg-type]

    def env(self, platform_env: dict[str, str], **extra: str) -> dict[str, str]:
        return {
            **platform_env,
            "DATABASE_URL": self.database_url,
            "OPENLEDGER_USAGE_STREAM": self.stream,
            "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": self.dead_letter_stream,
            "OPENLEDGER_USAGE_CONSUMER_GROUP": self.group,
            "OPENLEDGER_LEDGER_CLAIM_IDLE_MS": "1500",
            "OPENLEDGER_LEDGER_CLAIM_INTERVAL_S": "0.3",
            "OPENLEDGER_LEDGER_BLOCK_MS": "100",
            "OPENLEDGER_LEDGER_VERIFY_INTERVAL_S": "0",
            "OPENLEDGER_LEDGER_METRICS_PORT": "0",
            **extra,
        }

    def cli_env(self, **extra: str) -> dict[str, str]:
        """Environment for a ledger CLI command that needs only PostgreSQL and Redis."""
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "OPENLEDGER_USAGE_STREAM": self.stream,
            "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": self.dead_letter_stream,
            "OPENLEDGER_USAGE_CONSUMER_GROUP": self.group,
            **extra,
        }

    def spawn_worker(self, platform_env: dict[str, str], name: str, **extra: str) -> ManagedProcess:
        argv = [sys.executable, "-m", "openledger.cli", "ledger-worker"]
        return spawn(name, argv, self.log_dir / f"{name}.log", detached=False, env=self.env(platform_env, **extra))

    def count(self, sql: str = "SELECT count(*) FROM usage_events") -> int:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row else 0

    def balances(self) -> dict[str, int]:
        with psycopg.connect(self.database_url) as conn:
            return {str(a): int(b) for a, b in conn.execute("SELECT account, balance::text FROM account_balances")}

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

    def pending(self) -> int:
        try:
            info = self.redis.xpending(self.stream, self.group)
        except redis.ResponseError:
            return 0
        return int(info["pending"])


@pytest.fixture
def ledger_env(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[LedgerEnv]:
    with fresh_database(database_url, "ledger") as url:
        name = url.rsplit("/", 1)[1]
        env = LedgerEnv(url, redis_url, f"test:{name}:usage", f"test:{name}:dead", log_dir=tmp_path)
        try:
            yield env
        finally:
            env.redis.delete(env.stream, env.dead_letter_stream)
            env.redis.close()


class ThreadWorker:
    """A worker in this process (a thread), stopped in the fixture's finalizer."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = LedgerWorker(config)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-ledger-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def thread_worker(ledger_env: LedgerEnv) -> Iterator[Callable[..., ThreadWorker]]:
    started: list[ThreadWorker] = []

    def start(**overrides: object) -> ThreadWorker:
        worker = ThreadWorker(ledger_env.config(**overrides))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()
