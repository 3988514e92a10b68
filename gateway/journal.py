"""The stream journal: a streamed answer is metered even when its gateway dies mid-stream.

A stream is settled by its own gateway when it ends. A gateway killed mid-stream
(``kill -9``, a lost node) cannot, so each live stream keeps a record in Redis:

- ``openledger:gw-stream:<request id>`` (hash): ``record`` (what settle.lua needs:
  the Agent's ref, budget period and token rate, the usage event's snapshot, the
  request's bounds) and the progress ``chunks``/``chars`` of text delivered so far,
  written at most every ``PROGRESS_INTERVAL_S`` while text flows, the record with the
  first of these (a stream shorter than that is never journaled);
- ``openledger:gw-streams:<usage stream>`` (sorted set, ``index_key``): request id ->
  lease expiry (ms). Each gateway renews the leases of its live streams every
  ``LEASE_S / 3`` seconds. One set per usage stream: a stream is recovered onto the
  usage stream its gateway was writing.

Every gateway sweeps its set every ``SWEEP_INTERVAL_S``: a stream whose lease
expired belongs to a dead gateway, and is settled from its record as delivered
up to the last progress write (so at most ``PROGRESS_INTERVAL_S`` of text may go
uncharged, never charged twice). settle.lua is idempotent by the request's
marker, so a sweep that races the stream's own settle, or a gateway that died
between settling and dropping its record, charges nothing twice; the record is
dropped after either settle. A stream whose own settle failed (Redis unavailable)
keeps its record and is settled by a later sweep. The in-flight ttl (``lifetimes.py``) still releases
the slot and reservation if no gateway is left to sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable

__all__ = ["LEASE_S", "PROGRESS_INTERVAL_S", "SWEEP_INTERVAL_S", "StreamJournal", "index_key", "record_key"]

log = logging.getLogger(__name__)

LEASE_S = 6.0
PROGRESS_INTERVAL_S = 0.25
SWEEP_INTERVAL_S = 2.0
SWEEP_BATCH = 32


def record_key(request_id: str) -> str:
    return f"openledger:gw-stream:{request_id}"


def index_key(usage_stream: str) -> str:
    return f"openledger:gw-streams:{usage_stream}"


Recover = Callable[[str, bytes, int, int], Awaitable[None]]  # request id, record, chunks, chars


class StreamJournal:
    """The journal of one gateway process: its live streams and the sweep for dead ones."""

    def __init__(self, redis: RedisClient, recover: Recover, usage_stream: str) -> None:
        self.redis = redis
        self.recover = recover
        self.index = index_key(usage_stream)
        self.live: set[str] = set()
        self._writes: dict[str, asyncio.Task[Any]] = {}
        self._records: dict[str, Callable[[], bytes]] = {}  # streams not journaled yet
        self._last: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._every(LEASE_S / 3, self._renew)),
            asyncio.ensure_future(self._every(SWEEP_INTERVAL_S, self.sweep)),
        ]

    async def stop(self) -> None:
        if self._closing:
            await asyncio.wait(self._closing, timeout=1)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def open(self, request_id: str, record: Callable[[], bytes]) -> None:
        """A stream has begun. Nothing is written yet: its record is written with its first progress,
        ``PROGRESS_INTERVAL_S`` into the stream (a shorter stream costs the journal nothing, and
        the first token never waits for it)."""
        self._records[request_id] = record
        self._last[request_id] = time.monotonic()

    def progress(self, request_id: str, chunks: int, chars: int) -> None:
        """Note the text delivered so far (at most every PROGRESS_INTERVAL_S, one write in flight)."""
        now = time.monotonic()
        if now - self._last.get(request_id, now) < PROGRESS_INTERVAL_S:
            return
        pending = self._writes.get(request_id)
        if pending is not None and not pending.done():
            return
        self._last[request_id] = now
        counts = ("HSET", record_key(request_id), "chunks", str(chunks), "chars", str(chars))
        record = self._records.pop(request_id, None)
        if record is None:
            self._write(request_id, counts)
            return
        self.live.add(request_id)
        expiry = str(int((time.time() + LEASE_S) * 1000))
        self._write(request_id, (*counts, "record", record()), ("ZADD", self.index, expiry, request_id))

    def abandon(self, request_id: str) -> None:
        """The stream could not be settled (Redis failed): stop renewing its lease, so a sweep settles it."""
        self.live.discard(request_id)
        self._last.pop(request_id, None)
        self._writes.pop(request_id, None)
        self._records.pop(request_id, None)

    def close(self, request_id: str) -> None:
        """The stream was settled: drop its record in the background (one left behind is swept: settled once)."""
        self._last.pop(request_id, None)
        if self._records.pop(request_id, None) is not None:
            return  # never written
        self.live.discard(request_id)
        task = asyncio.ensure_future(self._drop(request_id, self._writes.pop(request_id, None)))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop(self, request_id: str, pending: asyncio.Task[Any] | None) -> None:
        if pending is not None and not pending.done():
            with contextlib.suppress(Exception):
                await pending  # so the record is not re-created after its deletion
        with contextlib.suppress(RedisUnavailable, RedisError):
            await self.redis.execute_many(("DEL", record_key(request_id)), ("ZREM", self.index, request_id))

    def _write(self, request_id: str, *commands: tuple[str | bytes, ...]) -> None:
        task = asyncio.ensure_future(self._run(commands))
        self._writes[request_id] = task

    async def _run(self, commands: tuple[tuple[str | bytes, ...], ...]) -> None:
        try:
            await self.redis.execute_many(*commands)
        except (RedisUnavailable, RedisError) as exc:
            log.warning("stream journal write failed", extra={"action": "journal", "error": str(exc)})

    async def _every(self, interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except (RedisUnavailable, RedisError) as exc:
                log.warning("stream journal upkeep failed", extra={"action": "journal", "error": str(exc)})
            except Exception:
                log.exception("stream journal upkeep failed", extra={"action": "journal"})

    async def _renew(self) -> None:
        if not self.live:
            return
        expiry = str(int((time.time() + LEASE_S) * 1000))
        args: list[str] = []
        for request_id in self.live:
            args.extend((expiry, request_id))
        await self.redis.execute("ZADD", self.index, "XX", *args)

    async def sweep(self) -> None:
        """Settle the streams of dead gateways (lease expired); each one once."""
        now_ms = str(int(time.time() * 1000))
        expired = await self.redis.execute("ZRANGEBYSCORE", self.index, "-inf", now_ms, "LIMIT", "0", str(SWEEP_BATCH))
        for raw_id in expired or ():
            request_id = raw_id.decode()
            if request_id in self.live:
                continue
            fields = await self.redis.execute("HMGET", record_key(request_id), "record", "chunks", "chars")
            if fields[0] is not None:
                chunks, chars = int(fields[1] or b"0"), int(fields[2] or b"0")
                await self.recover(request_id, fields[0], chunks, chars)
                log.warning(
                    "settled the stream of a lost gateway",
                    extra={"action": "journal", "request": request_id, "chunks": chunks},
                )
            await self.redis.execute_many(("DEL", record_key(request_id)), ("ZREM", self.index, request_id))
