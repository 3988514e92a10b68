"""Settling a request in Redis: ``lua/settle.lua``, the durability wait, and ``Idempotency-Key`` claims.

Not the chain (that is ``settlement/``): here a request that reached a model is charged
exactly once — settle.lua is idempotent by a per-request marker, charges even when the
reservation is gone, releases the slot, corrects the token limiter and XADDs the usage
event — and its answer waits until the event is durable by ``gateway_durability``.
Settles and releases run shielded from the request's cancellation; ``drain`` (at shutdown)
waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from openledger.gateway import metrics as m
from openledger.gateway.admission import Admission
from openledger.gateway.durability import DurabilityBarrier, NotDurable
from openledger.gateway.edge import Result
from openledger.gateway.errors import Reject, tag
from openledger.gateway.lifetimes import SETTLE_ATTEMPTS
from openledger.gateway.metering import RequestShape, actual_usage
from openledger.gateway.proxy import Upstream
from openledger.gateway.records import AgentConfig, AgentKeys, settled_key
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.scripts import IDEMPOTENCY, SETTLE, IdempotencyCode, SettleCode
from openledger.settings import Settings
from openledger.wire import ModelRoute, PoolBinding, UsageEvent

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Charge:
    """One settle.lua call: cost in base units, the token correction, the event (None: not reached)."""

    request_id: str
    cost: int
    token_delta: int
    event: UsageEvent | None
    outcome: tuple[str | bytes, ...] | None = None  # Idempotency-Key: field, value… stored with the event


@dataclass
class Claim:
    """An ``Idempotency-Key`` this request holds (``stored``: settle.lua saved its outcome)."""

    key: str
    fingerprint: str
    stored: bool = False
    kept: bool = False  # its stream was left to the journal: the claim expires (409 meanwhile), never released


@dataclass(frozen=True)
class Payer:
    """What settle.lua needs of an Agent (an ``AgentConfig``, or a journal record's copy)."""

    ref: str
    budget_period: str
    tokens_per_minute: int


class Settler:
    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        barrier: DurabilityBarrier,
        admission: Admission,
        inflight_ttl_s: float,
        settle_wait_s: float,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.barrier = barrier
        self.admission = admission
        self.stream = settings.usage_stream
        # The claim must outlive the request, queueing included, or a retry could run it twice.
        self.claim_ttl_ms = int(inflight_ttl_s * 1_000_000) // 1000
        # settle.lua's marker only has to outlive the settle retries of a live request: a day of
        # markers would fill a `noeviction` Redis (about 150 bytes per request).
        self.marker_ttl_s = math.ceil(inflight_ttl_s)
        self._settling: set[asyncio.Task[Any]] = set()
        self._settle_wait_s = settle_wait_s

    def shielded(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``work`` to its end even if the request is cancelled; ``drain`` waits for it."""
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return asyncio.shield(task)

    async def drain(self) -> None:
        if self._settling:  # a request cancelled past its grace may still be settling: let it finish
            await asyncio.wait(set(self._settling), timeout=self._settle_wait_s)

    async def settle(self, agent: AgentConfig | Payer, charge: Charge, claim: Claim | None) -> None:
        """Run settle.lua (idempotent by its marker, so a lost reply is safe to repeat)."""
        event = charge.event
        record = claim is not None and charge.outcome is not None
        outcome = charge.outcome or ()
        args: list[str | bytes | int | float] = [
            charge.request_id,
            str(charge.cost),
            self.admission.period(agent.budget_period, time.time()),
            str(self.marker_ttl_s),
            str(charge.token_delta),
            repr(agent.tokens_per_minute / 60),
            "1" if event is not None else "0",
            str(self.settings.gateway_idempotency_window_s * 1000) if record else "",
            str(len(outcome) // 2 + 2) if record else "0",
        ]
        if record and claim is not None:
            # Who may store it, and for which body: a record Redis lost mid-request is written anew.
            args.extend((*outcome, "fp", claim.fingerprint, "owner", charge.request_id))
        if event is not None:
            for k, v in event.to_entry().items():
                args.append(k)
                args.append(v)
        keys = AgentKeys(agent.ref)
        marker = settled_key(charge.request_id)
        record_key = claim.key if claim is not None else marker  # only written when `record`
        skeys = [keys.inflight, keys.reserved, keys.spend, keys.spend_gen, keys.rate_tokens, self.stream, marker,
                 record_key]  # fmt: skip
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                reply = await self.redis.evalsha(SETTLE, skeys, args)
                break
            except RedisUnavailable:
                self.admission.redis_up(False)
                if attempt == SETTLE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        self.admission.redis_up(True)
        if record and claim is not None:
            claim.stored = True
        if event is not None and SettleCode(reply[0]) is SettleCode.SETTLED:
            m.child(m.USAGE_EVENTS, event.outcome).inc()
        self.admission.released(agent.ref)

    async def durable(self, agent: AgentConfig, model_ref: str, request_id: str) -> None:
        """Wait until the usage event is durable by policy; else withhold the answer (the event stays)."""
        try:
            await self.barrier.wait()
        except NotDurable:
            m.LIMITER_REJECTIONS.labels(agent.ref, "not_durable").inc()
            msg = (
                f"usage recorded as event {request_id} but not confirmed durable; "
                "retry with the same Idempotency-Key to get the answer without a second charge"
            )
            rej = Reject(503, "usage_not_durable", msg, 1, headers=((b"x-openledger-event-id", request_id.encode()),))
            raise tag(rej, agent, model_ref) from None

    async def release_after_failure(
        self, agent: AgentConfig, request_id: str, shape: RequestShape, charge: Charge | None, claim: Claim | None
    ) -> None:
        """Settle what reached the model, release the rest (a request failed or was cancelled before settling)."""
        if charge is None or charge.event is None:
            # The model never saw it: only the slot and reservation (if admitted) to release.
            charge = Charge(request_id, 0, -shape.estimated_tokens, None)
            claim = None
        try:
            await self.settle(agent, charge, claim)
        except (RedisUnavailable, RedisError):
            log.warning(
                "release failed; the reservation expires with its ttl",
                extra={"action": "release", "request": request_id},
            )

    # ------------------------------------------------------- idempotency keys

    async def claim(self, agent: AgentConfig, claim: Claim, request_id: str) -> Result | None:
        """Claim the key (None: run the request) or return the stored outcome of its first run."""
        ttl_ms = str(self.claim_ttl_ms + agent.queue_max_wait_ms)
        try:
            reply = await self.redis.evalsha(IDEMPOTENCY, [claim.key], ["claim", claim.fingerprint, request_id, ttl_ms])
        except RedisUnavailable:
            self.admission.redis_up(False)
            raise tag(Reject(503, "redis_unavailable", "limits store unavailable", 1), agent, "-") from None
        code = IdempotencyCode(reply[0])
        if code is IdempotencyCode.CLAIMED:
            return None
        if code is IdempotencyCode.KEY_REUSED:
            msg = "Idempotency-Key: already used with a different request body; use a new key"
            raise tag(Reject(422, "idempotency_key_reused", msg, param="Idempotency-Key"), agent, "-")
        if code is IdempotencyCode.IN_PROGRESS:
            msg = "Idempotency-Key: a request with this key is still in progress; retry later"
            raise tag(Reject(409, "idempotency_in_progress", msg, 1, param="Idempotency-Key"), agent, "-")
        status, ctype, body, event_id, remaining = reply[1:6]
        await self.durable(agent, "-", event_id.decode())
        headers = [(b"x-openledger-event-id", event_id), (b"idempotent-replayed", b"true")]
        if remaining:
            headers.append((b"x-openledger-budget-remaining", remaining))
        return Result(int(status), body, ctype, headers, agent.ref, "-", 0.0)

    async def release_claim(self, claim: Claim, request_id: str) -> None:
        # Left behind, the claim expires with the in-flight ttl (a retry meanwhile gets 409).
        with contextlib.suppress(RedisUnavailable, RedisError):
            await self.redis.evalsha(IDEMPOTENCY, [claim.key], ["release", claim.fingerprint, request_id, "0"])


def charge_for(
    agent: AgentConfig,
    model_ref: str,
    model_route: ModelRoute,
    pool: PoolBinding | None,
    shape: RequestShape,
    request_id: str,
    started_ms: int,
    upstream: Upstream,
) -> Charge:
    """What settle.lua must record for this upstream result (pure)."""
    tokens_in = tokens_out = 0
    cost = 0
    if upstream.outcome == "ok":
        tokens_in, tokens_out = actual_usage(shape, _json_or_none(upstream.body))
        cost = model_route.price.cost(tokens_in, tokens_out)
    event = UsageEvent(
        event_id=request_id,
        agent=agent.ref,
        payer=agent.account,
        model=model_ref,
        owner=model_route.owner,
        price=model_route.price,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost=cost,
        outcome=upstream.outcome,
        started_at_ms=started_ms,
        finished_at_ms=time.time_ns() // 1_000_000,
        contributors=model_route.contributors,
        pool=pool.pool if pool else "",
        fee_bps=pool.fee_bps if pool else 0,
    )
    delta = (tokens_in + tokens_out) - shape.estimated_tokens
    return Charge(request_id, cost, delta, event if upstream.reached else None)


def replay_outcome(upstream: Upstream, request_id: str, remaining: str | None) -> tuple[str | bytes, ...]:
    """What an ``Idempotency-Key`` retry gets back: the first run's answer and event."""
    return ("status", str(upstream.status), "ctype", upstream.content_type, "body", upstream.body,
            "event", request_id, "remaining", remaining or "")  # fmt: skip


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
