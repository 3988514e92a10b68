"""Formats that cross process boundaries: Redis keys, stream names, the usage event.

The gateway writes usage events, the ledger worker reads them; the Model and
RewardPool controllers write routing records, the gateway reads them. Both sides
import this module, so the format is defined once. Money is always an ``int`` in
base units; on the wire it is a decimal string of that integer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import NewType

EventId = NewType("EventId", str)
Address = NewType("Address", str)  # "0x" + 40 hex, lower-case

USAGE_STREAM = "openledger:usage"
USAGE_DEAD_LETTER_STREAM = "openledger:usage:dead"
USAGE_CONSUMER_GROUP = "ledger"

OUTCOMES = ("ok", "upstream_error", "timeout", "cancelled")

# A usage event on the stream is one field, ``event``, holding the values of
# ``USAGE_FIELDS`` in that order, tab-separated, each escaped as in PostgreSQL's
# COPY text format (backslash, tab, newline, carriage return). One field instead
# of twenty makes XADD, XREADGROUP and the reply parsing several times cheaper,
# and the value is already the ledger's COPY line. The first
# ``USAGE_SNAPSHOT_FIELDS`` values are the snapshot (who pays, the Model's price
# and attribution, the outcome), identical across an Agent's requests to a Model,
# so a consumer can check that prefix once and cache it; the per-request values
# follow. Entries with the values as separate stream fields (the first wire
# format, any order) are still read.
USAGE_EVENT_FIELD = "event"
USAGE_FIELDS: tuple[str, ...] = (
    # the snapshot
    "agent",
    "payer",
    "model",
    "owner",
    "token",
    "decimals",
    "per_request",
    "per_input_token",
    "per_output_token",
    "contributors",
    "pool",
    "fee_bps",
    "outcome",
    # the request
    "id",
    "input_tokens",
    "output_tokens",
    "cost",
    "started_at_ms",
    "finished_at_ms",
    "extra",
)
USAGE_SNAPSHOT_FIELDS = USAGE_FIELDS.index("id")
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_UNESCAPED = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def pack_usage_values(values: list[str]) -> str:
    """The packed form of the ``USAGE_FIELDS`` values (see ``USAGE_EVENT_FIELD``)."""
    packed = "\t".join(values)
    if packed.count("\t") == len(values) - 1 and "\\" not in packed and "\n" not in packed and "\r" not in packed:
        return packed  # nothing to escape: the common case
    return "\t".join(v.translate(_ESCAPE) for v in values)


def unpack_usage_values(packed: str) -> dict[str, str]:
    """The named values of a packed usage event; raises ``ValueError`` naming what is wrong."""
    values = packed.split("\t")
    if len(values) != len(USAGE_FIELDS):
        raise ValueError(
            f"usage event: field {USAGE_EVENT_FIELD!r} has {len(values)} tab-separated values, "
            f"expected {len(USAGE_FIELDS)} ({', '.join(USAGE_FIELDS)})"
        )
    return {name: _unescape(name, value) for name, value in zip(USAGE_FIELDS, values, strict=True)}


def usage_values(fields: Mapping[str, str] | Mapping[bytes, bytes]) -> dict[str, str]:
    """The named values of a usage stream entry in either wire format (not checked)."""
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    return unpack_usage_values(f[USAGE_EVENT_FIELD]) if USAGE_EVENT_FIELD in f else f


def _unescape(name: str, value: str) -> str:
    if "\\" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        try:
            return _UNESCAPED[match.group(1)]
        except KeyError:
            raise ValueError(f"usage event: field {name!r} has an invalid escape {match.group(0)!r}") from None

    return _UNESCAPE.sub(replace, value)


def object_ref(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def model_route_key(namespace: str, name: str) -> str:
    """JSON ``ModelRoute`` written by the Model controller."""
    return f"openledger:model:{namespace}/{name}"


def model_pool_key(namespace: str, name: str) -> str:
    """JSON ``PoolBinding`` written by the RewardPool controller for each selected Model."""
    return f"openledger:model-pool:{namespace}/{name}"


@dataclass(frozen=True)
class Price:
    """A Model's price list in base units of ``token`` (``decimals`` places)."""

    token: str = "OPEN"
    decimals: int = 18
    per_request: int = 0
    per_input_token: int = 0
    per_output_token: int = 0

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        return self.per_request + input_tokens * self.per_input_token + output_tokens * self.per_output_token


@dataclass(frozen=True)
class Contributor:
    account: str
    share_bps: int
    role: str = "data"


@dataclass(frozen=True)
class ModelRoute:
    """What the gateway needs to route to, price and attribute a Model."""

    model: str  # namespace/name
    url: str  # the InferenceService URL ("" while not ready)
    protocol: str  # openai | v1 | v2
    price: Price
    owner: str
    contributors: tuple[Contributor, ...] = ()
    generation: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelRoute:
        data = json.loads(raw)
        data["price"] = Price(**data["price"])
        data["contributors"] = tuple(Contributor(**c) for c in data["contributors"])
        return cls(**data)


