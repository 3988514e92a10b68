"""Redis records shared by the Agent controller (writer) and the gateway (reader).

Pure: key names and the encoding of an Agent's configuration. Keys (``{a}`` is
``namespace/name`` of the Agent):

- ``openledger:apikey:<sha256 hex>`` -> ``{a}``: the only place a key maps to an Agent.
  Only the hash is stored; the key itself lives in the Agent's Secret.
- ``openledger:agent:{a}`` (hash): the configuration below, with ``version``.
- ``openledger:agent-inflight:{a}`` (zset request id -> expiry µs): concurrency slots;
  ``openledger:agent-reserved:{a}`` (hash request id -> reserved base units, plus
  field ``_total``): budget reservations of the requests in flight. Revocation leaves
  both to expire (:meth:`AgentKeys.in_flight_keys`) so requests in flight still settle.
- ``openledger:agent-spend:{a}`` (hash ``period`` -> period id, ``spent`` -> base
  units spent in that period; no TTL). Only the operator creates it, after rebuilding
  the spend from the ledger and the stream; absent = "spend unknown", and a budgeted
  admission answers 503 ``spend_restoring`` until it exists. A settle that finds it
  absent increments ``openledger:agent-spend-gen:{a}`` instead (the operator's rebuild
  uses that counter to notice settles that ran during its scan).
- ``openledger:settled:<request id>``: settle.lua's marker (with a TTL); settling is
  idempotent by it, not by the reservation's existence.
- ``openledger:idem:{a}:<sha256 of the Idempotency-Key>`` (hash, TTL): a request's
  claim (``state`` running, ``fp`` body fingerprint, ``owner`` request id), then its
  stored outcome (``state`` done, ``status``, ``ctype``, ``body``, ``event``, ``remaining``).
- ``openledger:agent-rl:{a}:req`` / ``:tok``: GCRA TATs (µs).
- ``openledger:agent-queue:{a}`` (stream): requests waiting for a slot (bounded by maxDepth).
- ``openledger:agent-stats:{a}`` (hash): counters for status (``rate_limited``…).

Every amount of money in Redis is a decimal integer string in base units (any size
below 10**78, the ledger's NUMERIC(78,0)); the Lua scripts compare and add such
strings digit by digit and never turn them into Lua numbers.
"""

from __future__ import annotations

import calendar
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "MONEY_LIMIT",
    "PERIODS",
    "AgentConfig",
    "AgentKeys",
    "apikey_key",
    "hash_api_key",
    "idempotency_key",
    "period_bounds_s",
    "period_id",
    "settled_key",
]

PERIODS = ("Hour", "Day", "Month")
ENFORCEMENTS = ("Hard", "Soft")


def hash_api_key(api_key: str) -> str:
    """SHA-256 hex of the key: what Redis stores and what the gateway looks up."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def apikey_key(key_hash: str) -> str:
    return f"openledger:apikey:{key_hash}"


@dataclass(frozen=True)
class AgentKeys:
    """Every Redis key of one Agent (``ref`` = ``namespace/name``)."""

    ref: str

    @property
    def config(self) -> str:
        return f"openledger:agent:{self.ref}"

    @property
    def inflight(self) -> str:
        return f"openledger:agent-inflight:{self.ref}"

    @property
    def reserved(self) -> str:
        return f"openledger:agent-reserved:{self.ref}"

    @property
    def spend(self) -> str:
        return f"openledger:agent-spend:{self.ref}"

    @property
    def spend_gen(self) -> str:
        return f"openledger:agent-spend-gen:{self.ref}"

    @property
    def rate_requests(self) -> str:
        return f"openledger:agent-rl:{self.ref}:req"

    @property
    def rate_tokens(self) -> str:
        return f"openledger:agent-rl:{self.ref}:tok"

    @property
    def queue(self) -> str:
        return f"openledger:agent-queue:{self.ref}"

    @property
    def stats(self) -> str:
        return f"openledger:agent-stats:{self.ref}"

    def all_static(self) -> list[str]:
        """Keys removed when the Agent is deleted.

        Not the in-flight keys (:meth:`in_flight_keys`: left to expire, so requests in
        flight still settle and are metered) nor the spend hash and its counter.
        """
        return [
            self.config,
            self.rate_requests,
            self.rate_tokens,
            self.queue,
            self.stats,
        ]

    def in_flight_keys(self) -> list[str]:
        """The concurrency slots and reservations: revocation sets a PEXPIRE on these."""
        return [self.inflight, self.reserved]


def settled_key(request_id: str) -> str:
    """settle.lua's marker of a settled request (idempotency of settle)."""
    return f"openledger:settled:{request_id}"


