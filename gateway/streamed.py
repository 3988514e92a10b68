"""Answering ``stream: true``: relay the model's events, then settle once however the stream ended.

The relay itself is ``streaming.py`` (backpressure, the client watch) metered by ``sse.py``;
this module decides what a stream is charged (``stream_charge``, pure), settles it, sends the
held ``[DONE]`` only after the usage event is durable, and keeps each live stream in the
journal so that another gateway settles it if this one dies (``journal.py``, ``recover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass

import orjson

from openledger.gateway import metrics as m
from openledger.gateway.breaker import CircuitBreaker
from openledger.gateway.edge import Edge, Result
from openledger.gateway.errors import Reject
from openledger.gateway.journal import RECORD_VERSION, StreamJournal
from openledger.gateway.metering import RequestShape
from openledger.gateway.protocols import error_body
from openledger.gateway.records import AgentConfig
from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable
from openledger.gateway.settle import Charge, Claim, Payer, Settler
from openledger.gateway.sse import SseMeter, StreamEnd, StreamUsage, error_event, stream_outcome
from openledger.gateway.streaming import ClientWatch, ModelStream, relay
from openledger.wire import ModelRoute, PoolBinding, UsageEvent

log = logging.getLogger(__name__)

STREAM_TAIL_TIMEOUT_S = 5.0  # the last event of a settled stream, to a client that may have stopped reading
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class StreamCall:
    agent: AgentConfig
    model_ref: str
    model_route: ModelRoute
    pool: PoolBinding | None
    shape: RequestShape
    request_id: str
    started_ms: int
    edge: Edge


class Streams:
    """The gateway's streamed answers and their journal (one per process)."""

    def __init__(self, settler: Settler, redis: RedisClient, usage_stream: str) -> None:
        self.settler = settler
        self.journal = StreamJournal(redis, self.recover, usage_stream)

    async def answer(
        self,
        call: StreamCall,
        stream: ModelStream,
        breaker: CircuitBreaker,
        headers: list[tuple[bytes, bytes]],
        claim: Claim | None,
    ) -> Result:
        """Relay an open event stream, then settle it once however it ended (see ``streaming.py``).

        On a normal end the held ``[DONE]`` (and usage chunk) is sent only after the usage
        event is written and durable; if that fails the stream ends with an error event.
        """
        meter = SseMeter(call.edge.wants_usage)
        watch = ClientWatch(call.edge.receive, stream)
        end = StreamEnd.CLIENT_CLOSED  # cancelled mid-relay (a shutdown past its grace): as if the client left
        t0 = time.perf_counter()
        try:
            await call.edge.start(200, headers)
            self.journal.open(call.request_id, functools.partial(journal_record, call))
            end = await relay(stream, meter, call.edge.send, watch, self.journal.progress, call.request_id)
        finally:
            watch.stop()
            stream.close()
            if end in (StreamEnd.UPSTREAM_BROKEN, StreamEnd.TIMEOUT):
                breaker.record_failure(time.monotonic())
            m.child(m.STREAMS, end.value).inc()
            charge = stream_charge(call, meter.result(call.shape), meter.delivered, end)
            if claim is not None:
                charge.outcome = replay_refusal(call.request_id)
            failure = await self.settler.shielded(self._settle(call, charge, claim, meter))
        if end is not StreamEnd.CLIENT_CLOSED:
            tail = failure or (b"".join(meter.held) if end is StreamEnd.COMPLETED else _broken_event(end, call))
            # Settled already; a client that stopped reading must not hold the request open.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_TAIL_TIMEOUT_S):
                    await call.edge.send({"type": "http.response.body", "body": tail, "more_body": False})
        return Result(200, b"", b"text/event-stream", [], call.agent.ref, call.model_ref, time.perf_counter() - t0)

    async def _settle(self, call: StreamCall, charge: Charge, claim: Claim | None, meter: SseMeter) -> bytes | None:
        """Settle a stream and wait for durability; None when done, else the error event to end the stream with."""
        try:
            await self.settler.settle(call.agent, charge, claim)
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
            await self.settler.durable(call.agent, call.model_ref, call.request_id)
        except Reject as rej:
            return error_event(rej.code, rej.message)
        return None

    async def recover(self, request_id: str, record: bytes, chunks: int, chars: int) -> None:
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
        payer = Payer(data["agent"], data["period"], data["tpm"])
        delta = (tokens_in + tokens_out) - shape.estimated_tokens
        await self.settler.settle(payer, Charge(request_id, event.cost, delta, event), None)


def stream_charge(call: StreamCall, usage: StreamUsage, delivered: bool, end: StreamEnd) -> Charge:
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
    return Charge(call.request_id, event.cost, delta, event)


def stream_headers(
    request_id: str, remaining: str | None, limits: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    headers = [*_SSE_HEADERS, (b"x-openledger-event-id", request_id.encode()), *limits]
    if remaining is not None:
        headers.append((b"x-openledger-budget-remaining", remaining.encode()))
    return headers


def journal_record(call: StreamCall) -> bytes:
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


def replay_refusal(request_id: str) -> tuple[str | bytes, ...]:
    """The Idempotency-Key outcome of a stream: a stream is not replayed, and not charged again."""
    msg = f"this Idempotency-Key's request was streamed and metered as event {request_id}; a stream is not replayed"
    body = error_body("openai", 409, "idempotency_stream_done", msg, "Idempotency-Key")
    return ("status", "409", "ctype", b"application/json", "body", body, "event", request_id, "remaining", "")


def _stream_event(
    call: StreamCall, tokens_in: int, tokens_out: int, outcome: str, end: StreamEnd, reported: bool
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


def _broken_event(end: StreamEnd, call: StreamCall) -> bytes:
    if end is StreamEnd.TIMEOUT:
        return error_event("upstream_timeout", "the model's stream exceeded the upstream timeout", "timeout_error")
    return error_event("upstream_error", f"model {call.model_ref.split('/')[1]!r} broke off the stream")
