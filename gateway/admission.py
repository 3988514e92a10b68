"""Who is calling, where to, and may they: authentication, routes, and admit.lua.

``Admission`` caches Agents (by key hash) and routes for a few seconds, then runs
``lua/admit.lua`` until the request is admitted — one EVALSHA: key still valid, config
version, spend known, GCRA for requests and tokens, a concurrency slot or a place in the
Agent's FIFO queue, and the budget reservation of the request's maximum cost. Queued
requests wait for a release on this process (``released``) or poll every 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from openledger.gateway import metrics as m
from openledger.gateway.edge import Scope, api_key
from openledger.gateway.errors import AdmissionUnknown, Reject, tag
from openledger.gateway.metering import RequestShape
from openledger.gateway.records import AgentConfig, AgentKeys, apikey_key, hash_api_key, period_bounds_s, period_id
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.scripts import ADMIT, AdmitCode
from openledger.settings import Settings
from openledger.wire import ModelRoute, PoolBinding, model_pool_key, model_route_key

log = logging.getLogger(__name__)

_Plan = tuple[list[str], tuple[str, str], tuple[str, ...]]


@dataclass
class _Cached:
    value: Any
    loaded_at: float


class Admission:
    def __init__(self, settings: Settings, redis: RedisClient, inflight_ttl_us: int) -> None:
        self.settings = settings
        self.redis = redis
        self.inflight_ttl_us = inflight_ttl_us
        self._agents: dict[str, _Cached] = {}
        self._routes: dict[str, _Cached] = {}
        self._released: dict[str, asyncio.Event] = {}
        self._queued: dict[str, int] = {}
        self._periods: dict[str, tuple[str, int]] = {}
        self._plans: dict[tuple[str, int, str], _Plan] = {}
        self._store_up: bool | None = None  # what openledger_gateway_budget_store_up says (set on change only)
        self._limits: dict[str, str] = {}  # agent -> the enforcement label its budget limit gauge carries

    def redis_up(self, up: bool) -> None:
        """Record whether the last Redis call succeeded (the gauge is written only when that changes)."""
        if up is not self._store_up:
            self._store_up = up
            m.BUDGET_STORE_UP.set(1 if up else 0)

    # ------------------------------------------------------------------ auth

    async def authenticate(self, scope: Scope) -> AgentConfig:
        key = api_key(scope)
        if key is None:
            raise Reject(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'")
        key_hash = hash_api_key(key)
        cached = self._agents.get(key_hash)
        if cached is not None and time.monotonic() - cached.loaded_at < self.settings.gateway_agent_cache_s:
            return cached.value  # type: ignore[no-any-return]
        return await self.load_agent(key_hash)

    async def load_agent(self, key_hash: str) -> AgentConfig:
        try:
            ref = await self.redis.execute("GET", apikey_key(key_hash))
            if ref is None:
                self._agents.pop(key_hash, None)
                raise Reject(401, "invalid_api_key", "invalid or revoked API key")
            raw = await self.redis.execute("HGETALL", AgentKeys(ref.decode()).config)
        except RedisUnavailable:
            self.redis_up(False)
            raise Reject(503, "redis_unavailable", "limits store unavailable", 1) from None
        self.redis_up(True)
        fields = dict(zip(raw[::2], raw[1::2], strict=True)) if raw else {}
        if not fields:
            raise Reject(401, "invalid_api_key", "invalid or revoked API key")
        try:
            agent = AgentConfig.from_fields(fields)
        except ValueError as exc:
            log.error("unusable agent config", extra={"action": "auth", "agent": fields.get(b"ref"), "error": str(exc)})
            raise Reject(
                503, "agent_config_invalid", "this agent's configuration is not usable; see gateway logs"
            ) from None
        if not hmac.compare_digest(agent.key_hash.encode(), key_hash.encode()):
            raise Reject(401, "invalid_api_key", "invalid or revoked API key")
        self._agents[key_hash] = _Cached(agent, time.monotonic())
        self._budget_limit(agent)
        return agent

    def _budget_limit(self, agent: AgentConfig) -> None:
        """Publish the Agent's budget limit by enforcement; drop the series a change of either left behind."""
        old = self._limits.pop(agent.ref, None)
        if old is not None and (agent.budget_base_units is None or old != agent.budget_enforcement):
            m.BUDGET_LIMIT.remove(agent.ref, old)
        if agent.budget_base_units is not None:
            self._limits[agent.ref] = agent.budget_enforcement
            m.BUDGET_LIMIT.labels(agent.ref, agent.budget_enforcement).set(agent.budget_base_units)

    # ---------------------------------------------------------------- routes

    async def route(self, model_ref: str) -> tuple[ModelRoute | None, PoolBinding | None]:
        cached = self._routes.get(model_ref)
        if cached is not None and time.monotonic() - cached.loaded_at < self.settings.gateway_route_cache_s:
            return cached.value  # type: ignore[no-any-return]
        ns, name = model_ref.split("/", 1)
        try:
            raw_route, raw_pool = await asyncio.gather(
                self.redis.execute("GET", model_route_key(ns, name)),
                self.redis.execute("GET", model_pool_key(ns, name)),
            )
        except RedisUnavailable:
            self.redis_up(False)
            if cached is not None:
                return cached.value  # type: ignore[no-any-return]
            raise Reject(503, "redis_unavailable", "routing store unavailable", 1) from None
        self.redis_up(True)
        value = (
            ModelRoute.from_json(raw_route) if raw_route else None,
            PoolBinding.from_json(raw_pool) if raw_pool else None,
        )
        self._routes[model_ref] = _Cached(value, time.monotonic())
        return value

    # ------------------------------------------------------------- admission

    async def admit(
        self, agent: AgentConfig, model_ref: str, request_id: str, shape: RequestShape, reserve: int
    ) -> tuple[str | None, list[Any]]:
        """Run admit.lua until admitted (queueing if saturated); returns base units left (None: no budget)
        and admit.lua's reply.

        Raises ``AdmissionUnknown`` when Redis failed mid-call (the caller releases), ``Reject`` otherwise.
        """
        queue_entry = ""
        queued_at = 0.0
        deadline = 0.0
        for _ in range(3):  # a stale config is reloaded at most twice
            try:
                while True:
                    reply = await self._admit_once(agent, request_id, shape, reserve, queue_entry)
                    code = AdmitCode(reply[0])
                    if code is AdmitCode.ADMITTED:
                        if queue_entry:
                            m.QUEUE_WAIT.observe(time.monotonic() - queued_at)
                            self._queue_gauge(agent.ref, -1)
                        remaining = reply[1].decode() if reply[1] else None
                        if remaining is not None:
                            m.child(m.BUDGET_REMAINING, agent.ref).set(int(remaining))
                        return remaining, reply
                    if code is AdmitCode.QUEUED:
                        queue_entry = reply[1].decode()
                        queued_at = time.monotonic()
                        deadline = queued_at + agent.queue_max_wait_ms / 1000
                        self._queue_gauge(agent.ref, +1)
                    if code in (AdmitCode.QUEUED, AdmitCode.WAITING):
                        if time.monotonic() >= deadline:
                            await self._leave_queue(agent, queue_entry)
                            _reject_metric(agent, "queue_timeout")
                            msg = f"queued {agent.queue_max_wait_ms / 1000:g} s without a free slot"
                            raise tag(Reject(429, "queue_timeout", msg, 1), agent, model_ref)
                        await self._wait_release(agent.ref, min(0.05, max(0.0, deadline - time.monotonic())))
                        continue
                    if queue_entry:
                        self._queue_gauge(agent.ref, -1)
                        queue_entry = ""
                    if code is AdmitCode.STALE_CONFIG:
                        agent = await self.load_agent(agent.key_hash)
                        break
                    raise tag(self._refusal(agent, code, reply), agent, model_ref)
            except (RedisUnavailable, RedisError) as exc:
                if isinstance(exc, RedisUnavailable):
                    self.redis_up(False)
                if queue_entry:
                    self._queue_gauge(agent.ref, -1)
                log.warning("admission failed", extra={"action": "admit", "request": request_id, "error": str(exc)})
                rej = AdmissionUnknown(503, "redis_unavailable", "limits store unavailable", 1)
                raise tag(rej, agent, model_ref) from None
        raise tag(Reject(503, "config_changing", "agent configuration is changing; retry", 1), agent, model_ref)

    def released(self, ref: str) -> None:
        """A slot of ``ref`` was released on this process: wake its queued requests."""
        event = self._released.pop(ref, None)
        if event is not None:
            event.set()

    def period(self, period: str, now_s: float) -> str:
        """The current budget period's id, recomputed only when the period ends."""
        cached = self._periods.get(period)
        if cached is None or now_s >= cached[1]:
            _, end = period_bounds_s(period, now_s)
            cached = self._periods[period] = (period_id(period, now_s), end)
        return cached[0]

    async def _admit_once(
        self, agent: AgentConfig, request_id: str, shape: RequestShape, reserve: int, entry: str
    ) -> list[Any]:
        now_s = time.time()
        period = self.period(agent.budget_period, now_s)
        keys, head, tail = self._plan(agent)
        deadline_us = int((now_s + agent.queue_max_wait_ms / 1000) * 1e6)
        args = [*head, request_id, "", *tail[:4], str(shape.estimated_tokens), tail[4], tail[5], str(reserve),
                tail[6], tail[7], period, tail[8], entry, str(deadline_us)]  # fmt: skip
        result: list[Any] = await self.redis.evalsha(ADMIT, keys, args)
        self.redis_up(True)
        return result

    def _plan(self, agent: AgentConfig) -> _Plan:
        """The admit.lua keys and constant arguments of one agent config version (built once)."""
        cache_key = (agent.ref, agent.version, agent.key_hash)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) > 10_000:  # bounded: configs of departed agents
                self._plans.clear()
            k = AgentKeys(agent.ref)
            keys = [apikey_key(agent.key_hash), k.config, k.inflight, k.reserved, k.spend, k.rate_requests,
                    k.rate_tokens, k.queue, k.stats]  # fmt: skip
            budget = agent.budget_base_units
            tail = (
                repr(float(agent.requests_per_second)),  # a rate, not money
                str(agent.burst),
                repr(agent.tokens_per_minute / 60),
                str(agent.tokens_per_minute),
                str(agent.max_concurrency),
                str(self.inflight_ttl_us),
                "" if budget is None else str(budget),
                "1" if agent.budget_enforcement == "Hard" else "0",
                str(agent.queue_max_depth),
            )
            plan = self._plans[cache_key] = (keys, (agent.ref, str(agent.version)), tail)
        return plan

    def _refusal(self, agent: AgentConfig, code: AdmitCode, reply: list[Any]) -> Reject:
        if code is AdmitCode.UNKNOWN_KEY:
            self._agents.pop(agent.key_hash, None)
            return Reject(401, "invalid_api_key", "invalid or revoked API key")
        if code is AdmitCode.RATE_LIMITED:
            which = "rate_requests" if reply[2] == 1 else "rate_tokens"
            _reject_metric(agent, which)
            what = "requests per second" if reply[2] == 1 else "tokens per minute"
            return Reject(429, "rate_limited", f"rate limit exceeded ({what})", reply[1] / 1e6)
        if code is AdmitCode.TOO_MANY_TOKENS:
            _reject_metric(agent, "too_large")
            return Reject(
                413, "too_many_tokens", f"request needs more tokens than tokensPerMinute ({agent.tokens_per_minute})"
            )
        if code is AdmitCode.BUDGET_EXHAUSTED:
            _reject_metric(agent, "budget")
            _, end = period_bounds_s(agent.budget_period, time.time())
            return Reject(
                402,
                "budget_exhausted",
                f"budget for this {agent.budget_period.lower()} is exhausted",
                end - time.time(),
            )
        if code is AdmitCode.QUEUE_FULL:
            _reject_metric(agent, "queue_full")
            return Reject(429, "queue_full", f"queue is full ({agent.queue_max_depth} waiting)", 1)
        if code is AdmitCode.SPEND_UNKNOWN:
            _reject_metric(agent, "spend_restoring")
            msg = "this agent's budget spend is being restored from the ledger; retry shortly"
            return Reject(503, "spend_restoring", msg, 1)
        return Reject(500, "internal", f"unexpected admission reply {code!r}")

    def _queue_gauge(self, ref: str, delta: int) -> None:
        self._queued[ref] = self._queued.get(ref, 0) + delta
        m.QUEUE_DEPTH.labels(ref).set(self._queued[ref])

    async def _leave_queue(self, agent: AgentConfig, entry: str) -> None:
        self._queue_gauge(agent.ref, -1)
        # An entry left behind is dropped by the next admission once its deadline passes.
        with contextlib.suppress(RedisUnavailable, RedisError):
            await self.redis.execute("XDEL", AgentKeys(agent.ref).queue, entry)

    async def _wait_release(self, ref: str, timeout_s: float) -> None:
        event = self._released.get(ref)
        if event is None:
            event = self._released[ref] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


def _reject_metric(agent: AgentConfig, reason: str) -> None:
    m.LIMITER_REJECTIONS.labels(agent.ref, reason).inc()
