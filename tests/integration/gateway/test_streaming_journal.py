"""The stream journal, the gateway's shutdown and the upstream deadline, in process (real Redis and HTTP).

The journal's leases are timed by Redis' clock (a sweeping gateway whose clock runs
ahead must not settle live streams), and a gateway shutting down lets the settles
that outlived their cancelled requests finish before it closes Redis; a model's
stream read past its deadline times out even when chunks are queued; a failed first
journal write is retried.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from openledger.gateway import journal as journal_module
from openledger.gateway.app import Gateway
from openledger.gateway.journal import PROGRESS_INTERVAL_S, StreamJournal, index_key, record_key
from openledger.gateway.redisproto import RedisClient
from openledger.gateway.upstream import UpstreamPool
from openledger.settings import Settings
from tests.integration.gateway.sse_upstream import SseUpstream


def _redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_the_sweep_times_leases_by_redis_not_by_its_own_clock(
    redis_url: str, rds: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway whose clock runs an hour ahead sweeps only leases that expired by Redis' clock."""
    stream = f"usage-{namespace}"
    live, dead = f"{namespace}-live", f"{namespace}-dead"
    now_ms = _redis_ms(rds)
    rds.zadd(index_key(stream), {live: now_ms + 30_000, dead: now_ms - 1})
    for request_id in (live, dead):
        rds.hset(record_key(request_id), mapping={"record": "{}", "chunks": "1", "chars": "4"})
    skewed = time.time() + 3600
    monkeypatch.setattr(journal_module.time, "time", lambda: skewed)
    recovered: list[str] = []

    async def recover(request_id: str, record: bytes, chunks: int, chars: int) -> None:
        recovered.append(request_id)

    async def sweep() -> None:
        client = RedisClient(redis_url, command_timeout_s=2)
        try:
            await StreamJournal(client, recover, stream).sweep()
        finally:
            await client.close()

    asyncio.run(sweep())
    assert recovered == [dead]
    assert rds.zscore(index_key(stream), live) is not None and rds.exists(record_key(live)) == 1


def test_shutdown_waits_for_settles_that_outlived_their_requests(
    redis_url: str, rds: redis.Redis, namespace: str
) -> None:
    """A request cancelled past its grace leaves its settle running (shielded); closing Redis under
    it would lose the usage event, so shutdown waits for it."""
    key = f"{namespace}:settled"

    async def run() -> None:
        gateway = Gateway(Settings(redis_url=redis_url))
        await gateway.startup()

        async def settle() -> None:
            await asyncio.sleep(0.5)
            await gateway.redis.execute("SET", key, "1")

        async def request() -> None:
            await gateway.settler.shielded(settle())

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        task.cancel()  # uvicorn's graceful shutdown ran out
        await gateway.shutdown()

    asyncio.run(run())
    assert rds.get(key) == b"1"


def test_a_stream_read_past_its_deadline_times_out_even_with_chunks_queued() -> None:
    """The deadline bounds the whole stream: a slow reader finding chunks queued still times out."""
    server = SseUpstream()
    server.words = 20

    async def run() -> None:
        pool = UpstreamPool()
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        stream = await pool.open_stream(server.url, "/v1/chat/completions", body, 0.5)
        try:
            assert await stream.read()
            await asyncio.sleep(0.7)  # the whole answer has arrived and queued meanwhile
            with pytest.raises(TimeoutError):
                await stream.read()
        finally:
            stream.close()
            pool.close()

    try:
        asyncio.run(run())
    finally:
        server.close()


def test_a_failed_first_journal_write_is_retried_by_the_next_progress(
    redis_url: str, rds: redis.Redis, namespace: str
) -> None:
    """The record goes with the first progress write; if that write fails, the next one carries it
    again (else the stream would have counts but no record and no lease: never recovered)."""
    stream = f"usage-{namespace}"
    request_id = f"{namespace}-stream"

    async def recover(request_id: str, record: bytes, chunks: int, chars: int) -> None:
        raise AssertionError("nothing to recover")

    async def run() -> None:
        client = RedisClient(redis_url, command_timeout_s=2)
        journal = StreamJournal(client, recover, stream)
        try:
            journal.open(request_id, lambda: b'{"v": 1}')
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            rds.set(index_key(stream), "not a sorted set")  # the first write fails (WRONGTYPE)
            journal.progress(request_id, 2, 8)
            await asyncio.sleep(PROGRESS_INTERVAL_S + 0.1)
            assert rds.exists(record_key(request_id)) == 0
            rds.delete(index_key(stream))
            journal.progress(request_id, 3, 12)
            await asyncio.sleep(0.3)
        finally:
            await client.close()

    asyncio.run(run())
    assert rds.hgetall(record_key(request_id)) == {b"record": b'{"v": 1}', b"chunks": b"3", b"chars": b"12"}
    assert rds.zscore(index_key(stream), request_id) is not None
