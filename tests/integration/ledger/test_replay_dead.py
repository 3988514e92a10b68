"""``openledger ledger replay-dead`` against real PostgreSQL and Redis: exactly once, idempotent."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable

import psycopg

from openledger.settlement.ledger.ingest import dead_letter_fields
from openledger.settlement.ledger.worker import replay_dead
from openledger.wire import UsageEvent

from .conftest import LedgerEnv, ThreadWorker, expected_balances, make_event
from .test_faults import with_invalid_utf8_agent
from .test_ingest import full_verify


def dead_letter(env: LedgerEnv, entry: dict[bytes, bytes] | UsageEvent, reason: str) -> bytes:
    """A dead-letter entry as the worker writes it (the usage-stream id is made up)."""
    fields = entry if isinstance(entry, dict) else {k.encode(): v.encode() for k, v in entry.to_entry().items()}
    kv = [x for item in fields.items() for x in item]
    flat = dead_letter_fields(env.stream, b"1-1", reason, 6, "old-worker", kv)
    return bytes(env.redis.xadd(env.dead_letter_stream, dict(zip(flat[0::2], flat[1::2], strict=True))))


def replay(env: LedgerEnv, *args: str) -> subprocess.CompletedProcess[str]:
    cli = [sys.executable, "-m", "openledger.cli", "ledger", "replay-dead", *args]
    return subprocess.run(cli, env=env.cli_env(), capture_output=True, text=True, timeout=120)


def snapshot(env: LedgerEnv) -> tuple[object, ...]:
    with psycopg.connect(env.database_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM journal_entries), "
            "(SELECT count(*) FROM postings), (SELECT count(*) FROM usage_quarantine)"
        ).fetchone()
    return counts, env.balances(), env.redis.xrange(env.dead_letter_stream)


def test_replaying_twice_posts_each_dead_event_once_and_leaves_poison_dead_once(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    env = ledger_env
    ingested = [make_event(i) for i in range(10)]
    env.produce(ingested)
    thread_worker()
    env.wait_for(lambda: env.count() == 10 and env.pending() == 0, 30, "the first events")

    lost = [make_event(i) for i in range(10, 13)]  # valid, dead-lettered by an older worker
    for event in lost:
        dead_letter(env, event, "delivered 6 times without being committed")
    dead_letter(env, ingested[0], "delivered 6 times without being committed")  # already in the ledger
    other = dataclasses.replace(ingested[1], input_tokens=ingested[1].input_tokens + 1, cost=0, outcome="timeout")
    dead_letter(env, other, "delivered 6 times without being committed")  # same id, other fields
    poison = dead_letter(env, with_invalid_utf8_agent(make_event(99)), "field 'agent' is not valid UTF-8")

    before = snapshot(env)
    dry = replay(env, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "dry run, nothing changed: 6 dead-letter entries: ingested 3, duplicate 1, quarantined 1, " in dry.stdout
    assert snapshot(env) == before

    first = replay(env)
    assert first.returncode == 1, first.stdout + first.stderr  # the poison stays dead
    assert "6 dead-letter entries: ingested 3, duplicate 1, quarantined 1, still-dead 1" in first.stdout
    assert f"{poison.decode()}\t1-1\t" in first.stdout and "field 'agent' is not valid UTF-8" in first.stdout
    assert env.balances() == expected_balances(ingested + lost)
    assert [i for i, _ in env.redis.xrange(env.dead_letter_stream)] == [poison]
    after_first = snapshot(env)

    second = replay(env)
    assert second.returncode == 1
    assert "1 dead-letter entries: ingested 0, duplicate 0, quarantined 0, still-dead 1" in second.stdout
    assert snapshot(env) == after_first
    assert full_verify(env) == []


def test_a_replay_interrupted_between_commit_and_removal_is_a_no_op_when_run_again(ledger_env: LedgerEnv) -> None:
    env = ledger_env
    event = make_event(1)
    dead_id = dead_letter(env, event, "delivered 6 times without being committed")
    (outcome,) = replay_dead(env.config())
    assert outcome.outcome == "ingested" and outcome.dead_id == dead_id.decode()
    dead_letter(env, event, "delivered 6 times without being committed")  # as if the XDEL was lost
    (again,) = replay_dead(env.config())
    assert again.outcome == "duplicate"
    assert env.count() == 1 and env.redis.xlen(env.dead_letter_stream) == 0
    assert env.balances() == expected_balances([event])


def test_replay_with_redis_unavailable_exits_2_and_changes_nothing(ledger_env: LedgerEnv) -> None:
    env = ledger_env
    dead_letter(env, make_event(1), "delivered 6 times without being committed")
    cli = [sys.executable, "-m", "openledger.cli", "ledger", "replay-dead"]
    down = subprocess.run(cli, env=env.cli_env(REDIS_URL="redis://127.0.0.1:1"), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert down.returncode == 2, down.stdout + down.stderr
    assert "run it again" in down.stderr
    assert env.count() == 0 and env.redis.xlen(env.dead_letter_stream) == 1
