"""The ledger ingest worker: usage stream → PostgreSQL, exactly once.

One reader and ``writers`` writer threads per process. The reader (the
caller's thread) reads entries with ``XREADGROUP`` on raw hiredis replies,
parses and checks them, drops in-batch duplicates and hands a ``Batch`` to the
writers through a bounded queue. Each writer thread has its own PostgreSQL
connection, writes a batch in one transaction (``writer.BatchWriter``) and
``XACK``s its entries only after ``COMMIT`` (the XACK's reply is read before
that connection's next command, so the next batch does not wait for it). With
two writers one batch is copied while the other commits: PostgreSQL never idles
on one connection's round trips. Batches commit in any order; each is
independent.

May run more than once, and in many processes at once: every step is safe to
repeat. A crash before COMMIT leaves the entries pending; another consumer
(or this one after a restart) reclaims them with ``XAUTOCLAIM`` once they have
been idle for ``claim_idle_ms`` and writes them again. A crash between COMMIT
and XACK redelivers entries whose events are already stored: they are
duplicates, a no-op. Scale out by starting more workers on the same group.

Poison, and only poison, is dead-lettered. An entry that cannot be parsed
(any error of the parser: a bad value, invalid UTF-8, …) is poison on its own,
with a reason naming the field; the other entries of its read go on. A
database error is classified by SQLSTATE (``errors.classify_sqlstate``): an
error of the environment (connection lost, admin shutdown, read-only standby,
missing privilege, out of resources) is retried with backoff on a fresh
connection for as long as it lasts, and makes nothing poison; a data error one
row can cause (classes 22, 23, 54) makes the writer isolate that row by
bisecting the batch and write the rest. A poison entry is left pending; when it
fails on its ``max_deliveries``-th delivery it is moved to the dead-letter
stream (``XADD`` + ``XACK`` in one ``MULTI``) with the reason. An entry is never
dead-lettered for its delivery count alone: reclaimed entries are parsed and
written like new ones. ``replay_dead`` (``openledger ledger replay-dead``)
moves dead-lettered entries back through the same parser and writer.

Every ``trim_interval_s`` the worker trims the usage stream with ``XTRIM
MINID`` (never ``MAXLEN``) to the oldest entry some consumer group still
needs: per group its oldest pending entry, or when none is pending the entry
after the last one it was delivered (``TRIM_SCRIPT``, atomic in Redis).
Entries below it were delivered to and acknowledged by every group, so they
are in the ledger (or dead-lettered), and Redis memory stays bounded. A group
that lags holds trimming back; a group nobody reads any more holds it back
for good (delete it: ``XGROUP DESTROY``).
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal, get_args

import psycopg

from openledger.settlement.ledger import metrics as m
from openledger.settlement.ledger.db import libpq_url
from openledger.settlement.ledger.errors import DbErrorKind, PoisonEvent, classify_sqlstate
from openledger.settlement.ledger.health import WorkerHealth, serve_health
from openledger.settlement.ledger.ingest import (
    PACKED_FIELD,
    BatchBuilder,
    BatchPlan,
    Conflict,
    EventRecord,
    Parser,
    assemble,
    dead_letter_fields,
    event_id_of,
    explain_rejection,
    record_fields,
    split_dead_letter,
)
from openledger.settlement.ledger.models import JOURNAL_ID_BLOCK
from openledger.settlement.ledger.redisraw import RawRedis, RedisReplyError
from openledger.settlement.ledger.writer import BatchWriter, WriteResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    database_url: str
    redis_url: str
    stream: str
    group: str
    dead_letter_stream: str
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    batch_size: int = 5000
    # Writer threads, each with its own PostgreSQL connection: while one commits, another
    # copies the next batch, so the database never waits on one connection's round trips.
    writers: int = 2
    block_ms: int = 200
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 1.0
    max_deliveries: int = 5
    verify_interval_s: float = 0.0
    trim_interval_s: float = 10.0  # XTRIM MINID of what every group acknowledged; 0 disables
    stop_timeout_s: float = 30.0  # how long a stopping worker keeps retrying its last batch
    retry_max_s: float = 5.0  # backoff cap for temporary errors
    # Testing only: widen a crash window (see settings.ledger_test_pause_*).
    test_pause_s: float = 0.0
    test_pause_at: str = "after_commit"
    # /healthz and /readyz (health.py) on bind_host; 0 serves none.
    health_port: int = 0
    bind_host: str = "127.0.0.1"

    @classmethod
    def from_settings(cls, **overrides: Any) -> WorkerConfig:
        from openledger.settings import get_settings

        s = get_settings()
        values: dict[str, Any] = dict(
            database_url=s.database_url,
            redis_url=s.redis_url,
            stream=s.usage_stream,
            group=s.usage_consumer_group,
            dead_letter_stream=s.usage_dead_letter_stream,
            batch_size=s.ledger_batch_size,
            writers=s.ledger_writers,
            block_ms=s.ledger_block_ms,
            claim_idle_ms=s.ledger_claim_idle_ms,
            claim_interval_s=s.ledger_claim_interval_s,
            max_deliveries=s.ledger_max_deliveries,
            verify_interval_s=s.ledger_verify_interval_s,
            trim_interval_s=s.ledger_trim_interval_s,
            test_pause_s=s.ledger_test_pause_s,
            test_pause_at=s.ledger_test_pause_at,
            health_port=s.ledger_health_port,
            bind_host=s.bind_host,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Batch:
    plan: BatchPlan
    ack_ids: list[bytes]  # every entry to XACK after COMMIT (records, in-batch duplicates, conflicts)
    conflicts: list[Conflict]
    duplicates: int  # in-batch duplicates
    deliveries: dict[bytes, int]  # stream id -> delivery count (claimed entries; absent means 1)
    oldest_ms: int
    entries: list[list[Any]]  # the raw entries as read, so a refused one is dead-lettered as it was sent


def _stream_ms(stream_id: bytes) -> int:
    return int(stream_id.split(b"-", 1)[0])


_first = itemgetter(0)


@dataclass
class _Output:
    """One writer thread's connections: PostgreSQL for the batches, Redis for their XACKs."""

    db: BatchWriter
    redis: RawRedis


