"""The usage stream is trimmed below what every consumer group acknowledged, on real Redis."""

from __future__ import annotations

from collections.abc import Callable

import redis

from openledger.metrics import REGISTRY
from openledger.settlement.ledger.worker import LedgerWorker

from .conftest import LedgerEnv, ThreadWorker, expected_balances, make_event
from .test_ingest import full_verify


def ids(env: LedgerEnv) -> list[bytes]:
    return [i for i, _ in env.redis.xrange(env.stream)]


def filled(env: LedgerEnv, n: int) -> list[bytes]:
    for i in range(n):
        env.redis.xadd(env.stream, {"n": str(i)})
    env.redis.xgroup_create(env.stream, env.group, id="0")
    return ids(env)


def read(r: redis.Redis, env: LedgerEnv, group: str, count: int) -> list[bytes]:
    reply = r.xreadgroup(group, "c", {env.stream: ">"}, count=count)
    return [i for i, _ in reply[0][1]]


def test_acknowledged_entries_are_trimmed_pending_and_unread_ones_never(ledger_env: LedgerEnv) -> None:
    env, r = ledger_env, ledger_env.redis
    all_ids = filled(env, 10)
    worker = LedgerWorker(env.config())
    try:
        assert worker.trim() == 0  # nothing delivered yet
        delivered = read(r, env, env.group, 6)
        r.xack(env.stream, env.group, *delivered[:3])
        assert worker.trim() == 3
        assert ids(env) == all_ids[3:]  # the 3 pending and the 4 unread stay
        r.xack(env.stream, env.group, *delivered[3:])
        assert worker.trim() == 3
        assert ids(env) == all_ids[6:]  # the unread stay
        r.xack(env.stream, env.group, *read(r, env, env.group, 10))
        worker.trim()
        assert ids(env) == all_ids[-1:]  # the last delivered one is kept as slack
        assert REGISTRY.get_sample_value("openledger_ledger_stream_length_entries") == 1
    finally:
        worker.redis.close()


def test_a_lagging_consumer_group_holds_trimming_back(ledger_env: LedgerEnv) -> None:
    env, r = ledger_env, ledger_env.redis
    all_ids = filled(env, 10)
    r.xgroup_create(env.stream, "audit", id="0")
    worker = LedgerWorker(env.config())
    try:
        r.xack(env.stream, env.group, *read(r, env, env.group, 10))
        assert worker.trim() == 0  # "audit" has read nothing
        audit = read(r, env, "audit", 4)
        assert worker.trim() == 0  # "audit" has 4 pending
        r.xack(env.stream, "audit", *audit[:2])
        assert worker.trim() == 2
        assert ids(env) == all_ids[2:]
    finally:
        worker.redis.close()


def test_stream_ids_are_compared_as_ids_not_as_text(ledger_env: LedgerEnv) -> None:
    """ "10-10" is newer than "9-5" and "10-2", though it sorts before them as text."""
    env, r = ledger_env, ledger_env.redis
    for stream_id in ("9-5", "10-2", "10-10", "100-1"):
        r.xadd(env.stream, {"n": stream_id}, id=stream_id)
    r.xgroup_create(env.stream, env.group, id="0")
    r.xgroup_create(env.stream, "audit", id="0")
    worker = LedgerWorker(env.config())
    try:
        r.xack(env.stream, env.group, *read(r, env, env.group, 3)[:2])  # 10-10 pending: needed
        r.xack(env.stream, "audit", *read(r, env, "audit", 1))  # audit needs 10-2 next, the older
        assert worker.trim() == 1
        assert ids(env) == [b"10-2", b"10-10", b"100-1"]
        read(r, env, "audit", 1)  # 10-2 pending
        assert worker.trim() == 0
        r.xack(env.stream, "audit", b"10-2")
        assert worker.trim() == 1
        assert ids(env) == [b"10-10", b"100-1"]
    finally:
        worker.redis.close()


def test_the_worker_trims_what_it_ingested_and_the_ledger_still_verifies(
    ledger_env: LedgerEnv, thread_worker: Callable[..., ThreadWorker]
) -> None:
    events = [make_event(i) for i in range(300)]
    ledger_env.produce(events)
    thread_worker(trim_interval_s=0.1)
    ledger_env.wait_for(
        lambda: ledger_env.count() == 300 and ledger_env.redis.xlen(ledger_env.stream) <= 1, 30, "ingest and trim"
    )
    assert ledger_env.balances() == expected_balances(events)
    assert full_verify(ledger_env) == []
