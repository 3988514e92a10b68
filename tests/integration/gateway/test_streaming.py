"""Streaming through the gateway (issue 13): SSE relayed chunk by chunk, and exactly
one usage event per stream however it ends: it completes, the client hangs up,
the model breaks off, the gateway is killed. Real Redis, a real streaming HTTP
model server with fault injection (``sse_upstream.py``), real gateway processes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
import redis

from openledger.gateway.journal import LEASE_S, RECORD_TTL_S, dead_key, index_key, record_key
from openledger.gateway.metering import CHAT_TEMPLATE_TOKENS
from openledger.gateway.records import AgentKeys, settled_key
from openledger.money import to_decimal_string
from openledger.settings import Settings
from openledger.wire import Price
from tests.integration.gateway.conftest import GatewayProcess, provision_agent, route_model, usage_events
from tests.integration.gateway.sse_upstream import PROMPT_TOKENS, SseUpstream
from tests.waiting import wait_for

PRICE = Price(per_request=10**12, per_input_token=10**13, per_output_token=10**15)
CHAT = {"model": "llm", "messages": [{"role": "user", "content": "say some words"}], "max_tokens": 50}


@pytest.fixture
def upstream() -> Iterator[SseUpstream]:
    server = SseUpstream()
    yield server
    server.close()


def _setup(r: redis.Redis, namespace: str, upstream: SseUpstream, **limits: Any) -> str:
    key = provision_agent(r, namespace, models=("llm",), **limits)
    route_model(r, namespace, "llm", upstream.url, "openai", price=PRICE)
    return key


class Sse:
    """A raw SSE client on http.client: the response head, then events one by one."""

    def __init__(
        self, url: str, body: Any, key: str, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"
    ) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
        all_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}", **(headers or {})}
        self.conn.request("POST", path, json.dumps(body), all_headers)
        self.response = self.conn.getresponse()

    def events(self) -> Iterator[bytes]:
        data = b""
        while True:
            line = self.response.readline()
            if not line:
                return
            if line == b"\n":
                yield data
                data = b""
            elif line.startswith(b"data: "):
                data = line[6:].rstrip(b"\n")

    def hang_up(self) -> None:
        assert self.conn.sock is not None
        self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def _one_event(r: redis.Redis, gw: GatewayProcess, ref: str, timeout_s: float = 15) -> dict[str, str]:
    wait_for(lambda: len(usage_events(r, gw.stream, ref)) >= 1, timeout_s, "a usage event")
    time.sleep(0.3)  # a second event would be written by now
    [event] = usage_events(r, gw.stream, ref)
    return event


def _redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _released(r: redis.Redis, ref: str) -> bool:
    keys = AgentKeys(ref)
    return r.zcard(keys.inflight) == 0 and r.hget(keys.reserved, "_total") in (None, b"0")


def test_openai_client_streams_chat_and_completions_metered_by_the_models_usage(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4 "
    assert all(c.choices and c.usage is None for c in chunks)  # the usage chunk the client did not ask for is gone
    assert upstream.bodies[-1]["stream_options"] == {"include_usage": True}  # but the gateway asked the model

    completion = list(client.completions.create(model="llm", prompt="write some words", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in completion if c.choices) == "w0 w1 w2 w3 w4 "

    events = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert [(e["outcome"], int(e["input_tokens"]), int(e["output_tokens"])) for e in events] == [
        ("ok", PROMPT_TOKENS, 5),
        ("ok", PROMPT_TOKENS, 5),
    ]
    assert all(int(e["cost"]) == PRICE.cost(PROMPT_TOKENS, 5) for e in events)
    assert all(json.loads(e["extra"]) == {"stream": "completed", "usage": "reported"} for e in events)
    assert _released(rds, f"{namespace}/agent")


def test_async_openai_client_stream_with_usage_gets_the_usage_chunk(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
        stream = await client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    [event] = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert int(event["output_tokens"]) == chunks[-1].usage.completion_tokens


def test_raw_sse_is_relayed_as_it_arrives_and_metered_before_done(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    upstream.words, upstream.delay_s = 6, 0.3
    sent = time.monotonic()
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key, {"x-request-id": "trace-123"})
    headers = dict(sse.response.getheaders())
    assert sse.response.status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["x-request-id"] == "trace-123" and headers["x-openledger-event-id"]
    events = sse.events()
    first = json.loads(next(events))
    first_at = time.monotonic() - sent
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first_at < 1.0  # the model needs 1.8 s for the whole answer: chunks are not buffered
    rest = list(events)
    assert rest[-1] == b"[DONE]"
    # When [DONE] arrived, the usage event was already written.
    [event] = usage_events(rds, shared_gateway.stream, ref)
    assert event["id"] == headers["x-openledger-event-id"] and int(event["output_tokens"]) == 6
    assert len(rest) == 7  # five more words, the finish chunk, [DONE]


def test_client_hanging_up_mid_stream_cancels_the_model_and_pays_for_what_it_got(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    upstream.words, upstream.delay_s = 40, 0.1
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key)
    events = sse.events()
    received = [json.loads(next(events)) for _ in range(3)]
    assert [c["choices"][0]["delta"]["content"] for c in received] == ["w0 ", "w1 ", "w2 "]
    sse.hang_up()
    assert upstream.cancelled.wait(5), "the model's request was not cancelled"
    event = _one_event(rds, shared_gateway, ref)
    assert event["outcome"] == "ok" and json.loads(event["extra"]) == {"stream": "client_closed", "usage": "counted"}
    tokens_out = int(event["output_tokens"])
    assert 3 <= tokens_out < 40  # what was sent before the hang-up was noticed, never the whole answer
    assert 0 < int(event["cost"]) == PRICE.cost(int(event["input_tokens"]), tokens_out)
    assert int(event["cost"]) <= PRICE.cost(len("say some words") + 4 + CHAT_TEMPLATE_TOKENS, 50)  # <= reserved
    wait_for(lambda: _released(rds, ref), 5, "slot and reservation released")
    assert not upstream.finished.is_set()


def test_model_breaking_off_mid_stream_is_metered_as_delivered_and_reported(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    upstream.words, upstream.break_after = 10, 3
    events = list(Sse(shared_gateway.url, {**CHAT, "stream": True}, key).events())
    assert len(events) == 4 and json.loads(events[-1])["error"]["code"] == "upstream_error"
    event = _one_event(rds, shared_gateway, ref)
    assert (event["outcome"], int(event["output_tokens"])) == ("ok", 3)
    assert json.loads(event["extra"]) == {"stream": "upstream_broken", "usage": "counted"}
    assert _released(rds, ref)

    # Broken before any text: nothing delivered, nothing charged, the failure recorded.
    upstream.break_after = 0
    events = list(Sse(shared_gateway.url, {**CHAT, "stream": True}, key).events())
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    wait_for(lambda: len(usage_events(rds, shared_gateway.stream, ref)) == 2, 10, "second event")
    second = usage_events(rds, shared_gateway.stream, ref)[1]
    assert (second["outcome"], second["cost"]) == ("upstream_error", "0")


def test_gateway_killed_mid_stream_is_settled_once_by_the_next_gateway(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    upstream.words, upstream.delay_s = 200, 0.05
    gw = start_gateway()
    sse = Sse(gw.url, {**CHAT, "max_tokens": 300, "stream": True}, key)
    event_id = sse.response.getheader("x-openledger-event-id") or ""
    events = sse.events()
    for _ in range(12):
        next(events)
    time.sleep(0.6)  # the journal has noted some progress
    gw.stop(signal.SIGKILL)
    assert usage_events(rds, gw.stream, ref) == []
    # The lease (renewed by a live gateway) is good for a minute of Redis time; expire it now.
    lease_left_ms = (rds.zscore(index_key(gw.stream), event_id) or 0) - _redis_ms(rds)
    assert LEASE_S * 1000 - 30_000 < lease_left_ms <= LEASE_S * 1000
    assert 0 < rds.pttl(record_key(event_id)) <= RECORD_TTL_S * 1000
    rds.zadd(index_key(gw.stream), {event_id: 0})
    gw.start()  # a gateway of the same deployment comes up and sweeps
    event = _one_event(rds, gw, ref, timeout_s=20)
    assert event["id"] == event_id and event["outcome"] == "ok"
    assert json.loads(event["extra"])["stream"] == "gateway_lost"
    assert 1 <= int(event["output_tokens"]) <= 200 and int(event["cost"]) > 0
    assert _released(rds, ref)
    assert rds.exists(record_key(event_id)) == 0 and rds.zscore(index_key(gw.stream), event_id) is None
    time.sleep(2.5)  # another sweep: still one event
    assert len(usage_events(rds, gw.stream, ref)) == 1


def test_a_stream_settled_before_its_gateway_died_is_not_charged_again(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key)
    event_id = sse.response.getheader("x-openledger-event-id") or ""
    assert list(sse.events())[-1] == b"[DONE]"
    assert rds.exists(settled_key(event_id)) == 1
    # As a gateway killed between settling and dropping its journal record leaves it:
    record = {"agent": ref, "period": "Day", "tpm": 1000, "shape": [100, 50, 70, 20],
              "event": usage_events(rds, shared_gateway.stream, ref)[0]}  # fmt: skip
    rds.hset(record_key(event_id), mapping={"record": json.dumps(record), "chunks": "5", "chars": "15"})
    rds.zadd(index_key(shared_gateway.stream), {event_id: 0})
    wait_for(lambda: rds.zscore(index_key(shared_gateway.stream), event_id) is None, 10, "the sweep")
    assert len(usage_events(rds, shared_gateway.stream, ref)) == 1


def test_concurrent_streams_never_exceed_a_hard_budget(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    ref = f"{namespace}/agent"
    body = {**CHAT, "max_tokens": 10, "stream": True}
    # Each stream reserves price.cost(bytes of the prompt + 4 + the chat template, 10); the budget holds three.
    reserve = PRICE.cost(len("say some words") + 4 + CHAT_TEMPLATE_TOKENS, 10)
    budget = 3 * reserve + reserve // 2
    key = _setup(rds, namespace, upstream, budget=to_decimal_string(budget))
    upstream.words, upstream.delay_s = 8, 0.1

    def stream() -> tuple[int, int]:
        client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=20)
        try:
            return 200, len(list(client.chat.completions.create(**body)))  # type: ignore[call-overload]
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota" and exc.response.headers["x-should-retry"] == "false"
            return 429, 0

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: stream(), range(8)))
    assert sorted(status for status, _ in results) == [200] * 3 + [429] * 5
    events = usage_events(rds, shared_gateway.stream, ref)
    assert len(events) == 3 and all(e["outcome"] == "ok" for e in events)
    spent = int(rds.hget(AgentKeys(ref).spend, "spent") or 0)
    assert spent == sum(int(e["cost"]) for e in events) <= budget
    assert _released(rds, ref)


def test_a_model_that_sends_no_usage_is_metered_by_what_was_delivered(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    upstream.usage, upstream.words = False, 7
    events = list(Sse(shared_gateway.url, {**CHAT, "stream": True}, key).events())
    assert events[-1] == b"[DONE]"
    [event] = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert (event["outcome"], int(event["output_tokens"])) == ("ok", 7)  # seven chunks of text
    assert json.loads(event["extra"]) == {"stream": "completed", "usage": "counted"}
    bound = len("say some words") + 4 + CHAT_TEMPLATE_TOKENS
    assert 0 < int(event["input_tokens"]) <= bound  # the estimate, within the reserved bound


def test_a_streamed_request_retried_with_its_idempotency_key_is_not_charged_again(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    headers = {"Idempotency-Key": "stream-1"}
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key, headers)
    event_id = sse.response.getheader("x-openledger-event-id") or ""
    assert list(sse.events())[-1] == b"[DONE]"
    again = Sse(shared_gateway.url, {**CHAT, "stream": True}, key, headers)
    assert again.response.status == 409 and again.response.getheader("x-openledger-event-id") == event_id
    assert json.loads(again.response.read())["error"]["code"] == "idempotency_stream_done"
    assert len(usage_events(rds, shared_gateway.stream, f"{namespace}/agent")) == 1
    assert len(upstream.bodies) == 1


def test_a_stalled_stream_ends_at_the_upstream_timeout_metered_as_delivered(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    gw = start_gateway(upstream_timeout_s="2")
    upstream.words, upstream.stall_after = 10, 2
    started = time.monotonic()
    events = list(Sse(gw.url, {**CHAT, "stream": True}, key).events())
    assert 1.5 < time.monotonic() - started < 10
    assert len(events) == 3 and json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    event = _one_event(rds, gw, ref)
    assert (event["outcome"], int(event["output_tokens"])) == ("ok", 2)
    assert json.loads(event["extra"]) == {"stream": "timeout", "usage": "counted"}
    assert _released(rds, ref)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_null_output_bound_reaches_the_model_as_the_reserved_bound(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream, field: str
) -> None:
    """``"max_tokens": null`` is no bound: the model would generate up to its own default, unreserved."""
    key = _setup(rds, namespace, upstream)
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], field: None, "stream": True}
    assert list(Sse(shared_gateway.url, body, key).events())[-1] == b"[DONE]"
    sent = upstream.bodies[-1]
    assert sent["max_tokens"] == Settings().gateway_default_max_tokens and "max_completion_tokens" not in sent


def test_legacy_completions_default_to_sixteen_output_tokens(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """OpenAI's and vLLM's default for /v1/completions is 16: reserved and sent as such, not 256."""
    key = provision_agent(rds, namespace, models=("llm",), budget=to_decimal_string(3 * PRICE.cost(40, 16)))
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    for stream in (True, False):
        body = {"model": "llm", "prompt": "write", "max_tokens": None, "stream": stream}
        if stream:
            assert list(Sse(shared_gateway.url, body, key, path="/v1/completions").events())[-1] == b"[DONE]"
        else:
            client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
            client.completions.create(model="llm", prompt="write")
        assert upstream.bodies[-1]["max_tokens"] == 16
    # The budget covers a 16-token reservation; a 256-token one would have been refused.
    assert [e["outcome"] for e in usage_events(rds, shared_gateway.stream, f"{namespace}/agent")] == ["ok", "ok"]


def test_a_model_ending_with_an_error_event_and_no_done_is_not_charged(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """An error event then a clean end (no [DONE], no usage) is a broken stream, not a completed one."""
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    upstream.error_after = 0
    events = list(Sse(shared_gateway.url, {**CHAT, "stream": True}, key).events())
    assert json.loads(events[0])["error"]["message"] == "generation failed"
    assert json.loads(events[-1])["error"]["code"] == "upstream_error" and b"[DONE]" not in events
    event = _one_event(rds, shared_gateway, ref)
    assert (event["outcome"], event["cost"]) == ("upstream_error", "0")
    assert json.loads(event["extra"])["stream"] == "upstream_broken"
    assert _released(rds, ref)


def test_sse_fields_before_data_do_not_hide_text_or_usage(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """``id:``/``event:``/comment lines before ``data:``: the usage chunk is still read and still
    withheld from a client that did not ask for it."""
    key = _setup(rds, namespace, upstream)
    upstream.fields = b": note\nid: 1\nevent: message\n"
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 w4 "
    [event] = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert (int(event["input_tokens"]), int(event["output_tokens"])) == (PROMPT_TOKENS, 5)
    assert json.loads(event["extra"]) == {"stream": "completed", "usage": "reported"}


def test_a_client_that_stops_reading_cannot_hold_a_stream_past_the_upstream_timeout(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """The deadline bounds the whole relay, the client's send included: a stream whose client never
    reads is ended and metered (as delivered) at the upstream timeout, its slot released."""
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    gw = start_gateway(upstream_timeout_s="2")
    upstream.words, upstream.pad = 4000, 4096  # 16 MB: more than every socket buffer on the way holds
    body = json.dumps({**CHAT, "stream": True}).encode()
    parts = urlsplit(gw.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((parts.hostname or "", parts.port or 80))
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body)
        started = time.monotonic()
        event = _one_event(rds, gw, ref, timeout_s=20)  # the client has read nothing
        assert time.monotonic() - started < 12
        assert (event["outcome"], int(event["output_tokens"])) == ("ok", 50)  # delivered, capped at the bound
        assert json.loads(event["extra"]) == {"stream": "timeout", "usage": "counted"}
        wait_for(lambda: _released(rds, ref), 5, "slot and reservation released")
    finally:
        sock.close()


def test_a_stream_whose_settle_failed_is_journaled_and_its_idempotency_key_kept(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """A short stream (no journal record yet) whose settle fails is journaled on the spot and
    settled by a sweep once Redis works; a retry with its Idempotency-Key meanwhile is 409, not
    a second metered stream."""
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    reserved = AgentKeys(ref).reserved
    saved: list[bytes] = []

    def break_settle() -> None:  # settle.lua's first read of the reservations now fails (WRONGTYPE)
        saved.append(rds.dump(reserved))
        rds.delete(reserved)
        rds.set(reserved, "not a hash")

    upstream.on_stream = break_settle
    headers = {"Idempotency-Key": "abandoned-1"}
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key, headers)
    event_id = sse.response.getheader("x-openledger-event-id") or ""
    events = list(sse.events())
    assert json.loads(events[-1])["error"]["code"] == "metering_unavailable"
    wait_for(lambda: rds.hexists(record_key(event_id), "record"), 10, "the journal record")
    assert rds.hget(record_key(event_id), "chunks") == b"5"
    again = Sse(shared_gateway.url, {**CHAT, "stream": True}, key, headers)
    assert again.response.status == 409, again.response.read()
    assert json.loads(again.response.read())["error"]["code"] == "idempotency_in_progress"
    assert len(upstream.bodies) == 1
    rds.delete(reserved)
    rds.restore(reserved, 0, saved[0])
    event = _one_event(rds, shared_gateway, ref, timeout_s=20)
    assert event["id"] == event_id and event["outcome"] == "ok" and int(event["output_tokens"]) == 5
    assert int(event["cost"]) > 0
    wait_for(lambda: _released(rds, ref), 5, "slot and reservation released")
    wait_for(lambda: rds.zscore(index_key(shared_gateway.stream), event_id) is None, 5, "the entry dropped")


def test_an_unusable_journal_record_is_set_aside_and_the_sweep_goes_on(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """One bad record (garbage, an unknown version) must not stop the sweep of the others."""
    key = _setup(rds, namespace, upstream)
    ref = f"{namespace}/agent"
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key)
    assert list(sse.events())[-1] == b"[DONE]"
    [settled] = usage_events(rds, shared_gateway.stream, ref)
    index, dead = index_key(shared_gateway.stream), dead_key(shared_gateway.stream)
    good = {"agent": ref, "period": "Day", "tpm": 1000, "shape": [100, 50, 70, 20],
            "event": {**settled, "id": f"{namespace}-good"}}  # fmt: skip
    records = {
        f"{namespace}-garbage": "{not json",
        f"{namespace}-future": json.dumps({**good, "v": 99}),
        f"{namespace}-good": json.dumps(good),
    }
    for request_id, record in records.items():
        rds.hset(record_key(request_id), mapping={"record": record, "chunks": "4", "chars": "12"})
    rds.zadd(index, {request_id: 0 for request_id in records})
    wait_for(lambda: len(usage_events(rds, shared_gateway.stream, ref)) == 2, 10, "the good record settled")
    wait_for(lambda: rds.zcard(dead) >= 2, 5, "the bad records set aside")
    assert {f"{namespace}-garbage", f"{namespace}-future"} <= {m.decode() for m in rds.zrange(dead, 0, -1)}
    assert not any(rds.zscore(index, request_id) is not None for request_id in records)
    assert rds.exists(record_key(f"{namespace}-garbage")) == 1  # kept for an operator
    recovered = usage_events(rds, shared_gateway.stream, ref)[1]
    assert recovered["id"] == f"{namespace}-good" and int(recovered["output_tokens"]) == 4
