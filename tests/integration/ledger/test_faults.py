"""Only poison is dead-lettered: bad entries alone, and never for the database's own trouble.

Real PostgreSQL and Redis; the worker runs in a thread of this process. Each
test would fail on a worker that dead-letters by delivery count, treats any
parse error as fatal, or treats environmental database errors as poison.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from openledger.metrics import REGISTRY
from openledger.wire import UsageEvent

from .conftest import LedgerEnv, ThreadWorker, expected_balances, make_event
from .test_ingest import full_verify

# Short enough that a worker which dead-letters for the wrong reasons does it within the test.
FAST_REDELIVERY = dict(max_deliveries=2, claim_idle_ms=300, claim_interval_s=0.1, retry_max_s=0.3)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def dead(env: LedgerEnv) -> int:
    return int(env.redis.xlen(env.dead_letter_stream))


def with_invalid_utf8_agent(event: UsageEvent) -> dict[bytes, bytes]:
    packed = event.to_entry()["event"].encode()
    agent = event.agent.encode()
    return {b"event": packed.replace(agent, agent[:2] + b"\xff\xfe" + agent[2:], 1)}


def ingested(env: LedgerEnv, n: int) -> Callable[[], bool]:
    return lambda: env.count() == n and env.pending() == 0


def test_an_entry_with_invalid_utf8_is_dead_lettered_alone_and_the_others_are_ingested(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    good = [make_event(i) for i in range(30)]
    bad = with_invalid_utf8_agent(make_event(99))
    ledger_env.produce(good[:15])
    ledger_env.redis.xadd(ledger_env.stream, bad)  # type: ignore[arg-type]
    ledger_env.produce(good[15:])
    worker = thread_worker(**FAST_REDELIVERY)
    ledger_env.wait_for(lambda: dead(ledger_env) == 1 and ingested(ledger_env, 30)(), 30, "30 ingested, 1 dead")

    ((_, fields),) = ledger_env.redis.xrange(ledger_env.dead_letter_stream)
    assert b"field 'agent' is not valid UTF-8" in fields[b"dead_reason"]
    assert fields[b"event"] == bad[b"event"]  # dead-lettered as it was sent
    assert ledger_env.balances() == expected_balances(good)
    assert worker.thread.is_alive() and worker.error is None
    assert full_verify(ledger_env) == []


def _terminate_other_backends(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def _alter_database(database_url: str, setting: str) -> None:
    server, name = database_url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:  # not a session of the read-only one
        conn.execute(f'ALTER DATABASE "{name}" {setting}')


def test_a_read_only_database_dead_letters_nothing_and_ingest_resumes_after_the_fix(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    first = [make_event(i) for i in range(20)]
    ledger_env.produce(first)
    thread_worker(**FAST_REDELIVERY)
    ledger_env.wait_for(ingested(ledger_env, 20), 30, "the first events")
    retries = metric("openledger_ledger_write_retries_total")

    # What a failover to a standby looks like: new sessions are read-only, old ones are cut off.
    _alter_database(ledger_env.database_url, "SET default_transaction_read_only = on")
    try:
        _terminate_other_backends(ledger_env.database_url)
        second = [make_event(i) for i in range(20, 60)]
        ledger_env.produce(second)
        ledger_env.wait_for(lambda: metric("openledger_ledger_write_retries_total") - retries >= 5, 30, "retries")
        time.sleep(2.0)  # many redeliveries: a worker that counted them would dead-letter now
        assert dead(ledger_env) == 0
        assert ledger_env.count() == 20
    finally:
        _alter_database(ledger_env.database_url, "RESET default_transaction_read_only")

    ledger_env.wait_for(ingested(ledger_env, 60), 30, "every event after the fix")
    assert dead(ledger_env) == 0
    assert ledger_env.balances() == expected_balances(first + second)
    assert full_verify(ledger_env) == []


@pytest.fixture
def worker_role(ledger_env: LedgerEnv) -> Iterator[tuple[str, str]]:
    """A login role with the privileges the worker needs: ``(role, database url as that role)``."""
    role = f"ledger_worker_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ledger_env.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    server, name = ledger_env.database_url.rsplit("/", 1)
    scheme, _, host = server.partition("://")
    url = f"{scheme}://{role}@{host.rpartition('@')[2]}/{name}"
    try:
        yield role, url
    finally:
        with psycopg.connect(ledger_env.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_revoked_privilege_dead_letters_nothing_and_ingest_resumes_after_the_grant(
    ledger_env: LedgerEnv, worker_role: tuple[str, str], thread_worker: Callable[..., ThreadWorker]
) -> None:
    role, url = worker_role
    first = [make_event(i) for i in range(20)]
    ledger_env.produce(first)
    thread_worker(database_url=url, **FAST_REDELIVERY)
    ledger_env.wait_for(ingested(ledger_env, 20), 30, "the first events")
    retries = metric("openledger_ledger_write_retries_total")

    with psycopg.connect(ledger_env.database_url, autocommit=True) as admin:
        admin.execute(f"REVOKE INSERT ON usage_events FROM {role}")
        second = [make_event(i) for i in range(20, 60)]
        ledger_env.produce(second)
        ledger_env.wait_for(lambda: metric("openledger_ledger_write_retries_total") - retries >= 5, 30, "retries")
        time.sleep(2.0)
        assert dead(ledger_env) == 0
        assert ledger_env.count() == 20
        admin.execute(f"GRANT INSERT ON usage_events TO {role}")

    ledger_env.wait_for(ingested(ledger_env, 60), 30, "every event after the grant")
    assert dead(ledger_env) == 0
    assert ledger_env.balances() == expected_balances(first + second)
    assert full_verify(ledger_env) == []


def test_admin_shutdown_of_the_workers_connections_loses_and_doubles_nothing(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    events = [make_event(i) for i in range(3000)]
    # Each batch waits before its COMMIT, so the terminations land inside transactions too.
    thread_worker(test_pause_s=0.2, test_pause_at="before_commit", batch_size=500, **FAST_REDELIVERY)
    terminated = 0
    for start in range(0, len(events), 500):
        ledger_env.produce(events[start : start + 500])
        time.sleep(0.3)
        terminated += _terminate_other_backends(ledger_env.database_url)
    assert terminated > 0
    ledger_env.wait_for(ingested(ledger_env, len(events)), 60, "every event")
    assert dead(ledger_env) == 0
    assert ledger_env.balances() == expected_balances(events)
    with psycopg.connect(ledger_env.database_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT stream_id) FROM usage_events").fetchone()
    assert row == (len(events), len(events))
    assert full_verify(ledger_env) == []
