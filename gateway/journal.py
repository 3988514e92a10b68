"""The stream journal: a streamed answer is metered even when its gateway dies mid-stream.

A stream is settled by its own gateway when it ends. A gateway killed mid-stream
(``kill -9``, a lost node) cannot, so each live stream keeps a record in Redis:

- ``openledger:gw-stream:<request id>`` (hash): ``record`` (what settle.lua needs:
  the Agent's ref, budget period and token rate, the usage event's snapshot, the
  request's bounds; versioned, ``RECORD_VERSION``) and the progress ``chunks``/``chars``
  of text delivered so far, written at most every ``PROGRESS_INTERVAL_S`` while text
  flows, the record with the first of these (a failed first write is retried by the
  next). The record expires ``RECORD_TTL_S`` after its last lease renewal: well before
  the settle marker of its request (the in-flight ttl), so a record can never be swept
  after the marker that makes its settle a no-op is gone;
- ``openledger:gw-streams:<usage stream>`` (sorted set, ``index_key``): request id ->
  lease expiry (ms, by Redis' clock: ``lua/journal.lua``). Each gateway renews the
  leases of its live streams every ``LEASE_S / 3`` seconds; ``LEASE_S`` is the in-flight
  margin (``lifetimes.py``), so renewals whose Redis calls are slow never lose a lease
  of a live gateway. One set per usage stream: a stream is recovered onto the usage
  stream its gateway was writing.

Every gateway sweeps its set every ``SWEEP_INTERVAL_S``: a stream whose lease
expired belongs to a dead gateway, and is settled from its record as delivered
up to the last progress write (so at most ``PROGRESS_INTERVAL_S`` of text may go
uncharged, never charged twice). settle.lua is idempotent by the request's
marker, so a sweep that races the stream's own settle, or a gateway that died
between settling and dropping its record, charges nothing twice; the record is
dropped after either settle. A stream whose own settle failed (Redis unavailable)
is ``abandon``-ed: its record and final progress are written (retrying) with an
expired lease, and a later sweep settles it. A record that cannot be settled (it
does not parse, an unknown version) is moved to ``dead_key`` and logged; the sweep
goes on. The in-flight ttl (``lifetimes.py``) still releases the slot and
reservation if no gateway is left to sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from openledger.gateway.lifetimes import STREAM_LEASE_S, STREAM_SWEEP_INTERVAL_S
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.scripts import JOURNAL

__all__ = [
    "LEASE_S",
    "PROGRESS_INTERVAL_S",
    "RECORD_TTL_S",
    "RECORD_VERSION",
    "SWEEP_INTERVAL_S",
    "StreamJournal",
    "dead_key",
    "index_key",
    "record_key",
]

log = logging.getLogger(__name__)

LEASE_S = STREAM_LEASE_S
SWEEP_INTERVAL_S = STREAM_SWEEP_INTERVAL_S
RECORD_TTL_S = LEASE_S + 2 * SWEEP_INTERVAL_S
RECORD_VERSION = 1
PROGRESS_INTERVAL_S = 0.25
SWEEP_BATCH = 32
ABANDON_ATTEMPTS = 8  # about 15 s of retries: a Redis restart
STOP_WAIT_S = 20.0


def record_key(request_id: str) -> str:
    return f"openledger:gw-stream:{request_id}"


def index_key(usage_stream: str) -> str:
    return f"openledger:gw-streams:{usage_stream}"


def dead_key(usage_stream: str) -> str:
    """Request ids whose journal record could not be settled (their records kept for an operator)."""
    return f"openledger:gw-streams-dead:{usage_stream}"


Recover = Callable[[str, bytes, int, int], Awaitable[None]]  # request id, record, chunks, chars


class StreamJournal:
    """The journal of one gateway process: its live streams and the sweep for dead ones."""

    def __init__(self, redis: RedisClient, recover: Recover, usage_stream: str) -> None:
        self.redis = redis
        self.recover = recover
        self.index = index_key(usage_stream)
        self.dead = dead_key(usage_stream)
        self.live: set[str] = set()  # journaled (first write issued), lease renewed
        self._writes: dict[str, asyncio.Task[Any]] = {}
        self._records: dict[str, Callable[[], bytes]] = {}  # every open stream's record
        self._last: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._every(LEASE_S / 3, self._renew)),
            asyncio.ensure_future(self._every(SWEEP_INTERVAL_S, self.sweep)),
        ]

    async def stop(self) -> None:
        if self._closing:  # drops and abandoned streams' records still being written
            await asyncio.wait(set(self._closing), timeout=STOP_WAIT_S)
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
        record = self._records.get(request_id)
        if record is None:
            return
        self._last[request_id] = now
        if request_id in self.live:
            counts = ("HSET", record_key(request_id), "chunks", str(chunks), "chars", str(chars))
            self._writes[request_id] = asyncio.ensure_future(self._run(request_id, self.redis.execute(*counts)))
            return
        self.live.add(request_id)
        first = self._journal(request_id, record(), chunks, chars, LEASE_S)
        self._writes[request_id] = asyncio.ensure_future(self._run(request_id, first, first_write=True))

    def abandon(self, request_id: str, chunks: int, chars: int) -> None:
        """The stream could not be settled (Redis failed): write its record and final progress with
        an expired lease (retrying), so a sweep settles it once Redis is back."""
        record = self._records.pop(request_id, None)
        self.live.discard(request_id)
        self._last.pop(request_id, None)
        task = asyncio.ensure_future(
            self._abandon(request_id, record, self._writes.pop(request_id, None), chunks, chars)
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def close(self, request_id: str) -> None:
        """The stream was settled: drop its record in the background (one left behind is swept: settled once)."""
        self._last.pop(request_id, None)
        self._records.pop(request_id, None)
        pending = self._writes.pop(request_id, None)
        if request_id not in self.live and pending is None:
            return  # never written
        self.live.discard(request_id)
        task = asyncio.ensure_future(self._drop(request_id, pending))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _journal(self, request_id: str, record: bytes | None, chunks: int, chars: int, lease_s: float) -> Any:
        fields: list[str | bytes] = ["chunks", str(chunks), "chars", str(chars)]
        if record is not None:
            fields.extend(("record", record))
        args = ["write", str(int(lease_s * 1000)), str(int(RECORD_TTL_S * 1000)), request_id, *fields]
        return self.redis.evalsha(JOURNAL, [self.index, record_key(request_id)], args)

    async def _drop(self, request_id: str, pending: asyncio.Task[Any] | None) -> None:
        if pending is not None and not pending.done():
            with contextlib.suppress(Exception):
                await pending  # so the record is not re-created after its deletion
        with contextlib.suppress(RedisUnavailable, RedisError):
            await self.redis.execute_many(("DEL", record_key(request_id)), ("ZREM", self.index, request_id))

    async def _abandon(
        self,
        request_id: str,
        record: Callable[[], bytes] | None,
        pending: asyncio.Task[Any] | None,
        chunks: int,
        chars: int,
    ) -> None:
        if pending is not None and not pending.done():
            with contextlib.suppress(Exception):
                await pending  # its counts are older than these
        data = record() if record is not None else None
        for attempt in range(ABANDON_ATTEMPTS):
            try:
                await self._journal(request_id, data, chunks, chars, 0.0)
                return
            except (RedisUnavailable, RedisError) as exc:
                error = str(exc)
            await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
        log.error(
            "a stream could be neither settled nor journaled: its usage is lost",
            extra={"action": "journal", "request": request_id, "chunks": chunks, "error": error},
        )

    async def _run(self, request_id: str, write: Awaitable[Any], first_write: bool = False) -> None:
        try:
            await write
        except (RedisUnavailable, RedisError) as exc:
            log.warning("stream journal write failed", extra={"action": "journal", "error": str(exc)})
            if first_write and request_id in self._records:
                self.live.discard(request_id)  # still streaming: the next progress writes the record again

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
        ids = list(self.live)
        keys = [self.index, *(record_key(i) for i in ids)]
        args = ["renew", str(int(LEASE_S * 1000)), str(int(RECORD_TTL_S * 1000)), *ids]
        await self.redis.evalsha(JOURNAL, keys, args)

    async def sweep(self) -> None:
        """Settle the streams of dead gateways (lease expired by Redis' clock); each one once.

        Each entry on its own: one that cannot be settled now (a Redis error) is left for the
        next sweep, one whose record is unusable goes to the dead set; the rest are swept.
        """
        expired = await self.redis.evalsha(JOURNAL, [self.index], ["expired", str(SWEEP_BATCH)])
        for raw_id in expired or ():
            request_id = raw_id.decode()
            if request_id in self.live or request_id in self._records:
                continue
            try:
                await self._sweep_one(request_id)
            except RedisUnavailable:
                raise
            except RedisError as exc:
                log.warning(
                    "a lost gateway's stream could not be settled yet",
                    extra={"action": "journal", "request": request_id, "error": str(exc)},
                )
            except Exception:
                log.exception("an unusable stream journal record", extra={"action": "journal", "request": request_id})
                await self.redis.execute_many(
                    ("ZADD", self.dead, str(time.time_ns() // 1_000_000), request_id),
                    ("ZREM", self.index, request_id),
                    ("PERSIST", record_key(request_id)),
                )

    async def _sweep_one(self, request_id: str) -> None:
        fields = await self.redis.execute("HMGET", record_key(request_id), "record", "chunks", "chars")
        if fields[0] is not None:
            chunks, chars = int(fields[1] or b"0"), int(fields[2] or b"0")
            await self.recover(request_id, fields[0], chunks, chars)
            log.warning(
                "settled the stream of a lost gateway",
                extra={"action": "journal", "request": request_id, "chunks": chunks},
            )
        await self.redis.execute_many(("DEL", record_key(request_id)), ("ZREM", self.index, request_id))
