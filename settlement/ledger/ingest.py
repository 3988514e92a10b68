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
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import PoisonEvent, invariant
from openledger.wire import OUTCOMES, UsageEvent

# The wire fields in UsageEvent.to_fields order; the COPY column order follows it.
WIRE_FIELDS: tuple[str, ...] = (
    "id",
    "agent",
    "payer",
    "model",
    "owner",
    "token",
    "decimals",
    "per_request",
    "per_input_token",
    "per_output_token",
    "input_tokens",
    "output_tokens",
    "cost",
    "outcome",
    "started_at_ms",
    "finished_at_ms",
    "contributors",
    "pool",
    "fee_bps",
    "extra",
)
_WIRE_KEYS = [f.encode() for f in WIRE_FIELDS]
_OPTIONAL_DEFAULTS = {b"contributors": b"", b"pool": b"", b"fee_bps": b"0", b"extra": b""}
COPY_COLUMNS: tuple[str, ...] = ("event_id", *WIRE_FIELDS[1:], "stream_id", "entry_id")
# Columns that define "the same event" (everything the producer sent).
IDENTITY_COLUMNS: tuple[str, ...] = ("event_id", *WIRE_FIELDS[1:])

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_POOL = re.compile(r"(?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?")
_OUTCOMES = frozenset(o.encode() for o in OUTCOMES)
_OK = b"ok"
_UNSAFE = b"\t\n\r\\\x00"
_BIGINT_MAX = 2**63 - 1
_MONEY_DIGITS = 78
_HOUR_MS = 3_600_000
_SHAPE_CACHE_MAX = 100_000
# The fast path checks, with one regular expression over them joined by "|": the id
# (canonical lower-case UUID), then decimals, per_request, per_input_token,
# per_output_token, input_tokens, output_tokens, cost, started_at_ms, finished_at_ms,
# fee_bps as plain digits of bounded length (18 for BIGINT columns, so no overflow
# check is needed), and an empty ``extra``. Anything else takes the precise path.
_fast_checked = itemgetter(0, 6, 7, 8, 9, 10, 11, 12, 14, 15, 18, 19)
_FAST = re.compile(
    rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    rb"\|\d{1,2}\|\d{1,78}\|\d{1,78}\|\d{1,78}\|\d{1,18}\|\d{1,18}\|\d{1,78}\|\d{1,18}\|\d{1,18}\|\d{1,5}\|"
)
_new_record = tuple.__new__


@dataclass(frozen=True, eq=False)
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
    agent: bytes
    hour: int  # finished_at_ms // 3600000

    @property
    def line(self) -> bytes:
        """The COPY line without its trailing entry id."""
        return self.body + b"\t" + self.stream_id + b"\t"


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


def decode_fields(kv: list[bytes]) -> dict[str, str]:
    return {kv[i].decode("utf-8", "replace"): kv[i + 1].decode("utf-8", "replace") for i in range(0, len(kv) - 1, 2)}


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


def _bigint(value: bytes, name: str) -> int:
    number = _digits(value, name, 19)
    if number > _BIGINT_MAX:
        raise PoisonEvent(f"usage event: field {name!r} is larger than {_BIGINT_MAX}")
    return number


