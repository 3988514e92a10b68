"""The inference gateway: a raw ASGI app (no framework; see calibration.md).

Per request, in order: authenticate (SHA-256 of the key, constant-time compare)
-> authorize the Model -> [``Idempotency-Key``: claim it or replay its stored
outcome, ``lua/idempotency.lua``] -> one EVALSHA (``lua/admit.lua``: key still
valid, config version, spend known, GCRA for requests and tokens, concurrency
slot or FIFO queue, budget reservation of the maximum cost) -> proxy with a
timeout, a per-model circuit breaker and a retry budget -> one EVALSHA
(``lua/settle.lua``: charge the actual cost, release, correct the token limiter,
XADD the usage event, store the idempotent outcome) -> [durability wait,
``durability.py``] -> respond. Money crosses Redis as decimal strings of base
units only (``lua/money.lua``); reply codes are ``scripts.AdmitCode`` & co.

Metering: a request that reached a model is settled exactly once
(``settle.lua`` is idempotent by a per-request marker, and charges even when the
reservation is gone), and its answer is sent only after its usage event is
written and durable by ``gateway_durability``; if that cannot be done the answer
is withheld (503). Admission runs inside the ``try/finally`` that releases, so a
lost admit reply never leaks a slot or a reservation beyond a release attempt
(and the in-flight ttl, ``lifetimes.py``). Requests refused before the upstream
call write no event.

Streams (``stream: true``): the same admission and reservation, then
``streamed.py`` relays the model's events (``streaming.py``, metered by ``sse.py``)
and settles once when the stream ends, however it ends; the usage event is written
and durable before ``[DONE]``. A gateway that dies mid-stream is settled for by the
others (``journal.py``).

This module is the request's path through its concerns, each a module of its own:
``edge.py`` (ASGI, headers, errors) → ``admission.py`` (auth, routes, admit.lua) →
``proxy.py`` (the model call, breakers, retries) → ``settle.py`` (settle.lua,
durability, Idempotency-Key claims) or ``streamed.py``.

Errors (all JSON in the protocol's own shape, see ``protocols.py``):
400 bad body or Idempotency-Key · 401 missing/unknown/revoked key · 402 budget
exhausted (429 ``insufficient_quota`` on OpenAI paths) · 403 Model not allowed ·
404 unknown Model/path · 409 same Idempotency-Key still in progress (or its
request was streamed) · 413 body or token count too large · 422
Idempotency-Key reused with another body · 429 rate limited / queue full / queue
timeout (Retry-After) · 502 upstream failed · 503 circuit open, model not ready,
Redis unavailable, spend being restored, usage not recorded or not durable · 504
upstream timeout.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from openledger.gateway import metrics as m
from openledger.gateway.admission import Admission
from openledger.gateway.breaker import BreakerState, CircuitBreaker
from openledger.gateway.durability import DurabilityBarrier, check_server
from openledger.gateway.edge import (
    Edge,
    Receive,
    Result,
    Scope,
    Send,
    fingerprint,
    header,
    idempotency_header,
    models_body,
    read_body,
    send_error,
    send_json,
)
from openledger.gateway.errors import AdmissionUnknown, Reject, tag
from openledger.gateway.headers import ratelimit_headers
from openledger.gateway.headers import request_id as client_request_id
from openledger.gateway.ids import uuid7
from openledger.gateway.lifetimes import SETTLE_ATTEMPTS, inflight_ttl_s
from openledger.gateway.metering import RequestError, RequestShape, estimate, max_cost, with_output_bound
from openledger.gateway.protocols import Route, match_path
from openledger.gateway.proxy import Proxy
from openledger.gateway.records import AgentConfig, idempotency_key
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.settle import Charge, Claim, Settler, charge_for, replay_outcome
from openledger.gateway.sse import request_usage_body
from openledger.gateway.streamed import StreamCall, Streams, stream_headers
from openledger.settings import Settings
from openledger.wire import ModelRoute, PoolBinding

log = logging.getLogger(__name__)


class Gateway:
    """The ASGI application. One per process; ``startup``/``shutdown`` via lifespan."""

    def __init__(self, settings: Settings, redis: RedisClient | None = None) -> None:
        self.settings = settings
        timeout_s = settings.gateway_redis_timeout_s
        wait_s = settings.gateway_durability_timeout_ms / 1000
        self.redis = redis or RedisClient(settings.redis_url, command_timeout_s=timeout_s)
        # Durability waits block their connection, so they get their own (durability.py).
        self.barrier = DurabilityBarrier(
            RedisClient(settings.redis_url, command_timeout_s=timeout_s + wait_s),
            settings.gateway_durability,
            settings.gateway_durability_timeout_ms,
        )
        self.proxy = Proxy(settings)
        # The in-flight ttl must outlive any request (so a live one is never reclaimed) but no more.
        ttl_s = inflight_ttl_s(self.proxy.timeout_s, timeout_s, wait_s)
        self.admission = Admission(settings, self.redis, int(ttl_s * 1_000_000))
        settle_wait_s = timeout_s * (SETTLE_ATTEMPTS + 1) + wait_s + 1
        self.settler = Settler(settings, self.redis, self.barrier, self.admission, ttl_s, settle_wait_s)
        self.streams = Streams(self.settler, self.redis, settings.usage_stream)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def startup(self) -> None:
        self.proxy.start()
        await check_server(self.redis, self.settings.gateway_durability)
        self.admission.redis_up(True)
        self.streams.journal.start()

    async def shutdown(self) -> None:
        await self.settler.drain()
        await self.streams.journal.stop()
        await self.proxy.close()
        await self.redis.close()
        await self.barrier.client.close()

    # --------------------------------------------------------------- request

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = match_path(path)
        rid = (b"x-request-id", client_request_id(header(scope, b"x-request-id")))
        if route is None:
            await self._small(scope, send, path, rid)
            return
        agent_label = model_label = "-"
        upstream_s = 0.0
        status = 500
        edge = Edge(send, receive, rid)
        try:
            if scope["method"] != "POST":
                raise Reject(405, "method_not_allowed", f"{path} accepts POST only")
            body = await read_body(receive, self.settings.gateway_max_body_bytes)
            result = await self._serve(route, scope, body, edge)
            agent_label, model_label = result.agent, result.model
            status, upstream_s = result.status, result.upstream_s
            if not edge.started:
                headers = [(b"content-type", result.content_type), rid, *result.headers]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": result.body})
        except Reject as rej:
            status, agent_label, model_label = rej.status, rej.agent, rej.model
            await send_error(send, route.protocol, rej, rid)
        except Exception:  # the one boundary where any bug becomes a 500 in the protocol's shape
            log.exception("request failed", extra={"action": "request", "path": path})
            status = 500
            if not edge.started:
                await send_error(send, route.protocol, Reject(500, "internal_error", "internal gateway error"), rid)
        finally:
            elapsed = time.perf_counter() - started
            m.DURATION.observe(elapsed)
            if upstream_s:
                m.OVERHEAD.observe(max(0.0, elapsed - upstream_s))
            m.child(m.REQUESTS, model_label, agent_label, str(status)).inc()

    async def _small(self, scope: Scope, send: Send, path: str, rid: tuple[bytes, bytes]) -> None:
        """Health and the OpenAI model list and model lookup; everything else is 404."""
        if path in ("/healthz", "/readyz"):
            await send_json(send, 200, b'{"status":"ok"}')
            return
        openai_path = path[len("/openai") :] if path.startswith("/openai/") else path
        if openai_path.startswith("/v1/models") and scope["method"] == "GET":
            name = openai_path[len("/v1/models/") :] if openai_path.startswith("/v1/models/") else None
            if openai_path == "/v1/models" or (name and "/" not in name):
                try:
                    agent = await self.admission.authenticate(scope)
                    await send_json(send, 200, models_body(agent, name), rid)
                except Reject as rej:
                    await send_error(send, "openai", rej, rid)
                return
        protocol = "openai" if "/openai/" in path or path.startswith(("/v1/c", "/v1/e")) else "v1"
        await send_error(send, protocol, Reject(404, "not_found", f"no such endpoint: {path}"), rid)

    # ---------------------------------------------------------- the hot path

    async def _serve(self, route: Route, scope: Scope, raw: bytes, edge: Edge) -> Result:
        agent = await self.admission.authenticate(scope)
        client_key = idempotency_header(scope)
        if client_key is None:
            return await self._serve_new(route, agent, raw, None, edge)
        claim = Claim(idempotency_key(agent.ref, client_key), fingerprint(scope["path"], raw))
        request_id = uuid7()
        replay = await self.settler.claim(agent, claim, request_id)
        if replay is not None:
            return replay
        try:
            return await self._serve_new(route, agent, raw, claim, edge, request_id)
        finally:
            if not claim.stored and not claim.kept:  # not metered (or not worth replaying): a retry runs anew
                await self.settler.shielded(self.settler.release_claim(claim, request_id))

    async def _serve_new(
        self, route: Route, agent: AgentConfig, raw: bytes, claim: Claim | None, edge: Edge, request_id: str = ""
    ) -> Result:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Reject(400, "invalid_json", "body: not valid JSON") from None
        name = route.model if route.model is not None else (body.get("model") if isinstance(body, dict) else None)
        if not isinstance(name, str) or not name:
            raise Reject(400, "missing_model", "model: required", param="model")
        model_ref = f"{agent.namespace}/{name}"
        if name not in agent.models:
            # Labelled "-": a client's arbitrary model names must not become metric label values.
            raise tag(Reject(403, "model_not_allowed", f"agent may not call model {name!r}", param="model"), agent, "-")
        model_route, pool = await self.admission.route(model_ref)
        if model_route is None:
            raise tag(Reject(404, "model_not_found", f"model {name!r} does not exist", param="model"), agent, model_ref)
        if not model_route.url:
            raise tag(Reject(503, "model_not_ready", f"model {name!r} is not ready", 5), agent, model_ref)
        if model_route.protocol != route.protocol:
            msg = f"model {name!r} speaks protocol {model_route.protocol!r}, not {route.protocol!r}"
            raise tag(Reject(400, "protocol_mismatch", msg), agent, model_ref)
        streamed = route.protocol == "openai" and isinstance(body, dict) and body.get("stream") is not None
        if streamed and (route.kind == "embeddings" or not isinstance(body["stream"], bool)):
            msg = "stream: must be true or false" if route.kind != "embeddings" else "stream: not for embeddings"
            raise tag(Reject(400, "invalid_request", msg, param="stream"), agent, model_ref)
        streamed = streamed and body["stream"] is True
        try:
            shape = estimate(route.protocol, route.kind, body, self.settings.gateway_default_max_tokens)
        except RequestError as exc:
            raise tag(
                Reject(400, "invalid_request", str(exc), param=str(exc).split(":")[0]), agent, model_ref
            ) from None
        if route.protocol == "openai":
            bounded = with_output_bound(route.kind, body, self.settings.gateway_default_max_tokens)
            if bounded is not None:
                body, raw = bounded, orjson.dumps(bounded)

        breaker = self.proxy.breaker(model_ref)
        now_s = time.monotonic()
        if not breaker.allow(now_s):
            m.CIRCUIT_STATE.labels(model_ref).set(int(breaker.state))
            msg = f"model {name!r} is failing; circuit open"
            raise tag(Reject(503, "circuit_open", msg, breaker.retry_after_s(now_s)), agent, model_ref)
        probe = breaker.state is BreakerState.HALF_OPEN
        before = breaker.state
        try:
            if streamed:
                raw, edge.wants_usage = request_usage_body(body)
                return await self._admitted(
                    route, agent, model_ref, model_route, pool, shape, raw, breaker, claim, request_id or uuid7(), edge
                )
            return await self._admitted(
                route, agent, model_ref, model_route, pool, shape, raw, breaker, claim, request_id or uuid7()
            )
        finally:
            if probe:
                breaker.release_probe()
            if breaker.state is not before or probe:
                m.CIRCUIT_STATE.labels(model_ref).set(int(breaker.state))

    async def _admitted(
        self,
        route: Route,
        agent: AgentConfig,
        model_ref: str,
        model_route: ModelRoute,
        pool: PoolBinding | None,
        shape: RequestShape,
        raw: bytes,
        breaker: CircuitBreaker,
        claim: Claim | None,
        request_id: str,
        edge: Edge | None = None,
    ) -> Result:
        """Admit, call, settle, answer. ``edge``: a ``stream: true`` request (``raw`` asks for usage)."""
        started_ms = time.time_ns() // 1_000_000
        reserve = max_cost(model_route.price, shape)
        done = False  # settled, or refused by a definite admission reply (nothing held)
        charge: Charge | None = None
        inflight = None  # the in-flight gauge's child, once admitted
        try:
            try:
                remaining, admitted = await self.admission.admit(agent, model_ref, request_id, shape, reserve)
            except Reject as refused:
                done = not isinstance(refused, AdmissionUnknown)
                raise
            inflight = m.child(m.INFLIGHT, model_ref)
            inflight.inc()
            upstream = await self.proxy.call(route, model_ref, model_route, raw, breaker, edge is not None)
            if upstream.stream is not None and edge is not None:
                done = True  # streams.answer settles (or releases) whatever happens to it
                head = stream_headers(request_id, remaining, _limit_headers(agent, admitted))
                call = StreamCall(agent, model_ref, model_route, pool, shape, request_id, started_ms, edge)
                return await self.streams.answer(call, upstream.stream, breaker, head, claim)
            charge = charge_for(agent, model_ref, model_route, pool, shape, request_id, started_ms, upstream)
            headers = [(b"x-openledger-event-id", request_id.encode())]
            if remaining is not None:
                headers.append((b"x-openledger-budget-remaining", remaining.encode()))
            if route.protocol == "openai":
                headers.extend(_limit_headers(agent, admitted))
            if claim is not None and charge.event is not None and upstream.status < 500:
                charge.outcome = replay_outcome(upstream, request_id, remaining)
            try:
                await self.settler.settle(agent, charge, claim)
            except (RedisUnavailable, RedisError):
                # No usage event could be written: the answer is withheld (never served unmetered).
                log.error("metering failed; answer withheld", extra={"action": "settle", "request": request_id})
                rej = Reject(503, "metering_unavailable", "usage could not be recorded; retry", 1)
                raise tag(rej, agent, model_ref) from None
            done = True
            await self.settler.durable(agent, model_ref, request_id)
        finally:
            if inflight is not None:
                inflight.dec()
            if not done:
                # Failed or cancelled before settling: settle what reached the model, release the rest.
                release = self.settler.release_after_failure(agent, request_id, shape, charge, claim)
                await self.settler.shielded(release)
        if not upstream.reached:
            raise tag(
                Reject(502, "upstream_unavailable", f"model {model_ref.split('/')[1]!r} is unreachable", 1),
                agent,
                model_ref,
            )
        if upstream.outcome == "timeout":
            raise tag(
                Reject(504, "upstream_timeout", f"model did not answer within {self.proxy.timeout_s:g} s"),
                agent,
                model_ref,
            )
        return Result(
            upstream.status, upstream.body, upstream.content_type, headers, agent.ref, model_ref, upstream.upstream_s
        )


def _limit_headers(agent: AgentConfig, admitted: list[Any]) -> list[tuple[bytes, bytes]]:
    if len(admitted) < 5:
        return []
    return ratelimit_headers(agent.requests_per_second, agent.burst, agent.tokens_per_minute, admitted[3], admitted[4])
