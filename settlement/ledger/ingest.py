"""Turning raw stream entries into one batch's rows and postings. Pure: no I/O.

The worker's hot path. ``Parser.parse`` checks one entry exactly as
``UsageEvent.from_fields`` does (same rules, same field names in errors) and
returns an ``EventRecord`` holding the event's ``COPY`` line, built from the
raw field bytes without decoding them. ``assemble`` aggregates a batch's
records into one journal entry per pool with one posting per account, sums
the per-hour spend per agent, and groups the ``COPY`` lines by entry.
Aggregation sums each event's own split (never splits a sum), so every
amount is exactly the sum of the per-event amounts ``split.event_postings``
gives; the property tests pin that.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import PoisonEvent, invariant
from openledger.wire import (
    OUTCOMES,
    USAGE_EVENT_FIELD,
    USAGE_FIELDS,
    USAGE_SNAPSHOT_FIELDS,
    UsageEvent,
    unpack_usage_values,
)

_WIRE_KEYS = [f.encode() for f in USAGE_FIELDS]
PACKED_FIELD = USAGE_EVENT_FIELD.encode()
_OPTIONAL_DEFAULTS = {b"contributors": b"", b"pool": b"", b"fee_bps": b"0", b"extra": b""}
# Columns that define "the same event" (everything the producer sent), in line order.
IDENTITY_COLUMNS: tuple[str, ...] = tuple("event_id" if f == "id" else f for f in USAGE_FIELDS)
COPY_COLUMNS: tuple[str, ...] = (*IDENTITY_COLUMNS, "stream_id", "entry_id")

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = b"0123456789abcdef"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_POOL = re.compile(r"(?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?")
_OUTCOMES = frozenset(o.encode() for o in OUTCOMES)
_OK = b"ok"
_UNSAFE = b"\t\n\r\\\x00"
_BIGINT_MAX = 2**63 - 1
_MONEY_DIGITS = 78
_HOUR_MS = 3_600_000
_SHAPE_CACHE_MAX = 100_000
_LAST = len(USAGE_FIELDS) - 1  # tabs in a line
_REQUEST_VALUES = len(USAGE_FIELDS) - USAGE_SNAPSHOT_FIELDS
_ID = USAGE_FIELDS.index("id")
_FEE_BPS = USAGE_FIELDS.index("fee_bps")
_new_record = tuple.__new__


@dataclass(frozen=True, eq=False, slots=True)
class Shape:
    """Everything about an event's split except its cost; cached, identity-hashed."""

    pool: str
    fee_bps: int
    payer_account: str
    fee_account: str
    owner_account: str
    contributor_accounts: tuple[str, ...]
    contributor_bps: tuple[int, ...]


class EventRecord(NamedTuple):
    """One checked event (a tuple: built tens of thousands of times a second)."""

    event_id: bytes  # canonical lower-case UUID text
    stream_id: bytes
    body: bytes  # the identity columns, tab-separated, COPY-escaped
    shape: Shape
    cost: int
    agent: str  # one object per agent (interned by the parser), so hashing it is free
    hour: int  # finished_at_ms // 3600000


@dataclass(frozen=True)
class Conflict:
    """Same event id as an earlier entry, different fields: quarantined, never posted."""

    event_id: str
    stream_id: str
    fields: dict[str, str]
    reason: str

    @property
    def fields_sha256(self) -> str:
        return fields_digest(self.fields)


