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

Streams (``stream: true``): the same admission and reservation, then ``_stream``
relays the model's events (``streaming.py``, metered by ``sse.py``) and settles
once when the stream ends, however it ends; the usage event is written and durable
before ``[DONE]``. A gateway that dies mid-stream is settled for by the others
(``journal.py``).

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

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

from openledger.gateway import metrics as m
from openledger.gateway.breaker import BreakerConfig, BreakerState, CircuitBreaker
from openledger.gateway.durability import DurabilityBarrier, NotDurable, check_server
from openledger.gateway.headers import ratelimit_headers
from openledger.gateway.headers import request_id as client_request_id
from openledger.gateway.ids import uuid7
from openledger.gateway.journal import RECORD_VERSION, StreamJournal
from openledger.gateway.lifetimes import SETTLE_ATTEMPTS, inflight_ttl_s
from openledger.gateway.metering import (
    RequestError,
    RequestShape,
    actual_usage,
    estimate,
    max_cost,
    with_output_bound,
)
from openledger.gateway.protocols import Route, error_body, match_path, openai_error, upstream_path
from openledger.gateway.records import (
    AgentConfig,
    AgentKeys,
    apikey_key,
    hash_api_key,
    idempotency_key,
    period_bounds_s,
    period_id,
    settled_key,
)
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.retry import RetryBudget, backoff_s
from openledger.gateway.scripts import ADMIT, IDEMPOTENCY, SETTLE, AdmitCode, IdempotencyCode, SettleCode
from openledger.gateway.sse import SseMeter, StreamEnd, StreamUsage, error_event, request_usage_body, stream_outcome
from openledger.gateway.streaming import ClientWatch, ModelStream, SessionStream, relay
from openledger.gateway.upstream import UpstreamBroken, UpstreamPool, UpstreamRefused
from openledger.settings import Settings
from openledger.wire import ModelRoute, PoolBinding, UsageEvent, model_pool_key, model_route_key

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

T = TypeVar("T")
_JSON = (b"content-type", b"application/json")
_RETRYABLE_STATUS = frozenset({502, 503})
MAX_ATTEMPTS = 3
IDEMPOTENCY_KEY_MAX = 255  # characters, as Stripe allows
STREAM_TAIL_TIMEOUT_S = 5.0  # the last event of a settled stream, to a client that may have stopped reading


