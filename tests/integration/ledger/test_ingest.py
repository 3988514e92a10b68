"""The ingest worker against real PostgreSQL and Redis (worker in a thread of this process)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable

import psycopg
import pytest

from openledger.metrics import REGISTRY
from openledger.settlement.ledger import queries
from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.verify import verify

from .conftest import POOLS, LedgerEnv, ThreadWorker, expected_balances, make_event


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def run_until_ingested(env: LedgerEnv, start: Callable[..., ThreadWorker], n: int, **overrides: object) -> ThreadWorker:
    worker = start(**overrides)
    env.wait_for(lambda: env.count() >= n and env.pending() == 0, 60, f"{n} events ingested and acknowledged")
    return worker


def full_verify(env: LedgerEnv) -> list[str]:
    with psycopg.connect(env.database_url) as conn:
        report = verify(conn, redis_url=env.redis_url, stream=env.stream, group=env.group,
                        dead_letter_stream=env.dead_letter_stream)  # fmt: skip
    return [str(d) for d in report.drifts]


@pytest.mark.parametrize("writers", [1, 3])
def test_events_become_balanced_entries_with_exact_balances(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker], writers: int
) -> None:
    events = [make_event(i) for i in range(3000)]
    ledger_env.produce(events)
    run_until_ingested(ledger_env, thread_worker, len(events), batch_size=700, writers=writers)

    assert ledger_env.balances() == expected_balances(events)
    assert full_verify(ledger_env) == []
    with psycopg.connect(ledger_env.database_url) as conn:
        # Failed requests are recorded but post nothing.
        unposted = conn.execute("SELECT count(*) FROM usage_events WHERE entry_id IS NULL").fetchone()
        assert unposted == (sum(1 for e in events if e.cost == 0),)
        # Spend per agent per period.
        agent = events[0].agent
        spent = queries.spend_this_period(conn, agent, "Day", dt.datetime.now(dt.UTC))
        assert spent == sum(e.cost for e in events if e.agent == agent)
        # What a RewardPool settles: owners and contributors per pool, up to a cutoff.
        cutoff = queries.journal_cutoff(conn)
        for pool, _ in POOLS:
            earned: dict[str, int] = {}
            for e in (e for e in events if e.pool == pool):
                contributors = [(c.account, c.share_bps) for c in e.contributors]
                for account, amount in sp.event_postings(e.cost, e.payer, e.owner, e.pool, e.fee_bps, contributors):
                    kind, ref = sp.parse_account(account)
                    if kind in sp.PAYEE_KINDS:
                        earned[ref] = earned.get(ref, 0) + amount
            assert queries.cumulative_earnings(conn, pool, cutoff) == earned
        assert queries.cumulative_earnings(conn, "team-a/pool", 0) == {}
        # The trace explains the balance entry by entry.
        owner = sp.owner_account(events[0].owner)
        lines = queries.trace(conn, owner, limit=10_000)
        assert lines[-1].running_balance == queries.balance(conn, owner) == queries.balance_from_postings(conn, owner)
        per_event = queries.entry_events(conn, lines[0].entry_id, owner)
        assert sum(ev.amount for ev in per_event) == lines[0].amount


def test_same_id_and_same_fields_is_a_no_op(ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]) -> None:
    events = [make_event(i) for i in range(200)]
    before = metric("openledger_ledger_duplicates_total")
    ledger_env.produce(events)
    ledger_env.produce(events[:50])  # a retried batch at the producer: ids already stored
    ledger_env.produce([events[60], events[60]])  # the same id twice in one batch
    run_until_ingested(ledger_env, thread_worker, len(events))
    ledger_env.wait_for(lambda: ledger_env.pending() == 0, 10, "all acknowledged")

    assert ledger_env.count() == 200
    assert ledger_env.balances() == expected_balances(events)
    assert metric("openledger_ledger_duplicates_total") - before == 52
    assert ledger_env.count("SELECT count(*) FROM usage_quarantine") == 0
    assert full_verify(ledger_env) == []


def test_same_id_with_different_fields_is_quarantined_and_never_overwrites(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    events = [make_event(i) for i in range(100)]
    before = metric("openledger_ledger_quarantined_total")
    duplicates_before = metric("openledger_ledger_duplicates_total")
    ledger_env.produce(events)
    worker = run_until_ingested(ledger_env, thread_worker, len(events))
    tampered = events[7].to_fields() | {"agent": "team-z/thief", "payer": "0x" + "f" * 40}

    def conflicts() -> float:
        return metric("openledger_ledger_quarantined_total") - before

    def duplicates() -> float:
        return metric("openledger_ledger_duplicates_total") - duplicates_before

    # One copy at a time: two copies read in one batch would make the second an in-batch duplicate.
    ledger_env.produce([tampered])
    ledger_env.wait_for(lambda: conflicts() >= 1, 20, "the first conflict counted")
    ledger_env.produce([tampered])  # the second copy is counted, not quarantined twice
    ledger_env.wait_for(lambda: conflicts() >= 2, 20, "the second conflict counted")
    # Read in one batch or in two, one of these is stored and the other is one conflict. Two
    # batches may commit in either order (two writer connections): whichever commits first is
    # kept, the other quarantined; neither is lost and nothing is overwritten.
    same_batch = make_event(1000)
    ledger_env.produce([same_batch.to_fields(), same_batch.to_fields() | {"model": "team-a/other"}])
    ledger_env.produce([events[3].to_fields()])  # the first wire format of a stored event: a duplicate
    ledger_env.wait_for(lambda: conflicts() >= 3, 20, "conflicts counted")
    ledger_env.wait_for(lambda: duplicates() >= 1 and ledger_env.pending() == 0, 10, "all acknowledged")
    del worker

    assert metric("openledger_ledger_quarantined_total") - before == 3
    assert duplicates() == 1
    with psycopg.connect(ledger_env.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, fields->>'agent', fields->>'model' FROM usage_quarantine"
        ).fetchall()
        kept = conn.execute("SELECT model FROM usage_events WHERE event_id = %s", (same_batch.event_id,)).fetchone()
        assert kept is not None and kept[0] in ("team-a/llama", "team-a/other")
        other = "team-a/other" if kept[0] == "team-a/llama" else "team-a/llama"
        assert sorted(rows) == sorted(
            [(events[7].event_id, "team-z/thief", "team-a/llama"), (same_batch.event_id, "team-a/agent-0", other)]
        )
        stored = conn.execute("SELECT agent FROM usage_events WHERE event_id = %s", (events[7].event_id,)).fetchone()
        assert stored == (events[7].agent,)
    assert ledger_env.balances() == expected_balances([*events, same_batch])
    assert full_verify(ledger_env) == []


def quarantined_rows(env: LedgerEnv) -> list[tuple[object, ...]]:
    with psycopg.connect(env.database_url) as conn:
        return conn.execute("SELECT fields->>'id', fields->>'agent', fields->>'model' FROM usage_quarantine").fetchall()


def test_a_quarantined_packed_event_keeps_its_named_fields(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    event = make_event(2000)
    ledger_env.produce([event, dataclasses.replace(event, model="team-a/other")])  # one batch or two
    thread_worker()
    ledger_env.wait_for(lambda: len(quarantined_rows(ledger_env)) == 1, 20, "the conflict quarantined")
    with psycopg.connect(ledger_env.database_url) as conn:
        kept = conn.execute("SELECT model FROM usage_events WHERE event_id = %s", (event.event_id,)).fetchone()
    assert kept is not None
    other = "team-a/other" if kept[0] == event.model else event.model
    assert quarantined_rows(ledger_env) == [(event.event_id, event.agent, other)]


def test_a_poison_message_is_dead_lettered_after_n_deliveries(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    before = metric("openledger_ledger_dead_lettered_total")
    good = [make_event(i) for i in range(20)]
    poison = dataclasses.replace(good[0], event_id=make_event(99).event_id, cost=12345).to_entry()
    ledger_env.produce([*good[:10], poison, *good[10:]])
    thread_worker(max_deliveries=3, claim_idle_ms=300)
    ledger_env.wait_for(lambda: ledger_env.redis.xlen(ledger_env.dead_letter_stream) == 1, 30, "the dead letter")
    ledger_env.wait_for(lambda: ledger_env.pending() == 0, 10, "nothing pending")

    ((_, fields),) = ledger_env.redis.xrange(ledger_env.dead_letter_stream)
    assert fields[b"dead_stream"] == ledger_env.stream.encode()
    assert int(fields[b"dead_deliveries"]) == 3
    assert b"'cost'" in fields[b"dead_reason"]
    assert fields[b"event"] == poison["event"].encode()  # the original entry travels with it
    assert ledger_env.count() == 20
    assert metric("openledger_ledger_dead_lettered_total") - before == 1
    assert full_verify(ledger_env) == []


def test_a_dead_consumers_pending_entries_are_reclaimed(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    events = [make_event(i) for i in range(500)]
    ledger_env.produce(events)
    r = ledger_env.redis
    r.xgroup_create(ledger_env.stream, ledger_env.group, id="0")
    r.xreadgroup(ledger_env.group, "ghost", {ledger_env.stream: ">"}, count=300)  # reads, then "dies"
    run_until_ingested(ledger_env, thread_worker, len(events), claim_idle_ms=500)
    assert ledger_env.balances() == expected_balances(events)
    consumers = {c["name"]: c["pending"] for c in r.xinfo_consumers(ledger_env.stream, ledger_env.group)}
    assert consumers[b"ghost" if b"ghost" in consumers else "ghost"] == 0


def test_reversal_negates_one_event_and_keeps_the_original(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    events = [make_event(i) for i in range(30)]
    target = next(e for e in events if e.cost > 0)
    ledger_env.produce(events)
    run_until_ingested(ledger_env, thread_worker, len(events))
    with psycopg.connect(ledger_env.database_url) as conn:
        entry = queries.reverse_event(conn, target.event_id, "refund: model returned garbage")
        conn.commit()
        with pytest.raises(queries.LedgerError, match="already reversed"):
            queries.reverse_event(conn, target.event_id, "again")
        conn.rollback()
        assert conn.execute("SELECT kind FROM journal_entries WHERE id = %s", (entry,)).fetchone() == ("reversal",)
    expected = expected_balances([e for e in events if e is not target])
    actual = ledger_env.balances()
    assert {a: actual.get(a, 0) for a in actual | expected} == {a: expected.get(a, 0) for a in actual | expected}
    assert ledger_env.count() == 30
    assert full_verify(ledger_env) == []


def test_journal_cutoff_waits_for_a_batch_in_flight(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    thread_worker(test_pause_s=1.5, test_pause_at="before_commit")
    ledger_env.produce([make_event(i) for i in range(10)])
    time.sleep(0.7)  # the batch is written, its transaction not yet committed
    with psycopg.connect(ledger_env.database_url) as conn:
        started = time.monotonic()
        cutoff = queries.journal_cutoff(conn)
        waited = time.monotonic() - started
        entries = conn.execute("SELECT count(*) FROM journal_entries WHERE id <= %s", (cutoff,)).fetchone()
    assert waited > 0.3
    assert cutoff > 0 and entries is not None and entries[0] > 0


def test_verify_finds_drift_and_the_cli_exits_non_zero_saying_where(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker], platform_env: dict[str, str]
) -> None:
    events = [make_event(i) for i in range(50)]
    ledger_env.produce(events)
    run_until_ingested(ledger_env, thread_worker, len(events))
    env = ledger_env.env(platform_env)
    cli = [sys.executable, "-m", "openledger.cli", "ledger", "verify"]
    ok = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: no drift" in ok.stdout
    with psycopg.connect(ledger_env.database_url) as conn:  # someone writes around the ledger
        conn.execute("INSERT INTO journal_entries (id, kind, amount) VALUES (9, 'transfer', 5)")
        conn.execute(
            "INSERT INTO postings (entry_id, account, pool, amount) VALUES (9, %s, '', 5)",
            (sp.owner_account(events[0].owner),),
        )
    bad = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "DRIFT entry_balances: entry 9: postings sum to 5" in bad.stdout
    assert f"DRIFT cached_balance: account {sp.owner_account(events[0].owner)}" in bad.stdout
    balance = subprocess.run(
        [*cli[:-1], "balance", events[0].payer], env=env, capture_output=True, text=True, timeout=60
    )
    assert sp.agent_account(events[0].payer) in balance.stdout
    trace = subprocess.run([*cli[:-1], "trace", "--events", sp.agent_account(events[0].payer)], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert trace.returncode == 0 and "event " in trace.stdout


def test_metrics_are_exported_under_openledger_ledger(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    before = metric("openledger_ledger_events_ingested_total")
    ledger_env.produce([make_event(i) for i in range(40)])
    run_until_ingested(ledger_env, thread_worker, 40)
    assert metric("openledger_ledger_events_ingested_total") - before == 40
    assert metric("openledger_ledger_batch_size_events_count") > 0
    assert metric("openledger_ledger_batch_seconds_count") > 0
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("openledger_ledger_")}
    assert {
        "openledger_ledger_ingest_lag_seconds",
        "openledger_ledger_ingest_lag_entries",
        "openledger_ledger_duplicates",
        "openledger_ledger_quarantined",
        "openledger_ledger_dead_lettered",
        "openledger_ledger_last_verify_success",
    } <= names


def test_a_deleted_stream_and_group_are_recreated(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    first = [make_event(i) for i in range(20)]
    ledger_env.produce(first)
    run_until_ingested(ledger_env, thread_worker, 20)
    ledger_env.redis.delete(ledger_env.stream)  # e.g. Redis restarted without persistence
    second = [make_event(i) for i in range(20, 50)]
    ledger_env.produce(second)
    ledger_env.wait_for(lambda: ledger_env.count() == 50, 30, "events after the group was recreated")
    assert ledger_env.balances() == expected_balances(first + second)


def test_raw_client_reads_deferred_replies_in_order(ledger_env: LedgerEnv) -> None:
    from openledger.settlement.ledger.redisraw import RawRedis, RedisReplyError

    client = RawRedis(ledger_env.redis_url)
    try:
        client.send("ECHO", b"first")
        client.send("NOSUCHCOMMAND")
        client.send("ECHO", b"third")
        assert client.unread == 3
        with pytest.raises(RuntimeError, match="unread replies"):
            client.execute("PING")  # a reply would be mistaken for another command's
        assert client.receive() == b"first"
        with pytest.raises(RedisReplyError, match="unknown command"):
            client.receive()
        assert client.receive() == b"third"
        assert client.unread == 0 and client.execute("PING") == b"PONG"
    finally:
        client.close()