def fields_digest(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_kv(fields: Mapping[str, str]) -> list[bytes]:
    """A stream entry given as a ``dict`` → the flat ``[k1, v1, …]`` list Redis replies with."""
    return [x.encode() for item in fields.items() for x in item]


def record_fields(record: EventRecord) -> dict[str, str]:
    """The named values of a checked record, from its COPY body (which is the packed wire form)."""
    return unpack_usage_values(record.body.decode("utf-8", "replace"))


def copy_escape(value: bytes) -> bytes:
    """PostgreSQL COPY text format escaping."""
    return value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _digits(value: bytes, name: str, max_digits: int) -> int:
    if not value.isdigit() or len(value) > max_digits:
        text = value[:40].decode("utf-8", "replace")
        if value[:1] == b"-" and value[1:].isdigit():
            raise PoisonEvent(f"usage event: field {name!r} is negative")
        raise PoisonEvent(
            f"usage event: field {name!r} is not a non-negative integer of at most {max_digits} digits: {text!r}"
        )
    return int(value)


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise PoisonEvent(f"usage event: field {name!r} is not valid UTF-8 (byte {exc.start})") from None


def _check_utf8(values: list[bytes], names: tuple[str, ...] = USAGE_FIELDS) -> None:
    """Raise ``PoisonEvent`` naming the first value that is not UTF-8 (PostgreSQL would refuse it)."""
    if b"".join(values).isascii():
        return
    for name, value in zip(names, values, strict=False):
        _text(value, name)


def _unpack(packed: bytes) -> list[bytes]:
    """The raw values of a packed entry that needs the precise path (escapes, wrong count)."""
    try:
        named = unpack_usage_values(packed.decode())
    except UnicodeDecodeError:
        values = packed.split(b"\t")
        if len(values) == len(USAGE_FIELDS):  # name the value when the tabs are where they belong
            _check_utf8(values)
        raise PoisonEvent(f"usage event: field {USAGE_EVENT_FIELD!r} is not valid UTF-8") from None
    except ValueError as exc:
        raise PoisonEvent(str(exc)) from None
    return [named[name].encode() for name in USAGE_FIELDS]


def _check_outcome(outcome: bytes) -> None:
    if outcome not in _OUTCOMES:
        got = outcome[:20].decode("utf-8", "replace")
        raise PoisonEvent(f"usage event: field 'outcome' must be one of {OUTCOMES}, got {got!r}")


def _check_decimals(decimals: bytes) -> None:
    if _digits(decimals, "decimals", 3) > 255:
        raise PoisonEvent("usage event: field 'decimals' is larger than 255")


def _prices(per_request: bytes, per_input: bytes, per_output: bytes) -> tuple[int, int, int]:
    return (
        _digits(per_request, "per_request", _MONEY_DIGITS),
        _digits(per_input, "per_input_token", _MONEY_DIGITS),
        _digits(per_output, "per_output_token", _MONEY_DIGITS),
    )


def _bigint(value: bytes, name: str) -> int:
    number = _digits(value, name, 19)
    if number > _BIGINT_MAX:
        raise PoisonEvent(f"usage event: field {name!r} is larger than {_BIGINT_MAX}")
    return number


class Parser:
    """Parses raw stream entries; caches checked snapshots and split shapes (bounded)."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[bytes, ...], Shape] = {}
        self._agents: dict[str, str] = {}
        # the snapshot prefix of a line -> (shape, agent, the three prices, whether the outcome is charged)
        self._snapshots: dict[bytes, tuple[Shape, str, int, int, int, bool]] = {}

    def parse(self, stream_id: bytes, kv: list[bytes]) -> EventRecord:
        """One entry (its flat ``[k1, v1, k2, v2, …]`` list) → record; raises ``PoisonEvent``.

        The fast path takes a packed entry's value as the COPY line as it is,
        splits off the seven per-request values in one call, checks them with
        a few C-level byte operations, and looks the snapshot prefix (agent,
        accounts, price, shares, outcome) up among the snapshots already
        checked. Anything unusual takes the precise path, which names the
        offending field.
        """
        if len(kv) == 2 and kv[0] == PACKED_FIELD:
            body = kv[1]
            if 92 in body or 10 in body or 13 in body or 0 in body:  # backslash, LF, CR, NUL
                return self._parse_precisely(stream_id, _unpack(body))
        else:  # the first wire format: one stream field per value
            values = kv[1::2] if kv[0::2] == _WIRE_KEYS else self._reorder(kv)
            body = b"\t".join(values)
            if body.count(b"\t") != _LAST or 92 in body or 10 in body or 13 in body or 0 in body:
                return self._parse_precisely(stream_id, values)
        parts = body.rsplit(b"\t", _REQUEST_VALUES)
        if len(parts) != _REQUEST_VALUES + 1:
            return self._parse_precisely(stream_id, _unpack(body))
        snapshot, eid, tin, tout, cost_b, started, finished, extra = parts
        if not (
            len(eid) == 36
            and eid.translate(None, _HEX) == b"----"
            and eid[8] == eid[13] == eid[18] == eid[23] == 45  # "-"
            and not extra
            and 0 < len(tin) < 19
            and 0 < len(tout) < 19
            and 0 < len(cost_b) <= _MONEY_DIGITS
            and 0 < len(started) < 19
            and 0 < len(finished) < 19
            and b"".join(parts[2:7]).isdigit()
        ):
            return self._parse_precisely(stream_id, _unpack(body))
        cached = self._snapshots.get(snapshot)
        if cached is None:
            cached = self._check_snapshot(snapshot)
            if cached is None:  # not the snapshot's number of values
                return self._parse_precisely(stream_id, _unpack(body))
        shape, agent, per_request, per_input, per_output, charged = cached
        cost = int(cost_b)
        if cost != ((per_request + int(tin) * per_input + int(tout) * per_output) if charged else 0):
            return self._parse_precisely(stream_id, _unpack(body))
        return _new_record(EventRecord, (eid, stream_id, body, shape, cost, agent, int(finished) // _HOUR_MS))

    def _check_snapshot(self, snapshot: bytes) -> tuple[Shape, str, int, int, int, bool] | None:
        """Check a snapshot prefix once and cache it; ``None`` when it has the wrong number of values."""
        values = snapshot.split(b"\t")
        if len(values) != USAGE_SNAPSHOT_FIELDS:
            return None
        _check_utf8(values)
        (agent, payer, _model, owner, _token, decimals, per_request, per_input, per_output, contributors, pool,
         fee_bps, outcome) = values  # fmt: skip
        _check_outcome(outcome)
        _check_decimals(decimals)
        prices = _prices(per_request, per_input, per_output)
        shape = self._shape(payer, owner, pool, fee_bps, contributors)
        if len(self._snapshots) >= _SHAPE_CACHE_MAX:
            self._snapshots.clear()
        cached = self._snapshots[snapshot] = (shape, self._agent(agent), *prices, outcome == _OK)
        return cached

    def _agent(self, agent: bytes) -> str:
        if not agent:
            raise PoisonEvent("usage event: field 'agent' is empty")
        name = _text(agent, "agent")
        if len(self._agents) >= _SHAPE_CACHE_MAX:
            self._agents.clear()
        return self._agents.setdefault(name, name)

    def _parse_precisely(self, stream_id: bytes, values: list[bytes]) -> EventRecord:
        """Every check, in field order, on unescaped values in ``USAGE_FIELDS`` order."""
        (agent, payer, _model, owner, _token, decimals, per_req, per_in, per_out, contributors, pool, fee_bps,
         outcome, eid, tok_in, tok_out, cost_b, started, finished, extra) = values  # fmt: skip
        _check_utf8(values)
        eid = eid.lower()
        if not _UUID.fullmatch(eid):
            raise PoisonEvent(f"usage event: field 'id' is not a UUID: {eid[:40].decode('utf-8', 'replace')!r}")
        _check_outcome(outcome)
        _check_decimals(decimals)
        n_in = _bigint(tok_in, "input_tokens")
        n_out = _bigint(tok_out, "output_tokens")
        cost = _digits(cost_b, "cost", _MONEY_DIGITS)
        per_request, per_input, per_output = _prices(per_req, per_in, per_out)
        expected = (per_request + n_in * per_input + n_out * per_output) if outcome == _OK else 0
        if cost != expected:
            raise PoisonEvent(f"usage event: field 'cost' is {cost}, the price snapshot and tokens say {expected}")
        _bigint(started, "started_at_ms")
        hour = _bigint(finished, "finished_at_ms") // _HOUR_MS
        if extra:
            try:
                json.loads(extra)
            except ValueError:
                raise PoisonEvent("usage event: field 'extra' is not JSON") from None
        agent_name = self._agent(agent)
        shape = self._shape(payer, owner, pool, fee_bps, contributors)
        values[_ID] = eid
        body = b"\t".join(values)
        if len(body.translate(None, _UNSAFE)) != len(body) - _LAST:
            body = self._escaped(values)
        return EventRecord(eid, stream_id, body, shape, cost, agent_name, hour)

    def _reorder(self, kv: list[bytes]) -> list[bytes]:
        fields = dict(zip(kv[0::2], kv[1::2], strict=False))
        values = []
        for key in _WIRE_KEYS:
            value = fields.get(key, _OPTIONAL_DEFAULTS.get(key))
            if value is None:
                raise PoisonEvent(f"usage event: missing field {key.decode()!r}")
            values.append(value)
        if not values[_FEE_BPS]:
            values[_FEE_BPS] = b"0"
        return values

    @staticmethod
    def _escaped(values: list[bytes]) -> bytes:
        for name, value in zip(USAGE_FIELDS, values, strict=True):
            if b"\x00" in value:
                raise PoisonEvent(f"usage event: field {name!r} contains a NUL byte")
        return b"\t".join(copy_escape(v) for v in values)

    def _shape(self, payer_b: bytes, owner_b: bytes, pool_b: bytes, fee_b: bytes, contributors_b: bytes) -> Shape:
        key = (payer_b, owner_b, pool_b, fee_b, contributors_b)
        cached = self._shapes.get(key)
        if cached is not None:
            return cached
        payer, owner, pool = _text(payer_b, "payer"), _text(owner_b, "owner"), _text(pool_b, "pool")
        for name, address in (("payer", payer), ("owner", owner)):
            if not _ADDRESS.fullmatch(address):
                raise PoisonEvent(f"usage event: field {name!r} is not an address (0x + 40 hex): {address[:50]!r}")
        if not _POOL.fullmatch(pool):
            raise PoisonEvent(f"usage event: field 'pool' is not '' or 'namespace/name': {pool[:80]!r}")
        fee_bps = _digits(fee_b, "fee_bps", 5)
        accounts: list[str] = []
        shares: list[int] = []
        for part in filter(None, _text(contributors_b, "contributors").split(",")):
            pieces = part.split(":")
            if len(pieces) != 3 or not pieces[1].isdigit() or not _ADDRESS.fullmatch(pieces[0]):
                raise PoisonEvent(f"usage event: field 'contributors' is malformed: {part[:60]!r}")
            accounts.append(sp.contributor_account(pieces[0]))
            shares.append(int(pieces[1]))
        # The split takes the fee first, then the shares of the rest: each is bounded on its own.
        if fee_bps > sp.BPS:
            raise PoisonEvent("usage event: field 'fee_bps' is more than 10000 bps")
        if sum(shares) > sp.BPS:
            raise PoisonEvent("usage event: field 'contributors' shares more than 10000 bps")
        shape = Shape(
            pool=pool,
            fee_bps=fee_bps,
            payer_account=sp.agent_account(payer),
            fee_account=sp.fee_account(pool),
            owner_account=sp.owner_account(owner),
            contributor_accounts=tuple(accounts),
            contributor_bps=tuple(shares),
        )
        if len(self._shapes) >= _SHAPE_CACHE_MAX:
            self._shapes.clear()
        self._shapes[key] = shape
        return shape


def parse_event(fields: dict[str, str]) -> EventRecord:
    """Convenience for tests and tools: one entry given as a ``dict``."""
    return Parser().parse(b"0-0", entry_kv(fields))


def event_id_of(kv: list[bytes]) -> bytes:
    """The event id of a raw stream entry in either wire format, unchecked (``b""`` when absent)."""
    if len(kv) == 2 and kv[0] == PACKED_FIELD:
        values = kv[1].split(b"\t")
        return values[_ID] if len(values) == len(USAGE_FIELDS) else b""
    fields = dict(zip(kv[0::2], kv[1::2], strict=False))
    return fields.get(b"id", b"")


# Fields the worker puts in front of the original ones when it dead-letters an entry.
DEAD_LETTER_KEYS = (b"dead_stream", b"dead_id", b"dead_reason", b"dead_deliveries", b"dead_consumer")


def dead_letter_fields(
    stream: str, stream_id: bytes, reason: str, deliveries: int, consumer: str, kv: list[bytes]
) -> list[bytes]:
    """The flat field list of a dead-letter entry: where it came from and why, then the entry as it was sent."""
    meta = [stream.encode(), stream_id, reason.encode(), b"%d" % deliveries, consumer.encode()]
    return [x for pair in zip(DEAD_LETTER_KEYS, meta, strict=True) for x in pair] + list(kv)


def split_dead_letter(kv: list[bytes]) -> tuple[dict[bytes, bytes], list[bytes]]:
    """A dead-letter entry → (its ``dead_*`` fields, the original entry's flat field list)."""
    meta: dict[bytes, bytes] = {}
    original: list[bytes] = []
    for key, value in zip(kv[0::2], kv[1::2], strict=False):
        if key in DEAD_LETTER_KEYS:
            meta[key] = value
        else:
            original += (key, value)
    return meta, original


def explain_rejection(kv: list[bytes], error: Exception) -> str:
    """The clearest reason: ``UsageEvent.from_fields``'s own message when it also rejects the entry."""
    try:
        UsageEvent.from_fields(dict(zip(kv[0::2], kv[1::2], strict=False)))
    except UnicodeDecodeError:
        return str(error)  # ours names the field; the codec's message does not
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - a reason must never crash the worker: keep the parser's
        return str(error)
    return str(error)


# ------------------------------------------------------------------ assembly


@dataclass
class PoolEntry:
    """One journal entry of a batch: a pool's events and their aggregated postings."""

    pool: str
    entry_offset: int  # entry id = the batch's first id + offset
    event_count: int = 0
    postings: dict[str, int] = field(default_factory=dict)

    @property
    def amount(self) -> int:
        """Sum of the credits."""
        return sum(a for a in self.postings.values() if a > 0)


_TAB = b"\t"
_NO_ENTRY = b"\t\\N\n"


@dataclass
class BatchPlan:
    """What one transaction writes, given the batch's first journal id."""

    records: list[EventRecord]
    entries: list[PoolEntry]  # ordered by pool; only pools with a non-zero posting
    spend: dict[tuple[str, int], list[int]]  # (agent, hour) -> [amount, events]
    pool_lines: dict[str, list[bytes]]  # pool -> COPY lines of its posted events, without the entry id
    unposted_lines: list[bytes]  # cost-0 events: no entry

    @property
    def entry_count(self) -> int:
        return len(self.entries)

    def copy_data(self, first_entry_id: int) -> bytes:
        """The usage_events COPY text: each line ends with its entry id (``\\N`` when it cost 0).

        One ``join`` per pool, so the writer spends a memory copy on it, nothing per event."""
        chunks: list[bytes] = []
        invariant(len(self.pool_lines) == len(self.entries), "every pool with events has one entry")
        for entry in self.entries:
            tail = b"\t%d\n" % (first_entry_id + entry.entry_offset)
            chunks += (tail.join(self.pool_lines[entry.pool]), tail)
        if self.unposted_lines:
            chunks += (_NO_ENTRY.join(self.unposted_lines), _NO_ENTRY)
        return b"".join(chunks)

    def balance_deltas(self) -> dict[str, int]:
        deltas: dict[str, int] = {}
        for entry in self.entries:
            for account, amount in entry.postings.items():
                deltas[account] = deltas.get(account, 0) + amount
        return {a: d for a, d in sorted(deltas.items()) if d}


def _lines(bodies: list[bytes], stream_ids: list[bytes]) -> list[bytes]:
    """``body TAB stream_id`` per event, without a Python loop."""
    return list(map(_TAB.join, zip(bodies, stream_ids, strict=True)))


# A BatchBuilder row, per shape: the sums of its events, then their COPY bodies and stream ids.
_COST, _FEE, _OWNER, _EVENTS, _BODIES, _STREAM_IDS, _CONTRIBUTORS = range(7)


class BatchBuilder:
    """Accumulates records as the reader parses them (one pass), then ``plan()``.

    Per split shape it sums the cost, the fee, the owner's and each
    contributor's amounts of every event (each event split on its own) and
    keeps the event's COPY body and stream id; per agent and hour, the spend.
    """

    __slots__ = ("_shapes", "_spend", "_unposted", "records")

    def __init__(self) -> None:
        self.records: list[EventRecord] = []
        # shape -> [cost, fee, owner, events, bodies, stream ids, contributor 1, contributor 2, …]
        self._shapes: dict[Shape, list[Any]] = {}
        self._spend: dict[tuple[str, int], list[int]] = {}
        self._unposted: tuple[list[bytes], list[bytes]] = ([], [])

    def add(self, record: EventRecord) -> None:
        self.records.append(record)
        _eid, sid, body, shape, c, agent, hour = record
        s = self._spend.get((agent, hour))
        if s is None:
            self._spend[(agent, hour)] = [c, 1]
        else:
            s[0] += c
            s[1] += 1
        if not c:
            self._unposted[0].append(body)
            self._unposted[1].append(sid)
            return
        t = self._shapes.get(shape)
        if t is None:
            t = self._shapes[shape] = [0, 0, 0, 0, [], [], *([0] * len(shape.contributor_bps))]
        fee = c * shape.fee_bps // 10_000
        rest = c - fee
        # Literal indices (see _COST…): this runs once per event.
        t[0] += c
        t[1] += fee
        t[3] += 1
        t[4].append(body)
        t[5].append(sid)
        owner = rest
        if shape.contributor_bps:
            i = 6
            for bps in shape.contributor_bps:
                part = rest * bps // 10_000
                t[i] += part
                owner -= part
                i += 1
        t[2] += owner

    def plan(self) -> BatchPlan:
        """Per pool one entry, per account one posting; checks that every entry balances."""
        per_pool: dict[str, dict[str, int]] = {}
        counts: dict[str, int] = {}
        pool_rows: dict[str, tuple[list[bytes], list[bytes]]] = {}
        for shape, t in self._shapes.items():
            postings = per_pool.setdefault(shape.pool, {})
            lines = [(shape.payer_account, -t[_COST]), (shape.fee_account, t[_FEE]), (shape.owner_account, t[_OWNER])]
            lines += list(zip(shape.contributor_accounts, t[_CONTRIBUTORS:], strict=True))
            for account, amount in lines:
                postings[account] = postings.get(account, 0) + amount
            counts[shape.pool] = counts.get(shape.pool, 0) + t[_EVENTS]
            bodies, stream_ids = pool_rows.setdefault(shape.pool, ([], []))
            bodies.extend(t[_BODIES])
            stream_ids.extend(t[_STREAM_IDS])
        entries = []
        for offset, pool in enumerate(sorted(per_pool)):
            postings = {a: v for a, v in sorted(per_pool[pool].items()) if v}
            invariant(sum(postings.values()) == 0, f"entry of pool {pool!r} sums to {sum(postings.values())}, not 0")
            entries.append(PoolEntry(pool, offset, counts[pool], postings))
        pool_lines = {pool: _lines(*rows) for pool, rows in pool_rows.items()}
        return BatchPlan(self.records, entries, self._spend, pool_lines, _lines(*self._unposted))


def assemble(records: list[EventRecord]) -> BatchPlan:
    """The plan of a list of records (what the reader builds incrementally)."""
    builder = BatchBuilder()
    for record in records:
        builder.add(record)
    return builder.plan()
