"""Failures mid-flight, with the worker as a real process: kill -9, several workers, PostgreSQL restarts.

After each: every event exactly once, exact balances, nothing pending, and
``ledger verify`` (stream reconciliation included) finds no drift.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.request

import psycopg

from openledger.local.platform import Endpoints, LocalPlatform
from openledger.local.processes import ManagedProcess, free_port, spawn, tail, wait_ready
from openledger.local.product import PRODUCT_PROCESSES, ProductProcess
from openledger.settlement.ledger.verify import verify
from openledger.wire import UsageEvent
from tests.databases import fresh_database

from .conftest import LedgerEnv, expected_balances, make_event


def assert_exactly_once(env: LedgerEnv, events: list[UsageEvent]) -> None:
    assert env.count() == len({e.event_id for e in events})
    assert env.count("SELECT count(*) FROM usage_quarantine") == 0
    assert env.balances() == expected_balances(events)
    assert env.pending() == 0
    with psycopg.connect(env.database_url) as conn:
        report = verify(conn, redis_url=env.redis_url, stream=env.stream, group=env.group,
                        dead_letter_stream=env.dead_letter_stream)  # fmt: skip
        total = conn.execute("SELECT coalesce(sum(cost), 0)::text FROM usage_events").fetchone()
    assert [str(d) for d in report.drifts] == []
    assert report.stats["stream_missing"] == 0
    assert total is not None and int(total[0]) == sum(e.cost for e in events)


def wait_all(env: LedgerEnv, n: int, workers: list[ManagedProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if env.count() >= n and env.pending() == 0:
            return
        for w in workers:
            assert w.alive(), f"worker {w.name} died:\n{tail(w.log_path, 30)}"
        time.sleep(0.2)
    raise AssertionError(f"only {env.count()} of {n} events after {timeout_s} s; pending {env.pending()}")


def test_kill_9_at_random_moments_while_50000_events_are_ingested(
    ledger_env: LedgerEnv, platform_env: dict[str, str]
) -> None:
    rng = random.Random(20261125)
    events = [make_event(i, rng) for i in range(50_000)]
    # The producer keeps adding while the worker is killed and restarted.
    producer = threading.Thread(target=lambda: [ledger_env.produce(events[s : s + 2500]) or time.sleep(0.4)
                                                for s in range(0, len(events), 2500)])  # fmt: skip
    producer.start()
    env = {"OPENLEDGER_LEDGER_BATCH_SIZE": "1500"}
    worker = ledger_env.spawn_worker(platform_env, "ledger-worker-0", **env)
    stored_at_kill: list[int] = []
    pending_at_kill: list[int] = []  # delivered to the killed worker, never acknowledged
    logs = []
    try:
        for i in range(1, 6):
            # Kill at a random moment after this worker has committed something of its own.
            before = ledger_env.count()
            ledger_env.wait_for(lambda b=before: ledger_env.count() > b, 60, "the new worker's first commit")
            time.sleep(rng.uniform(0.0, 0.6))
            worker.stop_signal = signal.SIGKILL
            worker.stop(timeout_s=5)
            stored_at_kill.append(ledger_env.count())
            pending_at_kill.append(ledger_env.pending())
            logs.append(worker.log_path)
            worker = ledger_env.spawn_worker(platform_env, f"ledger-worker-{i}", **env)
        producer.join(60)
        wait_all(ledger_env, len(events), [worker], 120)
        logs.append(worker.log_path)
    finally:
        worker.stop()
        producer.join(60)
    # The kills landed while events were flowing, and later workers took over the dead ones' entries.
    assert sum(0 < n < len(events) for n in stored_at_kill) >= 3, stored_at_kill
    if any(pending_at_kill):
        assert any("reclaimed pending entries" in path.read_text() for path in logs), pending_at_kill
    assert_exactly_once(ledger_env, events)


def test_kill_between_commit_and_xack_redelivers_as_a_no_op(
    ledger_env: LedgerEnv, platform_env: dict[str, str]
) -> None:
    events = [make_event(i) for i in range(300)]
    ledger_env.produce(events)
    paused = ledger_env.spawn_worker(
        platform_env,
        "ledger-worker-paused",
        OPENLEDGER_LEDGER_TEST_PAUSE_S="30",
        OPENLEDGER_LEDGER_TEST_PAUSE_AT="after_commit",
    )
    try:
        ledger_env.wait_for(lambda: ledger_env.count() == 300, 30, "the batch committed")
        assert ledger_env.pending() == 300  # committed, not acknowledged
        paused.stop_signal = signal.SIGKILL
        paused.stop()
        worker = ledger_env.spawn_worker(platform_env, "ledger-worker-after")
        wait_all(ledger_env, 300, [worker], 60)
        worker.stop()
    finally:
        paused.stop()
    assert_exactly_once(ledger_env, events)


def test_three_workers_share_one_stream(ledger_env: LedgerEnv, platform_env: dict[str, str]) -> None:
    events = [make_event(i) for i in range(30_000)]
    workers = [
        ledger_env.spawn_worker(platform_env, f"ledger-worker-{i}", OPENLEDGER_LEDGER_BATCH_SIZE="500")
        for i in range(3)
    ]
    try:
        time.sleep(1.5)  # all three are reading before the first event arrives
        ledger_env.produce(events, chunk=500)
        wait_all(ledger_env, len(events), workers, 120)
        consumers = ledger_env.redis.xinfo_consumers(ledger_env.stream, ledger_env.group)
    finally:
        for w in workers:
            w.stop()
    assert len(consumers) == 3
    assert_exactly_once(ledger_env, events)


def test_postgres_restarted_in_the_middle_of_a_batch(
    ledger_env: LedgerEnv, platform_env: dict[str, str], local_platform: LocalPlatform
) -> None:
    first = [make_event(i) for i in range(2000)]
    second = [make_event(i) for i in range(2000, 4000)]
    worker = ledger_env.spawn_worker(
        platform_env,
        "ledger-worker-pg",
        OPENLEDGER_LEDGER_TEST_PAUSE_S="2",
        OPENLEDGER_LEDGER_TEST_PAUSE_AT="before_commit",
    )
    try:
        ledger_env.produce(first)
        # A batch is written and waits before COMMIT (waited for: a loaded machine starts the worker late).
        ledger_env.wait_for(lambda: '"action": "test_pause"' in worker.log_path.read_text(), 60, "a batch in flight")
        local_platform.restart_component("postgres")
        ledger_env.produce(second)
        wait_all(ledger_env, 4000, [worker], 120)
        log = worker.log_path.read_text()
    finally:
        worker.stop()
    assert '"action": "write_retry"' in log  # the worker retried the batch
    assert_exactly_once(ledger_env, first + second)


def test_make_up_runs_the_worker_which_migrates_and_serves_metrics(
    ledger_env: LedgerEnv, platform_env: dict[str, str], database_url: str
) -> None:
    # A database nobody migrated: the worker must run `db upgrade` itself.
    with fresh_database(database_url, "fresh", migrate=False) as fresh_url:
        _worker_migrates_and_serves_metrics(ledger_env, platform_env, fresh_url)


def _worker_migrates_and_serves_metrics(ledger_env: LedgerEnv, platform_env: dict[str, str], fresh_url: str) -> None:
    ports: dict[str, int] = {}
    builder = next(b for b in PRODUCT_PROCESSES if b.__name__ == "_ledger_worker")
    spec: ProductProcess = builder(Endpoints(), lambda n: ports.setdefault(n, free_port()))
    env = {**ledger_env.env(platform_env), **spec.env, "DATABASE_URL": fresh_url}
    del env["OPENLEDGER_LEDGER_METRICS_PORT"]
    process = spawn(spec.name, spec.argv(), ledger_env.log_dir / "product-worker.log", detached=False, env=env)
    try:
        assert spec.ready_url is not None
        url = spec.ready_url
        wait_ready(process, lambda: urllib.request.urlopen(url, timeout=1).status == 200, 60)
        ledger_env.produce([make_event(i) for i in range(10)])
        deadline = time.monotonic() + 30
        while "openledger_ledger_events_ingested_total 10.0" not in (
            text := urllib.request.urlopen(url, timeout=1).read().decode()
        ):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.2)
        assert "openledger_ledger_last_verify_success" in text
    finally:
        process.stop()