def _deduplicated(records: list[EventRecord]) -> tuple[BatchBuilder, int, list[Conflict]]:
    """A batch's records with each event id once: repeats with the same body are duplicates
    (acknowledged, not written); with another body, conflicts (quarantined)."""
    builder = BatchBuilder()
    seen: dict[bytes, bytes] = {}
    duplicates = 0
    conflicts: list[Conflict] = []
    for record in records:
        previous = seen.setdefault(record.event_id, record.body)
        if previous is record.body:
            builder.add(record)
        elif previous == record.body:
            duplicates += 1
        else:
            reason = "same event id twice in one batch"
            conflicts.append(
                Conflict(record.event_id.decode(), record.stream_id.decode(), record_fields(record), reason)
            )
    return builder, duplicates, conflicts


def _rejection(kv: list[bytes], exc: Exception) -> str:
    """Why an entry could not be parsed; an error the parser did not foresee is named too."""
    reason = explain_rejection(kv, exc)
    if isinstance(exc, PoisonEvent):
        return reason
    return f"usage event could not be parsed: {type(exc).__name__}: {reason[:200]}"


def _raw_entry(entries: list[list[Any]], record: EventRecord) -> list[bytes]:
    """The entry of ``record`` as it was read (a refused record is dead-lettered as it was sent)."""
    for stream_id, kv in entries:
        if stream_id == record.stream_id and kv is not None:
            return list(kv)
    return [PACKED_FIELD, record.body]  # the body is the packed wire form


# Atomic in Redis, so no group can move between reading the groups and trimming. Per group
# the oldest entry it still needs: its oldest pending entry, else the first entry after its
# last delivered one (else that last one, kept as slack: no id arithmetic). Stream ids are
# compared as strings (length, then bytes; Redis writes them without leading zeros), never
# as Lua numbers.
TRIM_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, ''} end
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local minid = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need = info['last-delivered-id']
  if info['pending'] > 0 then
    need = redis.call('XPENDING', KEYS[1], info['name'], '-', '+', 1)[1][1]
  else
    local after = redis.call('XRANGE', KEYS[1], '(' .. need, '+', 'COUNT', 1)
    if #after > 0 then need = after[1][1] end
  end
  if minid == nil or older(need, minid) then minid = need end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', minid), minid}