@dataclass(frozen=True)
class PoolBinding:
    pool: str  # namespace/name of the RewardPool that settles this Model
    fee_bps: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PoolBinding:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class UsageEvent:
    """One request that reached a model. Its id is minted at the gateway (UUIDv7).

    Everything needed to post it is snapshotted here, so the ledger never has to
    ask the cluster what the price or the shares were at the time.
    """

    event_id: str
    agent: str  # namespace/name
    payer: str  # the Agent's account (0x…)
    model: str  # namespace/name
    owner: str
    price: Price
    input_tokens: int
    output_tokens: int
    cost: int  # base units; price.cost(input_tokens, output_tokens)
    outcome: str
    started_at_ms: int
    finished_at_ms: int
    contributors: tuple[Contributor, ...] = ()
    pool: str = ""  # "" when no RewardPool selects the Model yet
    fee_bps: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def to_entry(self) -> dict[str, str]:
        """The stream entry the gateway XADDs: one field, the packed event."""
        return {USAGE_EVENT_FIELD: pack_usage_values(list(self.to_fields().values()))}

    def to_fields(self) -> dict[str, str]:
        """The named string values, in ``USAGE_FIELDS`` order (the first wire format's fields)."""
        return {
            "agent": self.agent,
            "payer": self.payer,
            "model": self.model,
            "owner": self.owner,
            "token": self.price.token,
            "decimals": str(self.price.decimals),
            "per_request": str(self.price.per_request),
            "per_input_token": str(self.price.per_input_token),
            "per_output_token": str(self.price.per_output_token),
            "contributors": ",".join(f"{c.account}:{c.share_bps}:{c.role}" for c in self.contributors),
            "pool": self.pool,
            "fee_bps": str(self.fee_bps),
            "outcome": self.outcome,
            "id": self.event_id,
            "input_tokens": str(self.input_tokens),
            "output_tokens": str(self.output_tokens),
            "cost": str(self.cost),
            "started_at_ms": str(self.started_at_ms),
            "finished_at_ms": str(self.finished_at_ms),
            "extra": json.dumps(self.extra, separators=(",", ":")) if self.extra else "",
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str] | dict[bytes, bytes]) -> UsageEvent:
        """Parse a stream entry (packed or one field per value); raises ``ValueError`` naming the bad field."""
        f = usage_values(fields)

        def text(name: str) -> str:
            if name not in f:
                raise ValueError(f"usage event: missing field {name!r}")
            return f[name]

        def integer(name: str) -> int:
            raw = text(name)
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"usage event: field {name!r} is not an integer: {raw[:40]!r}") from None
            if value < 0:
                raise ValueError(f"usage event: field {name!r} is negative")
            return value

        contributors = []
        for part in filter(None, f.get("contributors", "").split(",")):
            try:
                account, bps, role = part.split(":")
                contributors.append(Contributor(account, int(bps), role))
            except ValueError:
                raise ValueError(f"usage event: field 'contributors' is malformed: {part[:60]!r}") from None
        outcome = text("outcome")
        if outcome not in OUTCOMES:
            raise ValueError(f"usage event: field 'outcome' must be one of {OUTCOMES}, got {outcome[:20]!r}")
        price = Price(
            token=text("token"),
            decimals=integer("decimals"),
            per_request=integer("per_request"),
            per_input_token=integer("per_input_token"),
            per_output_token=integer("per_output_token"),
        )
        event = cls(
            event_id=text("id"),
            agent=text("agent"),
            payer=text("payer"),
            model=text("model"),
            owner=text("owner"),
            price=price,
            input_tokens=integer("input_tokens"),
            output_tokens=integer("output_tokens"),
            cost=integer("cost"),
            outcome=outcome,
            started_at_ms=integer("started_at_ms"),
            finished_at_ms=integer("finished_at_ms"),
            contributors=tuple(contributors),
            pool=f.get("pool", ""),
            fee_bps=integer("fee_bps") if f.get("fee_bps") else 0,
            extra=json.loads(f["extra"]) if f.get("extra") else {},
        )
        if not event.event_id:
            raise ValueError("usage event: field 'id' is empty")
        # A failed request is released, not charged: its cost is 0.
        expected = price.cost(event.input_tokens, event.output_tokens) if outcome == "ok" else 0
        if event.cost != expected:
            raise ValueError(f"usage event: field 'cost' is {event.cost}, the price snapshot and tokens say {expected}")
        # The split takes the fee first, then the shares of the rest: each is bounded on its own.
        if event.fee_bps > 10_000:
            raise ValueError("usage event: field 'fee_bps' is more than 10000 bps")
        if sum(c.share_bps for c in contributors) > 10_000:
            raise ValueError("usage event: field 'contributors' shares more than 10000 bps")
        return event