class Parser:
    """Parses raw stream entries; caches split shapes across batches (bounded)."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[bytes, bytes, bytes, bytes, bytes], Shape] = {}
        # (payer, owner, pool, fee_bps, contributors, three prices) -> (shape, prices as ints)
        self._cache: dict[tuple[bytes, ...], tuple[Shape, int, int, int]] = {}

    def parse(self, stream_id: bytes, kv: list[bytes]) -> EventRecord:
        """One entry (its flat ``[k1, v1, k2, v2, …]`` list) → record; raises ``PoisonEvent``.

        The fast path checks all ten integer fields with one regular expression
        and caches price and split shapes; anything unusual takes the precise
        path, which names the offending field.
        """
        values = kv[1::2] if kv[0::2] == _WIRE_KEYS else self._reorder(kv)
        outcome = values[13]
        if _FAST.fullmatch(b"|".join(_fast_checked(values))) is None or outcome not in _OUTCOMES or not values[1]:
            return self._parse_precisely(stream_id, values)
        key = (values[2], values[4], values[17], values[18], values[16], values[7], values[8], values[9])
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache_shape(key)
        shape, per_request, per_input, per_output = cached
        cost = int(values[12])
        if cost != (
            (per_request + int(values[10]) * per_input + int(values[11]) * per_output) if outcome == _OK else 0
        ):
            return self._parse_precisely(stream_id, values)
        # Every other field is checked above or by the shape cache; these three are free text.
        text = values[1] + values[3] + values[5]
        if b"\t" in text or b"\\" in text or b"\n" in text or b"\r" in text or b"\x00" in text:
            return self._parse_precisely(stream_id, values)
        body = b"\t".join(values)
        return _new_record(
            EventRecord, (values[0], stream_id, body, shape, cost, values[1], int(values[15]) // _HOUR_MS)
        )

    def _cache_shape(self, key: tuple[bytes, ...]) -> tuple[Shape, int, int, int]:
        payer, owner, pool, fee_bps, contributors = key[:5]
        shape = self._shapes.get((payer, owner, pool, fee_bps, contributors))
        if shape is None:
            shape = self._shape(payer, owner, pool, fee_bps, contributors)
        if len(self._cache) >= _SHAPE_CACHE_MAX:
            self._cache.clear()
        cached = self._cache[key] = (shape, int(key[5]), int(key[6]), int(key[7]))
        return cached

    def _parse_precisely(self, stream_id: bytes, values: list[bytes]) -> EventRecord:
        (eid, agent, payer, _model, owner, _token, decimals, per_req, per_in, per_out, tok_in, tok_out, cost_b, outcome,
         started, finished, contributors, pool, fee_bps, extra) = values  # fmt: skip
        eid = eid.lower()
        if not _UUID.fullmatch(eid):
            raise PoisonEvent(f"usage event: field 'id' is not a UUID: {eid[:40].decode('utf-8', 'replace')!r}")
        if outcome not in _OUTCOMES:
            got = outcome[:20].decode("utf-8", "replace")
            raise PoisonEvent(f"usage event: field 'outcome' must be one of {OUTCOMES}, got {got!r}")
        if int(_digits(decimals, "decimals", 3)) > 255:
            raise PoisonEvent("usage event: field 'decimals' is larger than 255")
        n_in = _bigint(tok_in, "input_tokens")
        n_out = _bigint(tok_out, "output_tokens")
        cost = _digits(cost_b, "cost", _MONEY_DIGITS)
        price_cost = (
            _digits(per_req, "per_request", _MONEY_DIGITS)
            + n_in * _digits(per_in, "per_input_token", _MONEY_DIGITS)
            + n_out * _digits(per_out, "per_output_token", _MONEY_DIGITS)
        )
        expected = price_cost if outcome == _OK else 0
        if cost != expected:
            raise PoisonEvent(f"usage event: field 'cost' is {cost}, the price snapshot and tokens say {expected}")
        _bigint(started, "started_at_ms")
        hour = _bigint(finished, "finished_at_ms") // _HOUR_MS
        if not agent:
            raise PoisonEvent("usage event: field 'agent' is empty")
        if extra:
            try:
                json.loads(extra)
            except ValueError:
                raise PoisonEvent("usage event: field 'extra' is not JSON") from None
        shape = self._shapes.get((payer, owner, pool, fee_bps, contributors))
        if shape is None:
            shape = self._shape(payer, owner, pool, fee_bps, contributors)
        values[0] = eid
        body = b"\t".join(values)
        if len(body.translate(None, _UNSAFE)) != len(body) - 19:
            body = self._escaped(values)
        return EventRecord(eid, stream_id, body, shape, cost, agent, hour)

    def _reorder(self, kv: list[bytes]) -> list[bytes]:
        fields = dict(zip(kv[0::2], kv[1::2], strict=False))
        values = []
        for key in _WIRE_KEYS:
            value = fields.get(key, _OPTIONAL_DEFAULTS.get(key))
            if value is None:
                raise PoisonEvent(f"usage event: missing field {key.decode()!r}")
            values.append(value)
        if not values[18]:
            values[18] = b"0"
        return values

    @staticmethod
    def _escaped(values: list[bytes]) -> bytes:
        for name, value in zip(WIRE_FIELDS, values, strict=True):
            if b"\x00" in value:
                raise PoisonEvent(f"usage event: field {name!r} contains a NUL byte")
        return b"\t".join(copy_escape(v) for v in values)

    def _shape(self, payer_b: bytes, owner_b: bytes, pool_b: bytes, fee_b: bytes, contributors_b: bytes) -> Shape:
        payer, owner, pool = payer_b.decode(), owner_b.decode(), pool_b.decode()
        for name, address in (("payer", payer), ("owner", owner)):
            if not _ADDRESS.fullmatch(address):
                raise PoisonEvent(f"usage event: field {name!r} is not an address (0x + 40 hex): {address[:50]!r}")
        if not _POOL.fullmatch(pool):
            raise PoisonEvent(f"usage event: field 'pool' is not '' or 'namespace/name': {pool[:80]!r}")
        fee_bps = _digits(fee_b, "fee_bps", 5)
        accounts: list[str] = []
        shares: list[int] = []
        for part in filter(None, contributors_b.decode().split(",")):
            pieces = part.split(":")
            if len(pieces) != 3 or not pieces[1].isdigit() or not _ADDRESS.fullmatch(pieces[0]):
                raise PoisonEvent(f"usage event: field 'contributors' is malformed: {part[:60]!r}")
            accounts.append(sp.contributor_account(pieces[0]))
            shares.append(int(pieces[1]))
        if fee_bps > sp.BPS or sum(shares) + fee_bps > sp.BPS:
            raise PoisonEvent("usage event: fields 'contributors' and 'fee_bps' share more than 10000 bps")
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
        self._shapes[(payer_b, owner_b, pool_b, fee_b, contributors_b)] = shape
        return shape


def parse_event(fields: dict[str, str]) -> EventRecord:
    """Convenience for tests and tools: one entry given as a ``dict``."""
    kv: list[bytes] = []
    for key, value in fields.items():
        kv += [key.encode(), value.encode()]
    return Parser().parse(b"0-0", kv)


def explain_rejection(kv: list[bytes], error: PoisonEvent) -> str:
    """The clearest reason: ``UsageEvent.from_fields``'s own message when it also rejects the entry."""
    try:
        UsageEvent.from_fields(dict(zip(kv[0::2], kv[1::2], strict=False)))
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
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