class Reject(Exception):
    """Answer the client now with an error in its protocol's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_s: float | None = None,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param
        self.headers = headers


class AdmissionUnknown(Reject):
    """Redis failed during admission: a slot and a reservation may or may not be held."""


@dataclass
class _Claim:
    """An ``Idempotency-Key`` this request holds (``stored``: settle.lua saved its outcome)."""

    key: str
    fingerprint: str
    stored: bool = False
    kept: bool = False  # its stream was left to the journal: the claim expires (409 meanwhile), never released


@dataclass
class _Cached:
    value: Any
    loaded_at: float


@dataclass
class _Upstream:
    status: int
    body: bytes
    content_type: bytes
    reached: bool  # the model saw the request (an HTTP answer, a timeout, a dropped connection)
    outcome: str  # ok | upstream_error | timeout
    upstream_s: float
    stream: ModelStream | None = None  # an open event stream (``stream: true`` answered with SSE)


@dataclass
class GatewayState:
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    upstream_attempts: int = 0
    client_requests: int = 0


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
        self.stream = settings.usage_stream
        self.timeout_s = settings.gateway_upstream_timeout_s
        self.state = GatewayState(retry_budget=RetryBudget(ratio=settings.gateway_retry_ratio))
        self.breaker_config = BreakerConfig(settings.gateway_breaker_failures, settings.gateway_breaker_cooldown_s)
        self.session: aiohttp.ClientSession | None = None  # https:// upstreams only
        self.pool = UpstreamPool(max_connections=settings.gateway_upstream_connections)
        self._agents: dict[str, _Cached] = {}
        self._routes: dict[str, _Cached] = {}
        self._released: dict[str, asyncio.Event] = {}
        self._queued: dict[str, int] = {}
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._periods: dict[str, tuple[str, int]] = {}
        self._plans: dict[tuple[str, int, str], tuple[list[str], tuple[str, str], tuple[str, ...]]] = {}
        # The in-flight ttl must outlive any request (so a live one is never reclaimed) but no more.
        ttl_s = inflight_ttl_s(self.timeout_s, timeout_s, wait_s)
        self.inflight_ttl_us = int(ttl_s * 1_000_000)
        # settle.lua's marker only has to outlive the settle retries of a live request: a day of
        # markers would fill a `noeviction` Redis (about 150 bytes per request).
        self.settled_marker_ttl_s = math.ceil(ttl_s)
        self.journal = StreamJournal(self.redis, self._recover, self.stream)
        # Settles and releases run shielded from the request's cancellation; shutdown waits for them.
        self._settling: set[asyncio.Task[Any]] = set()
        self._settle_wait_s = timeout_s * (SETTLE_ATTEMPTS + 1) + wait_s + 1

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
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.gateway_upstream_connections, keepalive_timeout=30, ttl_dns_cache=300
            )
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        await check_server(self.redis, self.settings.gateway_durability)
        self.journal.start()

    async def shutdown(self) -> None:
        if self._settling:  # a request cancelled past its grace may still be settling: let it finish
            await asyncio.wait(set(self._settling), timeout=self._settle_wait_s)
        await self.journal.stop()
        if self.session is not None:
            await self.session.close()
            self.session = None
        self.pool.close()
        await self.redis.close()
        await self.barrier.client.close()

    def _shielded(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``work`` to its end even if the request is cancelled; ``shutdown`` waits for it."""
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return asyncio.shield(task)

    # --------------------------------------------------------------- request

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = match_path(path)
        rid = (b"x-request-id", client_request_id(_header(scope, b"x-request-id")))
        if route is None:
            await self._small(scope, receive, send, path, rid)
            return
        agent_label = model_label = "-"
        upstream_s = 0.0
        status = 500
        edge = _Edge(send, receive, rid)
        try:
            if scope["method"] != "POST":
                raise Reject(405, "method_not_allowed", f"{path} accepts POST only")
            body = await self._read_body(receive)
            result = await self._serve(route, scope, body, edge)
            agent_label, model_label = result.agent, result.model
            status, upstream_s = result.status, result.upstream_s
            if not edge.started:
                headers = [(b"content-type", result.content_type), rid, *result.headers]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": result.body})
        except Reject as rej:
            status = rej.status
            agent_label = getattr(rej, "agent", agent_label)
            model_label = getattr(rej, "model", model_label)
            await self._send_error(send, route.protocol, rej, rid)
        except Exception:  # the one boundary where any bug becomes a 500 in the protocol's shape
            log.exception("request failed", extra={"action": "request", "path": path})
            status = 500
            if not edge.started:
                internal = Reject(500, "internal_error", "internal gateway error")
                await self._send_error(send, route.protocol, internal, rid)
        finally:
            elapsed = time.perf_counter() - started
            m.DURATION.observe(elapsed)
            if upstream_s:
                m.OVERHEAD.observe(max(0.0, elapsed - upstream_s))
            self._count(model_label, agent_label, status)

    def _child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached (prometheus-client's labels() takes a lock and builds a tuple each call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _count(self, model: str, agent: str, status: int) -> None:
        key = (model, agent, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = m.REQUESTS.labels(model, agent, str(status))
        child.inc()

    async def _send_error(self, send: Send, protocol: str, rej: Reject, rid: tuple[bytes, bytes] | None = None) -> None:
        status, code = rej.status, rej.code
        headers = [_JSON, *rej.headers]
        if rid is not None:
            headers.append(rid)
        if protocol == "openai":
            status, code, extra = openai_error(status, code)
            headers.extend(extra)
        if rej.retry_after_s is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(rej.retry_after_s))).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(protocol, status, code, rej.message, rej.param)})

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = self.settings.gateway_max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Reject(499, "client_closed", "client closed the connection")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Reject(413, "body_too_large", f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _small(self, scope: Scope, receive: Receive, send: Send, path: str, rid: tuple[bytes, bytes]) -> None:
        """Health and the OpenAI model list and model lookup; everything else is 404."""
        if path in ("/healthz", "/readyz"):
            await send({"type": "http.response.start", "status": 200, "headers": [_JSON]})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        openai_path = path[len("/openai") :] if path.startswith("/openai/") else path
        if openai_path.startswith("/v1/models") and scope["method"] == "GET":
            name = openai_path[len("/v1/models/") :] if openai_path.startswith("/v1/models/") else None
            if openai_path == "/v1/models" or (name and "/" not in name):
                try:
                    agent = await self._authenticate(scope)
                    payload = _models_body(agent, name)
                    await send({"type": "http.response.start", "status": 200, "headers": [_JSON, rid]})
                    await send({"type": "http.response.body", "body": payload})
                except Reject as rej:
                    await self._send_error(send, "openai", rej, rid)
                return
        protocol = "openai" if "/openai/" in path or path.startswith(("/v1/c", "/v1/e")) else "v1"
        await self._send_error(send, protocol, Reject(404, "not_found", f"no such endpoint: {path}"), rid)

    # ---------------------------------------------------------- the hot path

    async def _serve(self, route: Route, scope: Scope, raw: bytes, edge: _Edge) -> _Result:
        agent = await self._authenticate(scope)
        client_key = _idempotency_header(scope)
        if client_key is None:
            return await self._serve_new(route, agent, raw, None, edge)
        claim = _Claim(idempotency_key(agent.ref, client_key), _fingerprint(scope["path"], raw))
        request_id = uuid7()
        replay = await self._claim(agent, claim, request_id)
        if replay is not None:
            return replay
        try:
            return await self._serve_new(route, agent, raw, claim, edge, request_id)
        finally:
            if not claim.stored and not claim.kept:  # not metered (or not worth replaying): a retry runs anew
                await self._shielded(self._release_claim(claim, request_id))

    async def _serve_new(
        self, route: Route, agent: AgentConfig, raw: bytes, claim: _Claim | None, edge: _Edge, request_id: str = ""
    ) -> _Result:
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
            raise _tag(
                Reject(403, "model_not_allowed", f"agent may not call model {name!r}", param="model"), agent, "-"
            )
        model_route, pool = await self._route(model_ref)
        if model_route is None:
            raise _tag(
                Reject(404, "model_not_found", f"model {name!r} does not exist", param="model"), agent, model_ref
            )
        if not model_route.url:
            raise _tag(Reject(503, "model_not_ready", f"model {name!r} is not ready", 5), agent, model_ref)
        if model_route.protocol != route.protocol:
            msg = f"model {name!r} speaks protocol {model_route.protocol!r}, not {route.protocol!r}"
            raise _tag(Reject(400, "protocol_mismatch", msg), agent, model_ref)
        streamed = route.protocol == "openai" and isinstance(body, dict) and body.get("stream") is not None
        if streamed and (route.kind == "embeddings" or not isinstance(body["stream"], bool)):
            msg = "stream: must be true or false" if route.kind != "embeddings" else "stream: not for embeddings"
            raise _tag(Reject(400, "invalid_request", msg, param="stream"), agent, model_ref)
        streamed = streamed and body["stream"] is True
        try:
            shape = estimate(route.protocol, route.kind, body, self.settings.gateway_default_max_tokens)
        except RequestError as exc:
            raise _tag(
                Reject(400, "invalid_request", str(exc), param=str(exc).split(":")[0]), agent, model_ref
            ) from None
        if route.protocol == "openai":
            bounded = with_output_bound(route.kind, body, self.settings.gateway_default_max_tokens)
            if bounded is not None:
                body, raw = bounded, orjson.dumps(bounded)

        breaker = self._breaker(model_ref)
        now_s = time.monotonic()
        if not breaker.allow(now_s):
            m.CIRCUIT_STATE.labels(model_ref).set(int(breaker.state))
            msg = f"model {name!r} is failing; circuit open"
            raise _tag(Reject(503, "circuit_open", msg, breaker.retry_after_s(now_s)), agent, model_ref)
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
        claim: _Claim | None,
        request_id: str,
        edge: _Edge | None = None,
    ) -> _Result:
        """Admit, call, settle, answer. ``edge``: a ``stream: true`` request (``raw`` asks for usage)."""
        started_ms = time.time_ns() // 1_000_000
        reserve = max_cost(model_route.price, shape)
        keys = AgentKeys(agent.ref)
        done = False  # settled, or refused by a definite admission reply (nothing held)
        settle: _Settle | None = None
        try:
            try:
                remaining, admitted = await self._admit(agent, model_ref, request_id, shape, reserve)
            except Reject as refused:
                done = not isinstance(refused, AdmissionUnknown)
                raise
            upstream = await self._call(route, model_ref, model_route, raw, breaker, edge is not None)
            if upstream.stream is not None and edge is not None:
                done = True  # _stream settles (or releases) whatever happens to it
                head = _stream_headers(request_id, remaining, _limit_headers(agent, admitted))
                call = _StreamCall(agent, model_ref, model_route, pool, shape, request_id, started_ms, edge)
                return await self._stream(call, upstream.stream, breaker, head, claim)
            settle = self._settlement(agent, model_ref, model_route, pool, shape, request_id, started_ms, upstream)
            headers = [(b"x-openledger-event-id", request_id.encode())]
            if remaining is not None:
                headers.append((b"x-openledger-budget-remaining", remaining.encode()))
            if route.protocol == "openai":
                headers.extend(_limit_headers(agent, admitted))
            if claim is not None and settle.event is not None and upstream.status < 500:
                settle.outcome = _outcome(upstream, request_id, remaining)
            try:
                await self._settle(agent, keys, settle, claim)
            except (RedisUnavailable, RedisError):
                # No usage event could be written: the answer is withheld (never served unmetered).
                log.error("metering failed; answer withheld", extra={"action": "settle", "request": request_id})
                rej = Reject(503, "metering_unavailable", "usage could not be recorded; retry", 1)
                raise _tag(rej, agent, model_ref) from None
            done = True
            await self._durable(agent, model_ref, request_id)
        finally:
            if not done:
                # Failed or cancelled before settling: settle what reached the model, release the rest.
                await self._shielded(self._release_after_failure(agent, keys, request_id, shape, settle, claim))
        if not upstream.reached:
            raise _tag(
                Reject(502, "upstream_unavailable", f"model {model_ref.split('/')[1]!r} is unreachable", 1),
                agent,
                model_ref,
            )
        if upstream.outcome == "timeout":
            raise _tag(
                Reject(504, "upstream_timeout", f"model did not answer within {self.timeout_s:g} s"), agent, model_ref
            )
        return _Result(
            upstream.status, upstream.body, upstream.content_type, headers, agent.ref, model_ref, upstream.upstream_s
        )

    async def _stream(
        self,
        call: _StreamCall,
        stream: ModelStream,
        breaker: CircuitBreaker,
        headers: list[tuple[bytes, bytes]],
        claim: _Claim | None,
    ) -> _Result:
        """Relay an open event stream, then settle it once however it ended (see ``streaming.py``).

        On a normal end the held ``[DONE]`` (and usage chunk) is sent only after the usage
        event is written and durable; if that fails the stream ends with an error event.
        """
        meter = SseMeter(call.edge.wants_usage)
        watch = ClientWatch(call.edge.receive, stream)
        journal = self.journal
        end = StreamEnd.CLIENT_CLOSED  # cancelled mid-relay (a shutdown past its grace): as if the client left
        t0 = time.perf_counter()
        try:
            await call.edge.start(200, headers)
            journal.open(call.request_id, functools.partial(_journal_record, call))
            end = await relay(stream, meter, call.edge.send, watch, journal.progress, call.request_id)
        finally:
            watch.stop()
            stream.close()
            if end in (StreamEnd.UPSTREAM_BROKEN, StreamEnd.TIMEOUT):
                breaker.record_failure(time.monotonic())
            self._child(m.STREAMS, end.value).inc()
            settle = self._stream_settlement(call, meter.result(call.shape), meter.delivered, end)
            if claim is not None:
                settle.outcome = _stream_outcome(call.request_id)
            failure = await self._shielded(self._settle_stream(call, settle, claim, meter))
        if end is not StreamEnd.CLIENT_CLOSED:
            tail = failure or (b"".join(meter.held) if end is StreamEnd.COMPLETED else _broken_event(end, call))
            # Settled already; a client that stopped reading must not hold the request open.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_TAIL_TIMEOUT_S):
                    await call.edge.send({"type": "http.response.body", "body": tail, "more_body": False})
        return _Result(200, b"", b"text/event-stream", [], call.agent.ref, call.model_ref, time.perf_counter() - t0)

    async def _settle_stream(
        self, call: _StreamCall, settle: _Settle, claim: _Claim | None, meter: SseMeter
    ) -> bytes | None:
        """Settle a stream and wait for durability; None when done, else the error event to end the stream with."""
        try:
            await self._settle(call.agent, AgentKeys(call.agent.ref), settle, claim)
        except (RedisUnavailable, RedisError):
            # Journaled now (retrying): a sweep settles it, as delivered, once Redis is back. Its
            # Idempotency-Key stays claimed (409 until it expires): a retry must not stream again.
            self.journal.abandon(call.request_id, meter.text_chunks, meter.text_chars)
            if claim is not None:
                claim.kept = True
            log.error("metering failed after a stream", extra={"action": "settle", "request": call.request_id})
            return error_event("metering_unavailable", "usage not recorded yet; it will be from the stream journal")
        self.journal.close(call.request_id)
        try:
            await self._durable(call.agent, call.model_ref, call.request_id)
        except Reject as rej:
            return error_event(rej.code, rej.message)
        return None

    def _stream_settlement(self, call: _StreamCall, usage: StreamUsage, delivered: bool, end: StreamEnd) -> _Settle:
        """What settle.lua records for a stream (pure): what was delivered, never more than reserved.

        A completed stream, or one that delivered text, is charged (``ok``); one that ended
        early having delivered no text is charged nothing (``cancelled``, or the model's
        failure). How it ended is kept in the event's ``extra.stream``.
        """
        outcome = stream_outcome(end, delivered)
        charged = outcome == "ok"
        tokens_in, tokens_out = (usage.input_tokens, usage.output_tokens) if charged else (0, 0)
        event = _stream_event(call, tokens_in, tokens_out, outcome, end, usage.reported and charged)
        delta = (tokens_in + tokens_out) - call.shape.estimated_tokens
        return _Settle(call.request_id, event.cost, delta, event)

    async def _recover(self, request_id: str, record: bytes, chunks: int, chars: int) -> None:
        """Settle the stream of a gateway that died (``journal.py``), as delivered up to its last progress."""
        data = orjson.loads(record)
        if data.get("v", 1) != RECORD_VERSION:  # records before versioning are version 1
            raise ValueError(f"stream journal record version {data.get('v')!r} is not {RECORD_VERSION}")
        template = UsageEvent.from_fields(data["event"])
        shape = RequestShape("openai", *data["shape"])
        tokens_in = min(shape.estimated_input_tokens, shape.max_input_tokens) if chunks else 0
        tokens_out = min(max(chunks, math.ceil(chars / 4)), shape.max_output_tokens)
        event = dataclasses.replace(
            template,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost=template.price.cost(tokens_in, tokens_out) if chunks else 0,
            outcome="ok" if chunks else "cancelled",
            finished_at_ms=time.time_ns() // 1_000_000,
            extra={"stream": "gateway_lost", "usage": "counted"},
        )
        payer = _Payer(data["agent"], data["period"], data["tpm"])
        delta = (tokens_in + tokens_out) - shape.estimated_tokens
        await self._settle(payer, AgentKeys(payer.ref), _Settle(request_id, event.cost, delta, event), None)

    def _settlement(
        self,
        agent: AgentConfig,
        model_ref: str,
        model_route: ModelRoute,
        pool: PoolBinding | None,
        shape: RequestShape,
        request_id: str,
        started_ms: int,
        upstream: _Upstream,
    ) -> _Settle:
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
        return _Settle(request_id, cost, delta, event if upstream.reached else None)

    async def _durable(self, agent: AgentConfig, model_ref: str, request_id: str) -> None:
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
            raise _tag(rej, agent, model_ref) from None

    async def _release_after_failure(
        self,
        agent: AgentConfig,
        keys: AgentKeys,
        request_id: str,
        shape: RequestShape,
        settle: _Settle | None,
        claim: _Claim | None,
    ) -> None:
        if settle is None or settle.event is None:
            # The model never saw it: only the slot and reservation (if admitted) to release.
            settle = _Settle(request_id, 0, -shape.estimated_tokens, None)
            claim = None
        try:
            await self._settle(agent, keys, settle, claim)
        except (RedisUnavailable, RedisError):
            log.warning(
                "release failed; the reservation expires with its ttl",
                extra={"action": "release", "request": request_id},
            )

    # ------------------------------------------------------- idempotency keys

    async def _claim(self, agent: AgentConfig, claim: _Claim, request_id: str) -> _Result | None:
        """Claim the key (None: run the request) or return the stored outcome of its first run."""
        # The claim must outlive the request, queueing included, or a retry could run it twice.
        ttl_ms = str(self.inflight_ttl_us // 1000 + agent.queue_max_wait_ms)
        try:
            reply = await self.redis.evalsha(IDEMPOTENCY, [claim.key], ["claim", claim.fingerprint, request_id, ttl_ms])
        except RedisUnavailable:
            raise _tag(Reject(503, "redis_unavailable", "limits store unavailable", 1), agent, "-") from None
        code = IdempotencyCode(reply[0])
        if code is IdempotencyCode.CLAIMED:
            return None
        if code is IdempotencyCode.KEY_REUSED:
            msg = "Idempotency-Key: already used with a different request body; use a new key"
            raise _tag(Reject(422, "idempotency_key_reused", msg, param="Idempotency-Key"), agent, "-")
        if code is IdempotencyCode.IN_PROGRESS:
            msg = "Idempotency-Key: a request with this key is still in progress; retry later"
            raise _tag(Reject(409, "idempotency_in_progress", msg, 1, param="Idempotency-Key"), agent, "-")
        status, ctype, body, event_id, remaining = reply[1:6]
        await self._durable(agent, "-", event_id.decode())
        headers = [(b"x-openledger-event-id", event_id), (b"idempotent-replayed", b"true")]
        if remaining:
            headers.append((b"x-openledger-budget-remaining", remaining))
        return _Result(int(status), body, ctype, headers, agent.ref, "-", 0.0)

    async def _release_claim(self, claim: _Claim, request_id: str) -> None:
        # Left behind, the claim expires with the in-flight ttl (a retry meanwhile gets 409).
        with contextlib.suppress(RedisUnavailable, RedisError):
            await self.redis.evalsha(IDEMPOTENCY, [claim.key], ["release", claim.fingerprint, request_id, "0"])

    # ------------------------------------------------------------------ auth

    async def _authenticate(self, scope: Scope) -> AgentConfig:
        key = _api_key(scope)
        if key is None:
            raise Reject(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'")
        key_hash = hash_api_key(key)
        cached = self._agents.get(key_hash)
        if cached is not None and time.monotonic() - cached.loaded_at < self.settings.gateway_agent_cache_s:
            return cached.value  # type: ignore[no-any-return]
        return await self._load_agent(key_hash)

    async def _load_agent(self, key_hash: str) -> AgentConfig:
        try:
            ref = await self.redis.execute("GET", apikey_key(key_hash))
            if ref is None:
                self._agents.pop(key_hash, None)
                raise Reject(401, "invalid_api_key", "invalid or revoked API key")
            raw = await self.redis.execute("HGETALL", AgentKeys(ref.decode()).config)
        except RedisUnavailable:
            raise Reject(503, "redis_unavailable", "limits store unavailable", 1) from None
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
        return agent

    # ----------------------------------------------------------------- routes

    async def _route(self, model_ref: str) -> tuple[ModelRoute | None, PoolBinding | None]:
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
            if cached is not None:
                return cached.value  # type: ignore[no-any-return]
            raise Reject(503, "redis_unavailable", "routing store unavailable", 1) from None
        value = (
            ModelRoute.from_json(raw_route) if raw_route else None,
            PoolBinding.from_json(raw_pool) if raw_pool else None,
        )
        self._routes[model_ref] = _Cached(value, time.monotonic())
        return value

    def _breaker(self, model_ref: str) -> CircuitBreaker:
        breaker = self.state.breakers.get(model_ref)
        if breaker is None:
            breaker = self.state.breakers[model_ref] = CircuitBreaker(self.breaker_config)
        return breaker

    # -------------------------------------------------------------- admission

    async def _admit(
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
                    reply = await self._admit_once(agent, request_id, shape, reserve, queue_entry, deadline)
                    code = AdmitCode(reply[0])
                    if code is AdmitCode.ADMITTED:
                        if queue_entry:
                            m.QUEUE_WAIT.observe(time.monotonic() - queued_at)
                            self._queue_gauge(agent.ref, -1)
                        remaining = reply[1].decode() if reply[1] else None
                        if remaining is not None:
                            self._child(m.BUDGET_REMAINING, agent.ref).set(int(remaining))
                        return remaining, reply
                    if code is AdmitCode.QUEUED:
                        queue_entry = reply[1].decode()
                        queued_at = time.monotonic()
                        deadline = queued_at + agent.queue_max_wait_ms / 1000
                        self._queue_gauge(agent.ref, +1)
                    if code in (AdmitCode.QUEUED, AdmitCode.WAITING):
                        if time.monotonic() >= deadline:
                            await self._leave_queue(agent, queue_entry)
                            self._reject_metric(agent, "queue_timeout")
                            msg = f"queued {agent.queue_max_wait_ms / 1000:g} s without a free slot"
                            raise _tag(Reject(429, "queue_timeout", msg, 1), agent, model_ref)
                        await self._wait_release(agent.ref, min(0.05, max(0.0, deadline - time.monotonic())))
                        continue
                    if queue_entry:
                        self._queue_gauge(agent.ref, -1)
                        queue_entry = ""
                    if code is AdmitCode.STALE_CONFIG:
                        agent = await self._load_agent(agent.key_hash)
                        break
                    raise _tag(self._admit_reject(agent, code, reply), agent, model_ref)
            except (RedisUnavailable, RedisError) as exc:
                if queue_entry:
                    self._queue_gauge(agent.ref, -1)
                log.warning("admission failed", extra={"action": "admit", "request": request_id, "error": str(exc)})
                rej = AdmissionUnknown(503, "redis_unavailable", "limits store unavailable", 1)
                raise _tag(rej, agent, model_ref) from None
        raise _tag(Reject(503, "config_changing", "agent configuration is changing; retry", 1), agent, model_ref)

    async def _admit_once(
        self, agent: AgentConfig, request_id: str, shape: RequestShape, reserve: int, entry: str, deadline: float
    ) -> list[Any]:
        now_s = time.time()
        period = self._period(agent.budget_period, now_s)
        keys, head, tail = self._admit_plan(agent)
        deadline_us = int((now_s + agent.queue_max_wait_ms / 1000) * 1e6)
        args = [*head, request_id, "", *tail[:4], str(shape.estimated_tokens), tail[4], tail[5], str(reserve),
                tail[6], tail[7], period, tail[8], entry, str(deadline_us)]  # fmt: skip
        result: list[Any] = await self.redis.evalsha(ADMIT, keys, args)
        return result

    def _admit_plan(self, agent: AgentConfig) -> tuple[list[str], tuple[str, str], tuple[str, ...]]:
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

    def _admit_reject(self, agent: AgentConfig, code: AdmitCode, reply: list[Any]) -> Reject:
        if code is AdmitCode.UNKNOWN_KEY:
            self._agents.pop(agent.key_hash, None)
            return Reject(401, "invalid_api_key", "invalid or revoked API key")
        if code is AdmitCode.RATE_LIMITED:
            which = "rate_requests" if reply[2] == 1 else "rate_tokens"
            self._reject_metric(agent, which)
            what = "requests per second" if reply[2] == 1 else "tokens per minute"
            return Reject(429, "rate_limited", f"rate limit exceeded ({what})", reply[1] / 1e6)
        if code is AdmitCode.TOO_MANY_TOKENS:
            self._reject_metric(agent, "too_large")
            return Reject(
                413, "too_many_tokens", f"request needs more tokens than tokensPerMinute ({agent.tokens_per_minute})"
            )
        if code is AdmitCode.BUDGET_EXHAUSTED:
            self._reject_metric(agent, "budget")
            _, end = period_bounds_s(agent.budget_period, time.time())
            return Reject(
                402,
                "budget_exhausted",
                f"budget for this {agent.budget_period.lower()} is exhausted",
                end - time.time(),
            )
        if code is AdmitCode.QUEUE_FULL:
            self._reject_metric(agent, "queue_full")
            return Reject(429, "queue_full", f"queue is full ({agent.queue_max_depth} waiting)", 1)
        if code is AdmitCode.SPEND_UNKNOWN:
            self._reject_metric(agent, "spend_restoring")
            msg = "this agent's budget spend is being restored from the ledger; retry shortly"
            return Reject(503, "spend_restoring", msg, 1)
        return Reject(500, "internal", f"unexpected admission reply {code!r}")

    def _reject_metric(self, agent: AgentConfig, reason: str) -> None:
        m.LIMITER_REJECTIONS.labels(agent.ref, reason).inc()

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

    def _period(self, period: str, now_s: float) -> str:
        """The current budget period's id, recomputed only when the period ends."""
        cached = self._periods.get(period)
        if cached is None or now_s >= cached[1]:
            _, end = period_bounds_s(period, now_s)
            cached = self._periods[period] = (period_id(period, now_s), end)
        return cached[0]

    async def _settle(
        self, agent: AgentConfig | _Payer, keys: AgentKeys, settle: _Settle, claim: _Claim | None
    ) -> None:
        """Run settle.lua (idempotent by its marker, so a lost reply is safe to repeat)."""
        event = settle.event
        record = claim is not None and settle.outcome is not None
        outcome = settle.outcome or ()
        args: list[str | bytes | int | float] = [
            settle.request_id,
            str(settle.cost),
            self._period(agent.budget_period, time.time()),
            str(self.settled_marker_ttl_s),
            str(settle.token_delta),
            repr(agent.tokens_per_minute / 60),
            "1" if event is not None else "0",
            str(self.settings.gateway_idempotency_window_s * 1000) if record else "",
            str(len(outcome) // 2 + 2) if record else "0",
        ]
        if record and claim is not None:
            # Who may store it, and for which body: a record Redis lost mid-request is written anew.
            args.extend((*outcome, "fp", claim.fingerprint, "owner", settle.request_id))
        if event is not None:
            for k, v in event.to_entry().items():
                args.append(k)
                args.append(v)
        marker = settled_key(settle.request_id)
        record_key = claim.key if claim is not None else marker  # only written when `record`
        skeys = [keys.inflight, keys.reserved, keys.spend, keys.spend_gen, keys.rate_tokens, self.stream, marker,
                 record_key]  # fmt: skip
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                reply = await self.redis.evalsha(SETTLE, skeys, args)
                break
            except RedisUnavailable:
                if attempt == SETTLE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        if record and claim is not None:
            claim.stored = True
        if event is not None and SettleCode(reply[0]) is SettleCode.SETTLED:
            self._child(m.USAGE_EVENTS, event.outcome).inc()
        released = self._released.pop(agent.ref, None)
        if released is not None:
            released.set()

    # --------------------------------------------------------------- upstream

    async def _call(
        self,
        route: Route,
        model_ref: str,
        model_route: ModelRoute,
        raw: bytes,
        breaker: CircuitBreaker,
        stream: bool = False,
    ) -> _Upstream:
        """Call the model (retrying per the breaker and the retry budget); ``stream``: open its event stream."""
        assert self.session is not None, "gateway not started"
        url = model_route.url.rstrip("/") + upstream_path(route, model_ref.split("/", 1)[1])
        self.state.client_requests += 1
        self.state.retry_budget.deposit()
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            self.state.upstream_attempts += 1
            t0 = time.perf_counter()
            timeout_s = max(0.001, deadline - time.monotonic())
            if stream:
                result = await self._attempt_stream(url, raw, timeout_s)
            else:
                result = await self._attempt(url, raw, timeout_s)
            result.upstream_s = time.perf_counter() - t0
            failed = not result.reached or result.outcome == "timeout" or result.status >= 500
            self._child(m.UPSTREAM_ATTEMPTS, model_ref, _attempt_result(result)).inc()
            if not failed:
                breaker.record_success()
                return result
            breaker.record_failure(time.monotonic())
            retryable = not result.reached or result.status in _RETRYABLE_STATUS
            attempt += 1
            if not (retryable and attempt < MAX_ATTEMPTS and breaker.state is BreakerState.CLOSED):
                return result
            if not self.state.retry_budget.try_withdraw():
                return result
            pause = backoff_s(attempt - 1)
            if time.monotonic() + pause >= deadline:
                return result
            await asyncio.sleep(pause)

    async def _attempt(self, url: str, raw: bytes, timeout_s: float) -> _Upstream:
        if url.startswith("http://"):
            return await self._attempt_pool(url, raw, timeout_s)
        assert self.session is not None
        try:
            async with self.session.post(
                url,
                data=raw,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                body = await resp.read()
                ctype = resp.headers.get("Content-Type", "application/json").encode()
                outcome = "ok" if resp.status < 400 else "upstream_error"
                return _Upstream(resp.status, body, ctype, True, outcome, 0.0)
        except aiohttp.ClientConnectorError:
            return _Upstream(502, b"", b"application/json", False, "upstream_error", 0.0)
        except TimeoutError:
            return _Upstream(504, b"", b"application/json", True, "timeout", 0.0)
        except aiohttp.ClientError:
            return _Upstream(502, b"", b"application/json", True, "upstream_error", 0.0)

    async def _attempt_stream(self, url: str, raw: bytes, timeout_s: float) -> _Upstream:
        """Open the model's stream; an answer that is not an event stream is read whole (errors, JSON)."""
        opened: ModelStream
        try:
            if url.startswith("http://"):
                slash = url.find("/", 7)
                base, path = (url[:slash], url[slash:]) if slash > 0 else (url, "/")
                opened = await self.pool.open_stream(base, path, raw, timeout_s)
            else:
                assert self.session is not None
                deadline = asyncio.get_running_loop().time() + timeout_s
                response = await self.session.post(
                    url,
                    data=raw,
                    headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                )
                opened = SessionStream(response, deadline)
        except (UpstreamRefused, aiohttp.ClientConnectorError):
            return _Upstream(502, b"", b"application/json", False, "upstream_error", 0.0)
        except TimeoutError:
            return _Upstream(504, b"", b"application/json", True, "timeout", 0.0)
        except (UpstreamBroken, aiohttp.ClientError):
            return _Upstream(502, b"", b"application/json", True, "upstream_error", 0.0)
        if opened.status == 200 and opened.content_type.startswith(b"text/event-stream"):
            return _Upstream(200, b"", opened.content_type, True, "ok", 0.0, opened)
        return await _read_whole(opened)

    async def _attempt_pool(self, url: str, raw: bytes, timeout_s: float) -> _Upstream:
        """Plain http:// upstreams (in-cluster InferenceService URLs): the small keep-alive pool."""
        slash = url.find("/", 7)
        base, path = (url[:slash], url[slash:]) if slash > 0 else (url, "/")
        try:
            status, body, ctype = await self.pool.post(base, path, raw, timeout_s)
        except UpstreamRefused:
            return _Upstream(502, b"", b"application/json", False, "upstream_error", 0.0)
        except TimeoutError:
            return _Upstream(504, b"", b"application/json", True, "timeout", 0.0)
        except UpstreamBroken:
            return _Upstream(502, b"", b"application/json", True, "upstream_error", 0.0)
        return _Upstream(status, body, ctype, True, "ok" if status < 400 else "upstream_error", 0.0)


@dataclass
class _Settle:
    """One settle.lua call: cost in base units, the token correction, the event (None: not reached)."""

    request_id: str
    cost: int
    token_delta: int
    event: UsageEvent | None
    outcome: tuple[str | bytes, ...] | None = None  # Idempotency-Key: field, value… stored with the event


def _outcome(upstream: _Upstream, request_id: str, remaining: str | None) -> tuple[str | bytes, ...]:
    return ("status", str(upstream.status), "ctype", upstream.content_type, "body", upstream.body,
            "event", request_id, "remaining", remaining or "")  # fmt: skip


def _idempotency_header(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            key: str = value.decode("latin-1").strip()
            if not key or len(key) > IDEMPOTENCY_KEY_MAX:
                msg = f"Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
                raise Reject(400, "invalid_idempotency_key", msg, param="Idempotency-Key")
            return key
    return None


def _fingerprint(path: str, body: bytes) -> str:
    """What makes a retry the same request: its path and its exact body."""
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


@dataclass
class _Result:
    status: int
    body: bytes
    content_type: bytes
    headers: list[tuple[bytes, bytes]]
    agent: str
    model: str
    upstream_s: float


def _attempt_result(result: _Upstream) -> str:
    if not result.reached:
        return "refused"
    if result.outcome == "timeout":
        return "timeout"
    return "error" if result.status >= 500 else "ok"


def _tag(rej: Reject, agent: AgentConfig, model_ref: str) -> Reject:
    rej.agent = agent.ref  # type: ignore[attr-defined]
    rej.model = model_ref  # type: ignore[attr-defined]
    return rej


def _api_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip() or None
            return None
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


@dataclass
class _Edge:
    """The client's side of one request: ASGI send/receive, its x-request-id, whether a response began."""

    send: Send
    receive: Receive
    request_id: tuple[bytes, bytes]
    started: bool = False
    wants_usage: bool = False  # a stream whose client asked for the usage chunk itself

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": [*headers, self.request_id]})


@dataclass(frozen=True)
class _Payer:
    """What settle.lua needs of an Agent (an ``AgentConfig``, or a journal record's copy)."""

    ref: str
    budget_period: str
    tokens_per_minute: int


@dataclass
class _StreamCall:
    agent: AgentConfig
    model_ref: str
    model_route: ModelRoute
    pool: PoolBinding | None
    shape: RequestShape
    request_id: str
    started_ms: int
    edge: _Edge


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _stream_headers(
    request_id: str, remaining: str | None, limits: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    headers = [*_SSE_HEADERS, (b"x-openledger-event-id", request_id.encode()), *limits]
    if remaining is not None:
        headers.append((b"x-openledger-budget-remaining", remaining.encode()))
    return headers


def _limit_headers(agent: AgentConfig, admitted: list[Any]) -> list[tuple[bytes, bytes]]:
    if len(admitted) < 5:
        return []
    return ratelimit_headers(agent.requests_per_second, agent.burst, agent.tokens_per_minute, admitted[3], admitted[4])


def _stream_event(
    call: _StreamCall, tokens_in: int, tokens_out: int, outcome: str, end: StreamEnd, reported: bool
) -> UsageEvent:
    price = call.model_route.price
    pool = call.pool
    return UsageEvent(
        event_id=call.request_id,
        agent=call.agent.ref,
        payer=call.agent.account,
        model=call.model_ref,
        owner=call.model_route.owner,
        price=price,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost=price.cost(tokens_in, tokens_out) if outcome == "ok" else 0,
        outcome=outcome,
        started_at_ms=call.started_ms,
        finished_at_ms=time.time_ns() // 1_000_000,
        contributors=call.model_route.contributors,
        pool=pool.pool if pool else "",
        fee_bps=pool.fee_bps if pool else 0,
        extra={"stream": end.value, "usage": "reported" if reported else "counted"},
    )


def _journal_record(call: _StreamCall) -> bytes:
    """What a sweeping gateway needs to settle this stream if its gateway dies (``journal.py``)."""
    template = _stream_event(call, 0, 0, "cancelled", StreamEnd.CLIENT_CLOSED, False)
    shape = call.shape
    return orjson.dumps(
        {
            "v": RECORD_VERSION,
            "agent": call.agent.ref,
            "period": call.agent.budget_period,
            "tpm": call.agent.tokens_per_minute,
            "event": template.to_fields(),
            "shape": [
                shape.max_input_tokens,
                shape.max_output_tokens,
                shape.estimated_tokens,
                shape.estimated_input_tokens,
            ],
        }
    )


def _stream_outcome(request_id: str) -> tuple[str | bytes, ...]:
    """The Idempotency-Key outcome of a stream: a stream is not replayed, and not charged again."""
    msg = f"this Idempotency-Key's request was streamed and metered as event {request_id}; a stream is not replayed"
    body = error_body("openai", 409, "idempotency_stream_done", msg, "Idempotency-Key")
    return ("status", "409", "ctype", b"application/json", "body", body, "event", request_id, "remaining", "")


def _broken_event(end: StreamEnd, call: _StreamCall) -> bytes:
    if end is StreamEnd.TIMEOUT:
        return error_event("upstream_timeout", "the model's stream exceeded the upstream timeout", "timeout_error")
    return error_event("upstream_error", f"model {call.model_ref.split('/')[1]!r} broke off the stream")


async def _read_whole(stream: ModelStream) -> _Upstream:
    """Read a non-streamed answer to the end (errors, or a model that ignored ``stream``)."""
    chunks: list[bytes] = []
    try:
        while chunk := await stream.read():
            chunks.append(chunk)
    except TimeoutError:
        return _Upstream(504, b"", b"application/json", True, "timeout", 0.0)
    except UpstreamBroken:
        return _Upstream(502, b"", b"application/json", True, "upstream_error", 0.0)
    finally:
        stream.close()
    status = stream.status
    outcome = "ok" if status < 400 else "upstream_error"
    return _Upstream(status, b"".join(chunks), stream.content_type, True, outcome, 0.0)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def _models_body(agent: AgentConfig, name: str | None) -> bytes:
    """``GET /v1/models`` (the Agent's models) or ``GET /v1/models/{name}``."""
    if name is None:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": agent.namespace} for n in agent.models]
        return orjson.dumps({"object": "list", "data": data})
    if name not in agent.models:
        raise Reject(404, "model_not_found", f"The model {name!r} does not exist or you do not have access to it.",
                     param="model")  # fmt: skip
    return orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": agent.namespace})
