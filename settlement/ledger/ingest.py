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
_OUTCOMES = frozenset(o.encode() for o in OUTCOMES)
_OK = b"ok"
_UNSAFE = b"\t\n\r\\\x00"
_BIGINT_MAX = 2**63 - 1
_MONEY_DIGITS = 78
_HOUR_MS = 3_600_000
_SHAPE_CACHE_MAX = 100_000


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


@dataclass(frozen=True, slots=True)
class EventRecord:
    event_id: bytes  # canonical lower-case UUID text
    stream_id: bytes
    body: bytes  # the identity columns, tab-separated, COPY-escaped
    shape: Shape
    cost: int
    agent: str
    hour: int  # finished_at_ms // 3600000

    @property
    def line(self) -> bytes:
        """The COPY line without its trailing entry id."""
        return self.body + b"\t" + self.stream_id + b"\t"


@dataclass(frozen=True)
class Rejected:
    """An entry that can never be posted (``reason`` names the field)."""

    stream_id: bytes
    fields: dict[str, str]
    reason: str


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

    def parse(self, stream_id: bytes, kv: list[bytes]) -> EventRecord:
        """One entry (its flat ``[k1, v1, k2, v2, …]`` list) → record; raises ``PoisonEvent``."""
        values = kv[1::2] if kv[0::2] == _WIRE_KEYS else self._reorder(kv)
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
        return EventRecord(eid, stream_id, body, shape, cost, agent.decode(), hour)

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
    unposted_lines: list[bytes]  # cost-0 events: no entry

    @property
    def entry_count(self) -> int:
        return len(self.entries)

    def copy_data(self, first_entry_id: int) -> bytes:
        """The usage_events COPY text: each line ends with its entry id (``\\N`` when it cost 0)."""
        chunks: list[bytes] = []
        by_pool: dict[str, list[bytes]] = {}
        for r in self.records:
            if r.cost:
                by_pool.setdefault(r.shape.pool, []).append(r.body + b"\t" + r.stream_id + b"\t")
        for entry in self.entries:
            lines = by_pool.pop(entry.pool)
            tail = b"%d\n" % (first_entry_id + entry.entry_offset)
            chunks.append(tail.join(lines) + tail)
        invariant(not by_pool, f"events of pools {sorted(by_pool)} have no entry")
        if self.unposted_lines:
            chunks.append(b"\\N\n".join(self.unposted_lines) + b"\\N\n")
        return b"".join(chunks)

    def balance_deltas(self) -> dict[str, int]:
        deltas: dict[str, int] = {}
        for entry in self.entries:
            for account, amount in entry.postings.items():
                deltas[account] = deltas.get(account, 0) + amount
        return {a: d for a, d in sorted(deltas.items()) if d}


def assemble(records: list[EventRecord]) -> BatchPlan:
    """Aggregate a batch: per pool one entry, per account one posting; checks every entry balances."""
    totals: dict[Shape, list[int]] = {}
    counts: dict[str, int] = {}
    spend: dict[tuple[str, int], list[int]] = {}
    unposted: list[bytes] = []
    for r in records:
        key = (r.agent, r.hour)
        s = spend.get(key)
        if s is None:
            spend[key] = [r.cost, 1]
        else:
            s[0] += r.cost
            s[1] += 1
        c = r.cost
        if not c:
            unposted.append(r.body + b"\t" + r.stream_id + b"\t")
            continue
        shape = r.shape
        t = totals.get(shape)
        if t is None:
            t = totals[shape] = [0] * (3 + len(shape.contributor_bps))
        fee = c * shape.fee_bps // 10_000
        rest = c - fee
        owner = rest
        i = 3
        for bps in shape.contributor_bps:
            part = rest * bps // 10_000
            t[i] += part
            owner -= part
            i += 1
        t[0] += c
        t[1] += fee
        t[2] += owner
        counts[shape.pool] = counts.get(shape.pool, 0) + 1
    per_pool: dict[str, dict[str, int]] = {}
    for shape, t in totals.items():
        postings = per_pool.setdefault(shape.pool, {})
        lines = [(shape.payer_account, -t[0]), (shape.fee_account, t[1]), (shape.owner_account, t[2])]
        lines += list(zip(shape.contributor_accounts, t[3:], strict=True))
        for account, amount in lines:
            postings[account] = postings.get(account, 0) + amount
    entries = []
    for offset, pool in enumerate(sorted(per_pool)):
        postings = {a: v for a, v in sorted(per_pool[pool].items()) if v}
        invariant(sum(postings.values()) == 0, f"entry of pool {pool!r} sums to {sum(postings.values())}, not 0")
        entries.append(PoolEntry(pool, offset, counts[pool], postings))
    return BatchPlan(records, entries, spend, unposted)