@dataclass
class BatchPlan:
    """What one transaction writes, given the batch's first journal id."""

    records: list[EventRecord]
    entries: list[PoolEntry]  # ordered by pool; only pools with a non-zero posting
    spend: dict[tuple[str, int], list[int]]  # (agent, hour) -> [amount, events]
    pool_lines: dict[str, list[bytes]]  # COPY lines (without entry id) of the posted events, per pool
    unposted_lines: list[bytes]  # cost-0 events: no entry

    @property
    def entry_count(self) -> int:
        return len(self.entries)

    def copy_data(self, first_entry_id: int) -> bytes:
        """The usage_events COPY text: each line ends with its entry id (``\\N`` when it cost 0)."""
        chunks: list[bytes] = []
        invariant(len(self.pool_lines) == len(self.entries), "every pool with events has one entry")
        for entry in self.entries:
            tail = b"%d\n" % (first_entry_id + entry.entry_offset)
            chunks.append(tail.join(self.pool_lines[entry.pool]) + tail)
        if self.unposted_lines:
            chunks.append(b"\\N\n".join(self.unposted_lines) + b"\\N\n")
        return b"".join(chunks)

    def balance_deltas(self) -> dict[str, int]:
        deltas: dict[str, int] = {}
        for entry in self.entries:
            for account, amount in entry.postings.items():
                deltas[account] = deltas.get(account, 0) + amount
        return {a: d for a, d in sorted(deltas.items()) if d}


class BatchBuilder:
    """Accumulates records as the reader parses them (one pass), then ``plan()``.

    Per split shape it sums the cost, the fee, the owner's and each
    contributor's amounts of every event (each event split on its own), and
    keeps the event's COPY line.
    """

    __slots__ = ("_shapes", "_spend", "_unposted", "records")

    def __init__(self) -> None:
        self.records: list[EventRecord] = []
        # shape -> [cost, fee, owner, events, lines, contributor 1, contributor 2, …]
        self._shapes: dict[Shape, list[Any]] = {}
        self._spend: dict[tuple[bytes, int], list[int]] = {}
        self._unposted: list[bytes] = []

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
            self._unposted.append(body + b"\t" + sid + b"\t")
            return
        t = self._shapes.get(shape)
        if t is None:
            t = self._shapes[shape] = [0, 0, 0, 0, [], *([0] * len(shape.contributor_bps))]
        fee = c * shape.fee_bps // 10_000
        rest = c - fee
        t[0] += c
        t[1] += fee
        t[3] += 1
        t[4].append(body + b"\t" + sid + b"\t")
        owner = rest
        if shape.contributor_bps:
            i = 5
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
        pool_lines: dict[str, list[bytes]] = {}
        for shape, t in self._shapes.items():
            postings = per_pool.setdefault(shape.pool, {})
            lines = [(shape.payer_account, -t[0]), (shape.fee_account, t[1]), (shape.owner_account, t[2])]
            lines += list(zip(shape.contributor_accounts, t[5:], strict=True))
            for account, amount in lines:
                postings[account] = postings.get(account, 0) + amount
            counts[shape.pool] = counts.get(shape.pool, 0) + t[3]
            pool_lines.setdefault(shape.pool, []).extend(t[4])
        entries = []
        for offset, pool in enumerate(sorted(per_pool)):
            postings = {a: v for a, v in sorted(per_pool[pool].items()) if v}
            invariant(sum(postings.values()) == 0, f"entry of pool {pool!r} sums to {sum(postings.values())}, not 0")
            entries.append(PoolEntry(pool, offset, counts[pool], postings))
        spend = {(a.decode(), h): v for (a, h), v in self._spend.items()}
        return BatchPlan(self.records, entries, spend, pool_lines, self._unposted)


def assemble(records: list[EventRecord]) -> BatchPlan:
    """The plan of a list of records (what the reader builds incrementally)."""
    builder = BatchBuilder()
    for record in records:
        builder.add(record)
    return builder.plan()