def idempotency_key(ref: str, client_key: str) -> str:
    """The record of one Agent's ``Idempotency-Key`` (the client's key is hashed: any bytes, bounded length)."""
    return f"openledger:idem:{ref}:{hashlib.sha256(client_key.encode()).hexdigest()}"


QUEUE_GROUP = "gateway"
MONEY_LIMIT = 10**78  # amounts are below this (the ledger's NUMERIC(78,0))


def period_id(period: str, now_s: float) -> str:
    """``Hour`` -> ``2026112514``, ``Day`` -> ``20261125``, ``Month`` -> ``202611`` (UTC)."""
    t = datetime.fromtimestamp(now_s, UTC)
    if period == "Hour":
        return t.strftime("%Y%m%d%H")
    if period == "Day":
        return t.strftime("%Y%m%d")
    if period == "Month":
        return t.strftime("%Y%m")
    raise ValueError(f"budget.period: must be one of {PERIODS}, got {period!r}")


def period_bounds_s(period: str, now_s: float) -> tuple[int, int]:
    """Start and end (exclusive) of the period containing ``now_s``, in Unix seconds."""
    t = datetime.fromtimestamp(now_s, UTC)
    if period == "Hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return int(start.timestamp()), int(start.timestamp()) + 3600
    if period == "Day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return int(start.timestamp()), int(start.timestamp()) + 86400
    if period == "Month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(t.year, t.month)[1]
        return int(start.timestamp()), int(start.timestamp()) + days * 86400
    raise ValueError(f"budget.period: must be one of {PERIODS}, got {period!r}")


@dataclass(frozen=True)
class AgentConfig:
    """An Agent's configuration as the gateway enforces it. Money in base units."""

    ref: str  # namespace/name
    account: str
    models: tuple[str, ...]  # Model names in the Agent's namespace
    requests_per_second: float = 0.0  # 0 = unlimited
    burst: int = 1
    tokens_per_minute: int = 0  # 0 = unlimited
    max_concurrency: int = 0  # 0 = unlimited
    budget_base_units: int | None = None  # None = no budget
    budget_period: str = "Day"
    budget_enforcement: str = "Hard"
    queue_max_depth: int = 0
    queue_max_wait_ms: int = 0
    priority: int = 0
    key_hash: str = ""
    version: int = 0

    @property
    def namespace(self) -> str:
        return self.ref.split("/", 1)[0]

    def __post_init__(self) -> None:
        if self.budget_base_units is not None and not 0 <= self.budget_base_units < MONEY_LIMIT:
            raise ValueError("agent config: budget must be a base-unit amount in [0, 10**78)")

    def to_fields(self) -> dict[str, str]:
        return {
            "ref": self.ref,
            "account": self.account,
            "models": ",".join(self.models),
            "rps": repr(float(self.requests_per_second)),
            "burst": str(self.burst),
            "tpm": str(self.tokens_per_minute),
            "max_concurrency": str(self.max_concurrency),
            "budget": "" if self.budget_base_units is None else str(self.budget_base_units),
            "period": self.budget_period,
            "enforcement": self.budget_enforcement,
            "queue_max_depth": str(self.queue_max_depth),
            "queue_max_wait_ms": str(self.queue_max_wait_ms),
            "priority": str(self.priority),
            "key_hash": self.key_hash,
            "version": str(self.version),
        }

    @classmethod
    def from_fields(cls, raw: dict[str, str] | dict[bytes, bytes]) -> AgentConfig:
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        try:
            return cls(
                ref=f["ref"],
                account=f["account"],
                models=tuple(m for m in f["models"].split(",") if m),
                requests_per_second=float(f["rps"]),
                burst=int(f["burst"]),
                tokens_per_minute=int(f["tpm"]),
                max_concurrency=int(f["max_concurrency"]),
                budget_base_units=int(f["budget"]) if f["budget"] else None,
                budget_period=f["period"],
                budget_enforcement=f["enforcement"],
                queue_max_depth=int(f["queue_max_depth"]),
                queue_max_wait_ms=int(f["queue_max_wait_ms"]),
                priority=int(f.get("priority", "0")),
                key_hash=f["key_hash"],
                version=int(f["version"]),
            )
        except KeyError as exc:
            raise ValueError(f"agent config: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ValueError(f"agent config: bad value: {exc}") from None