"""


def _error_kind(exc: BaseException) -> DbErrorKind | None:
    """How the writer treats an error of a batch write; ``None``: a bug (the writer stops, nothing is acked)."""
    if isinstance(exc, psycopg.Error):
        return classify_sqlstate(exc.sqlstate)
    if isinstance(exc, ConnectionError | OSError):
        return DbErrorKind.ENVIRONMENT
    return None


class LedgerWorker:
    """One consumer of the usage stream. ``run(stop)`` returns when ``stop`` is set and the writer drained."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.parser = Parser()
        self.redis = RawRedis(config.redis_url, timeout_s=max(10.0, config.block_ms / 1000 + 5))
        # XREADGROUP has its own connection so the next read is in flight while a batch is parsed.
        self.reader = RawRedis(config.redis_url, timeout_s=max(10.0, config.block_ms / 1000 + 5))
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=config.writers + 1)
        self._writer_error: BaseException | None = None
        self._claim_cursor = b"0-0"
        self._next_claim = 0.0
        self._next_verify = time.monotonic() + config.verify_interval_s
        self._next_trim = time.monotonic() + config.trim_interval_s
        self._stop_requested = threading.Event()
        self._stop: threading.Event | None = None
        self.health = WorkerHealth(stale_s=max(60.0, config.stop_timeout_s + config.block_ms / 1000))

    # ------------------------------------------------------------------ setup

    def ensure_group(self) -> None:
        """Create the stream and the group (from the start of the stream) if missing. Idempotent."""
        try:
            self.redis.execute("XGROUP", "CREATE", self.config.stream, self.config.group, "0", "MKSTREAM")
        except RedisReplyError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------- loop

    def run(self, stop: threading.Event) -> None:
        cfg = self.config
        self._stop = stop
        log.info("ledger worker starting", extra={"action": "start", "consumer": cfg.consumer, "stream": cfg.stream})
        probes = serve_health(self.health, cfg.bind_host, cfg.health_port) if cfg.health_port else None
        self._retry(self.ensure_group, stop)
        writers = [
            threading.Thread(target=self._writer_loop, name=f"ledger-writer-{i}", daemon=True)
            for i in range(cfg.writers)
        ]
        for writer in writers:
            writer.start()
        try:
            while not stop.is_set() and self._writer_error is None:
                try:
                    self._tick()
                    self.health.turned(read_ok=True)
                except (ConnectionError, OSError) as exc:
                    self.health.turned(read_ok=False)
                    log.warning("redis unavailable; retrying", extra={"action": "redis_retry", "error": str(exc)})
                    stop.wait(0.5)
                except RedisReplyError as exc:
                    if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                        raise
                    # The stream or the group was deleted (e.g. Redis lost its data): recreate, go on.
                    log.warning("consumer group missing; recreating", extra={"action": "recreate_group"})
                    self.reader.close()
                    self._retry(self.ensure_group, stop)
            if self._writer_error is None:
                self._drain_prefetch()
        finally:
            self._stop_requested.set()
            for _ in writers:
                self._queue.put(None)
            for writer in writers:
                writer.join(cfg.stop_timeout_s + 5)
            self.redis.close()
            self.reader.close()
            if probes is not None:
                probes.shutdown()
                probes.server_close()
        if self._writer_error is not None:
            raise self._writer_error
        log.info("ledger worker stopped", extra={"action": "stop", "consumer": cfg.consumer})

    def _tick(self) -> None:
        cfg = self.config
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + cfg.claim_interval_s
            self._claim()
            self._update_lag()
        if cfg.verify_interval_s and now >= self._next_verify:
            self._next_verify = now + cfg.verify_interval_s
            self._quick_verify()
        if cfg.trim_interval_s and now >= self._next_trim:
            self._next_trim = now + cfg.trim_interval_s
            self.trim()
        reply = self._read()
        if not reply:
            if self._queue.empty():
                m.INGEST_LAG_SECONDS.set(0)
            return
        self._process(reply[0][1], {})

    def _read(self, prefetch: bool = True) -> Any:
        """The next entries; then sends the following XREADGROUP so Redis prepares it while we parse."""
        cfg = self.config
        command = ("XREADGROUP", "GROUP", cfg.group, cfg.consumer, "COUNT", cfg.batch_size, "BLOCK", cfg.block_ms,
                   "STREAMS", cfg.stream, ">")  # fmt: skip
        if not self.reader.unread:
            self.reader.send(*command)
        reply = self.reader.receive()
        if reply and prefetch:
            self.reader.send(*command)
        return reply

    def _drain_prefetch(self) -> None:
        """On stop: process what the read in flight brings (it is already pending for this consumer)."""
        if not self.reader.unread:
            return
        try:
            reply = self._read(prefetch=False)
        except (OSError, ConnectionError, RedisReplyError):
            return  # left pending; reclaimed later by XAUTOCLAIM
        if reply:
            self._process(reply[0][1], {})

    # ---------------------------------------------------------------- reading

    def _process(self, entries: list[list[Any]], deliveries: dict[bytes, int]) -> None:
        builder = BatchBuilder()
        add = builder.add
        parse = self.parser.parse
        refused: list[bytes] = []
        for stream_id, kv in entries:
            if kv is None:  # deleted from the stream while pending: acknowledged, nothing to write
                continue
            try:
                add(parse(stream_id, kv))
            except Exception as exc:  # noqa: BLE001 - any parse error makes this one entry poison, no other
                self._poison(stream_id, kv, _rejection(kv, exc), deliveries.get(stream_id, 1))
                refused.append(stream_id)  # left pending (or already dead-lettered)
        ack_ids = list(map(_first, entries))
        if refused:
            left = set(refused)
            ack_ids = [i for i in ack_ids if i not in left]
        if not ack_ids:
            return
        records = builder.records
        duplicates = 0
        conflicts: list[Conflict] = []
        if len(set(map(_first, records))) != len(records):  # rare: one event id twice in the batch
            builder, duplicates, conflicts = _deduplicated(records)
        oldest = _stream_ms(entries[0][0])  # entries come in stream order
        self._put(Batch(builder.plan(), ack_ids, conflicts, duplicates, deliveries, oldest, entries))

    def _put(self, batch: Batch) -> None:
        deadline: float | None = None
        while self._writer_error is None:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self.health.turned(read_ok=False)  # alive, waiting on PostgreSQL: not ready
                if not self._stopping():
                    continue
                # Stopping while the writer is stuck (database down): give up on this batch
                # after the grace time; its entries stay pending and are reclaimed later.
                deadline = deadline or time.monotonic() + self.config.stop_timeout_s
                if time.monotonic() > deadline:
                    log.warning(
                        "stopping: batch left pending", extra={"action": "stop_drop", "events": len(batch.ack_ids)}
                    )
                    return

    def _claim(self) -> None:
        """Take over entries idle longer than ``claim_idle_ms`` (dead consumers, earlier failures)."""
        cfg = self.config
        reply = self.redis.execute(
            "XAUTOCLAIM", cfg.stream, cfg.group, cfg.consumer, cfg.claim_idle_ms, self._claim_cursor,
            "COUNT", cfg.batch_size,
        )  # fmt: skip
        self._claim_cursor = reply[0]
        entries = [e for e in reply[1] if e is not None]
        if not entries:
            return
        pending = self.redis.pipeline([("XPENDING", cfg.stream, cfg.group, e[0], e[0], 1) for e in entries])
        deliveries = {row[0][0]: int(row[0][3]) for row in pending if row}
        log.info(
            "reclaimed pending entries", extra={"action": "claim", "count": len(entries), "consumer": cfg.consumer}
        )
        # Parsed and written like new entries, whatever their delivery count: an entry becomes
        # poison only by failing its own parse or its own write, never by having waited.
        self._process(entries, deliveries)

    def _poison(self, stream_id: bytes, kv: list[bytes], reason: str, deliveries: int) -> None:
        if deliveries >= self.config.max_deliveries:
            self._dead_letter(stream_id, kv, reason, deliveries)
        else:
            log.warning(
                "usage event rejected; left pending for redelivery",
                extra={"action": "reject", "stream_id": stream_id.decode(), "reason": reason, "deliveries": deliveries},
            )

    def _dead_letter(
        self, stream_id: bytes, kv: list[bytes], reason: str, deliveries: int, client: RawRedis | None = None
    ) -> None:
        cfg = self.config
        fields = dead_letter_fields(cfg.stream, stream_id, reason, deliveries, cfg.consumer, kv)
        client = client or self.redis
        self._read_ack_replies(client)
        client.pipeline(
            [
                ("MULTI",),
                ("XADD", cfg.dead_letter_stream, "*", *fields),
                ("XACK", cfg.stream, cfg.group, stream_id),
                ("EXEC",),
            ]
        )
        m.DEAD_LETTERED.inc()
        log.error(
            "usage event dead-lettered",
            extra={
                "action": "dead_letter",
                "stream_id": stream_id.decode(),
                "reason": reason,
                "deliveries": deliveries,
            },
        )

    def trim(self) -> int:
        """Trim the usage stream below the oldest entry any consumer group still needs.

        ``XTRIM MINID`` (``TRIM_SCRIPT``), never ``MAXLEN``: every entry removed was
        delivered to and acknowledged by every group. Idempotent; any worker may run
        it. Returns how many entries were removed."""
        stream = self.config.stream
        try:
            (trimmed, minid), length = self.redis.pipeline([("EVAL", TRIM_SCRIPT, 1, stream), ("XLEN", stream)])
        except RedisReplyError as exc:
            log.warning("trimming the usage stream failed", extra={"action": "trim", "error": str(exc)})
            return 0
        m.STREAM_LENGTH.set(int(length))
        if trimmed:
            m.STREAM_TRIMMED.inc(int(trimmed))
            log.info("usage stream trimmed", extra={"action": "trim", "trimmed": int(trimmed),
                                                    "min_id": minid.decode(), "length": int(length)})  # fmt: skip
        return int(trimmed)

    def _update_lag(self) -> None:
        try:
            groups = self.redis.execute("XINFO", "GROUPS", self.config.stream)
        except RedisReplyError:
            return
        for raw in groups:
            info = dict(zip(raw[0::2], raw[1::2], strict=False))
            if info.get(b"name") == self.config.group.encode():
                lag = info.get(b"lag")
                m.INGEST_LAG_ENTRIES.set(int(lag or 0) + int(info.get(b"pel-count") or 0))

    def _quick_verify(self) -> None:
        from openledger.settlement.ledger.verify import verify

        try:
            with psycopg.connect(libpq_url(self.config.database_url), connect_timeout=5) as conn:
                verify(conn, full=False)
        except psycopg.Error as exc:
            log.warning("periodic verify could not run", extra={"action": "verify", "error": str(exc)})

    # ---------------------------------------------------------------- writing

    def _writer_loop(self) -> None:
        before_commit = None
        if self.config.test_pause_s and self.config.test_pause_at == "before_commit":
            before_commit = self._test_pause
        out = _Output(
            BatchWriter(self.config.database_url, before_commit=before_commit), RawRedis(self.config.redis_url)
        )
        try:
            while True:
                batch = self._queue.get()
                if batch is None:
                    return
                self._write_and_ack(batch, out)
        except BaseException as exc:
            log.exception("ledger writer failed", extra={"action": "writer_failed"})
            self.health.failed = f"{type(exc).__name__}: {exc}"
            self._writer_error = exc
        finally:
            self._read_ack_replies(out.redis)
            out.redis.close()
            out.db.close()

    def _write_and_ack(self, batch: Batch, out: _Output) -> None:
        started = time.monotonic()
        result, ack_ids = self._write(batch, out)
        m.BATCH_SECONDS.observe(time.monotonic() - started)
        if self.config.test_pause_s and self.config.test_pause_at == "after_commit":
            self._test_pause()
        self._ack(out.redis, ack_ids)
        m.BATCH_SIZE.observe(len(batch.plan.records))
        m.EVENTS.inc(result.inserted)
        m.POSTINGS.inc(result.postings)
        m.DUPLICATES.inc(result.duplicates + batch.duplicates)
        m.QUARANTINED.inc(result.conflicts)
        m.INGEST_LAG_SECONDS.set(max(0.0, time.time() - batch.oldest_ms / 1000))

    def _write(self, batch: Batch, out: _Output) -> tuple[WriteResult, list[bytes]]:
        """Write with retries; a record the database refuses is isolated by bisection and left pending."""
        try:
            return self._write_retrying(out.db, batch.plan, batch.conflicts), batch.ack_ids
        except Exception as exc:
            if _error_kind(exc) is not DbErrorKind.ROW:
                raise
            log.warning("batch refused by the database; isolating", extra={"action": "isolate", "error": str(exc)})
        total = WriteResult()
        refused: set[bytes] = set()
        self._bisect(batch.plan.records, batch, total, refused, out)
        self._write_retrying(out.db, assemble([]), batch.conflicts)
        return total, [i for i in batch.ack_ids if i not in refused]

    def _bisect(
        self, records: list[EventRecord], batch: Batch, total: WriteResult, refused: set[bytes], out: _Output
    ) -> None:
        try:
            result = self._write_retrying(out.db, assemble(records), [])
        except Exception as exc:
            if _error_kind(exc) is not DbErrorKind.ROW:
                raise
            if len(records) == 1:
                record = records[0]
                refused.add(record.stream_id)
                kv = _raw_entry(batch.entries, record)
                reason = f"database refused the event: {str(exc).splitlines()[0]}"
                self._poison_from_writer(
                    record.stream_id, kv, reason, batch.deliveries.get(record.stream_id, 1), out.redis
                )
                return
            half = len(records) // 2
            self._bisect(records[:half], batch, total, refused, out)
            self._bisect(records[half:], batch, total, refused, out)
            return
        total.inserted += result.inserted
        total.duplicates += result.duplicates
        total.postings += result.postings

    def _poison_from_writer(
        self, stream_id: bytes, kv: list[bytes], reason: str, deliveries: int, client: RawRedis
    ) -> None:
        if deliveries >= self.config.max_deliveries:
            self._dead_letter(stream_id, kv, reason, deliveries, client)
        else:
            log.warning(
                "usage event refused; left pending",
                extra={"action": "reject", "stream_id": stream_id.decode(), "reason": reason},
            )

    def _write_retrying(self, db: BatchWriter, plan: BatchPlan, conflicts: list[Conflict]) -> WriteResult:
        if not plan.records and not conflicts:
            return WriteResult()
        if plan.entry_count > JOURNAL_ID_BLOCK:  # one id block per transaction: split the batch
            half = len(plan.records) // 2
            first = self._write_retrying(db, assemble(plan.records[:half]), conflicts)
            second = self._write_retrying(db, assemble(plan.records[half:]), [])
            first.inserted += second.inserted
            first.duplicates += second.duplicates
            first.postings += second.postings
            return first
        delay = 0.1
        deadline: float | None = None
        while True:
            try:
                return db.write(plan, conflicts)
            except Exception as exc:
                if _error_kind(exc) is not DbErrorKind.ENVIRONMENT:
                    raise
                # A fresh connection for every retry: what was fixed may only apply to new
                # sessions (default_transaction_read_only, a failover to the new primary).
                db.discard_connection()
                m.WRITE_RETRIES.inc()
                if self._stopping() and deadline is None:
                    deadline = time.monotonic() + self.config.stop_timeout_s
                if deadline is not None and time.monotonic() > deadline:
                    raise
                log.warning(
                    "database unavailable for the batch; retrying",
                    extra={"action": "write_retry", "error": str(exc).strip()[:200], "delay_s": delay,
                           "sqlstate": getattr(exc, "sqlstate", None)},
                )  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)

    def _test_pause(self) -> None:
        log.warning("test pause", extra={"action": "test_pause", "at": self.config.test_pause_at})
        time.sleep(self.config.test_pause_s)

    def _stopping(self) -> bool:
        return self._stop_requested.is_set() or (self._stop is not None and self._stop.is_set())

    def _ack(self, client: RawRedis, ids: list[bytes]) -> None:
        """XACK after COMMIT, without waiting for the reply: it is read before the connection is
        used again. Waiting would stall the next batch; an XACK that is lost only means its
        entries are delivered again, and writing them again is a no-op."""
        self._read_ack_replies(client)
        delay = 0.1
        for _ in range(50):
            try:
                for start in range(0, len(ids), 10_000):
                    client.send("XACK", self.config.stream, self.config.group, *ids[start : start + 10_000])
                return
            except (ConnectionError, OSError) as exc:
                # Not acked yet: the entries stay pending and are written again later (a no-op).
                log.warning("XACK failed; retrying", extra={"action": "ack_retry", "error": str(exc)})
                time.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
        log.error("XACK kept failing; entries stay pending and will be redelivered", extra={"action": "ack_failed"})

    @staticmethod
    def _read_ack_replies(client: RawRedis) -> None:
        while client.unread:
            try:
                client.receive()
            except RedisReplyError as exc:
                log.warning("XACK refused; its entries will be delivered again", extra={"action": "ack_refused",
                            "error": str(exc)})  # fmt: skip
            except (ConnectionError, OSError) as exc:  # the connection is closed: nothing left to read
                log.warning("XACK reply lost; its entries may be delivered again", extra={"action": "ack_lost",
                            "error": str(exc)})  # fmt: skip

    def _retry(self, fn: Any, stop: threading.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                fn()
                return
            except (ConnectionError, OSError) as exc:
                log.warning("redis unavailable at start; retrying", extra={"action": "redis_retry", "error": str(exc)})
                stop.wait(delay)
                delay = min(delay * 2, self.config.retry_max_s)


# ------------------------------------------------------------------ replay


# ingested: posted now; duplicate: already in the ledger with the same fields (no-op);
# quarantined: the id is in the ledger with other fields; still-dead: poison, left in place;
# other-stream: dead-lettered from another usage stream, left in place.
ReplayOutcomeKind = Literal["ingested", "duplicate", "quarantined", "still-dead", "other-stream"]
REPLAY_OUTCOMES: tuple[ReplayOutcomeKind, ...] = get_args(ReplayOutcomeKind)


@dataclass(frozen=True)
class ReplayOutcome:
    """What ``replay_dead`` did (or, in a dry run, would do) with one dead-letter entry."""

    dead_id: str  # its id in the dead-letter stream
    stream_id: str  # its id in the usage stream it was dead-lettered from
    event_id: str
    outcome: ReplayOutcomeKind
    reason: str = ""  # why it stays dead


_REPLAY_PAGE = 500


def replay_dead(config: WorkerConfig, *, dry_run: bool = False) -> list[ReplayOutcome]:
    """Move the dead-letter stream's entries back through the parser and the batch writer.

    One transaction per entry; an entry that is now ingested, found to be a
    duplicate, or quarantined is removed from the dead-letter stream (``XDEL``)
    after its ``COMMIT``; one that is still poison stays where it is, once, and
    its reason is reported. Idempotent: the event id makes a second write a
    no-op, so a crash between ``COMMIT`` and ``XDEL`` or a second replay changes
    nothing in the ledger. An error of the environment (database or Redis
    unavailable) stops the replay and is raised; run it again later.
    ``dry_run``: every write is rolled back and nothing is removed.
    """
    redis = RawRedis(config.redis_url)
    writer = BatchWriter(config.database_url)
    parser = Parser()
    outcomes: list[ReplayOutcome] = []
    try:
        start = "-"
        while True:
            page = redis.execute("XRANGE", config.dead_letter_stream, start, "+", "COUNT", _REPLAY_PAGE)
            for dead_id, kv in page:
                outcome = _replay_one(config, parser, writer, dead_id, kv, dry_run)
                if outcome.outcome in ("ingested", "duplicate", "quarantined") and not dry_run:
                    redis.execute("XDEL", config.dead_letter_stream, dead_id)
                outcomes.append(outcome)
            if len(page) < _REPLAY_PAGE:
                return outcomes
            start = "(" + page[-1][0].decode()
    finally:
        redis.close()
        writer.close()


def _replay_one(
    config: WorkerConfig, parser: Parser, writer: BatchWriter, dead_id: bytes, kv: list[bytes], dry_run: bool
) -> ReplayOutcome:
    meta, original = split_dead_letter(kv)
    stream_id = meta.get(b"dead_id", b"0-0")
    ids = (dead_id.decode(), stream_id.decode("utf-8", "replace"), event_id_of(original).decode("utf-8", "replace"))
    if meta.get(b"dead_stream", config.stream.encode()) != config.stream.encode():
        return ReplayOutcome(
            *ids, "other-stream", f"dead-lettered from {meta[b'dead_stream'].decode('utf-8', 'replace')}"
        )
    try:
        record = parser.parse(stream_id, original)
    except Exception as exc:  # noqa: BLE001 - poison of any kind stays dead, with its reason
        return ReplayOutcome(*ids, "still-dead", _rejection(original, exc))
    try:
        result = writer.write(assemble([record]), dry_run=dry_run)
    except Exception as exc:
        if _error_kind(exc) is not DbErrorKind.ROW:
            raise
        return ReplayOutcome(*ids, "still-dead", f"database refused the event: {str(exc).splitlines()[0]}")
    if result.inserted:
        return ReplayOutcome(*ids, "ingested")
    return ReplayOutcome(*ids, "quarantined" if result.conflicts else "duplicate")
