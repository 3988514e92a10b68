"""Pure parts of streaming and the OpenAI surface: the SSE meter, the headers, the estimate."""

from __future__ import annotations

import json

import orjson
import pytest

from openledger.gateway.headers import duration, ratelimit_headers, request_id
from openledger.gateway.metering import CHAT_TEMPLATE_TOKENS, IMAGE_MAX_TOKENS, RequestError, estimate
from openledger.gateway.protocols import Route, error_body, match_path, openai_error, upstream_path
from openledger.gateway.sse import (
    DONE,
    EventTooLarge,
    SseMeter,
    StreamEnd,
    error_event,
    request_usage_body,
    stream_outcome,
)

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(text: str) -> dict[str, object]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}


def test_the_gateway_asks_for_usage_and_remembers_whether_the_client_did() -> None:
    body, wants = request_usage_body({"stream": True, "stream_options": {"foo": 1}})
    assert json.loads(body)["stream_options"] == {"foo": 1, "include_usage": True} and not wants
    body, wants = request_usage_body({"stream": True, "stream_options": {"include_usage": True}})
    assert wants and json.loads(body)["stream_options"] == {"include_usage": True}


def test_text_passes_at_once_and_usage_and_done_are_held_or_dropped() -> None:
    meter = SseMeter(client_wants_usage=False)
    assert meter.feed(_event(_chunk("ab"))) == _event(_chunk("ab"))
    # An event split across reads is sent once complete.
    raw = _event(_chunk("cd"))
    assert meter.feed(raw[:7]) == b""
    assert meter.feed(raw[7:] + _event(USAGE) + DONE) == raw
    assert meter.held == [DONE] and meter.done and meter.usage == (4, 3)
    shape = estimate("openai", "chat", CHAT)
    usage = meter.result(shape)
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (4, 3, True)

    wanting = SseMeter(client_wants_usage=True)
    assert wanting.feed(_event(USAGE) + DONE) == b""
    assert wanting.held == [_event(USAGE), DONE]


def test_usage_riding_on_a_text_chunk_is_removed_unless_asked_for() -> None:
    chunk = {**_chunk("x"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    out = SseMeter(client_wants_usage=False).feed(_event(chunk))
    assert "usage" not in json.loads(out[6:]) and json.loads(out[6:])["choices"]
    assert SseMeter(client_wants_usage=True).feed(_event(chunk)) == _event(chunk)


def test_without_usage_what_was_delivered_is_counted_and_capped() -> None:
    meter = SseMeter(client_wants_usage=False)
    meter.feed(b"".join(_event(_chunk("w ")) for _ in range(4)) + _event(_chunk("x" * 40)))
    shape = estimate("openai", "chat", CHAT)
    usage = meter.result(shape)
    assert not usage.reported and usage.input_tokens == shape.estimated_input_tokens
    assert usage.output_tokens == 10  # max(5 chunks, 48 chars / 4 = 12), capped at max_tokens
    tools = SseMeter(client_wants_usage=False)
    call = {"index": 0, "function": {"name": "f", "arguments": '{"a": 1}'}}
    tools.feed(_event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
    assert tools.delivered and tools.text_chars == 9  # tool-call arguments are output too


def test_crlf_comments_and_odd_events_pass_through() -> None:
    meter = SseMeter(client_wants_usage=False)
    assert meter.feed(b": keep-alive\r\n\r\n") == b": keep-alive\n\n"
    assert meter.feed(b"data: not json\n\n") == b"data: not json\n\n"
    assert meter.feed(b"data: [1]\n\n") == b"data: [1]\n\n"
    assert meter.feed(b'data: {"choices": [{"text": "tail"}]}') == b""
    assert meter.rest() == b'data: {"choices": [{"text": "tail"}]}\n\n' and meter.text_chars == 4


def test_error_events_are_openai_shaped() -> None:
    event = error_event("upstream_error", "broke")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "error": {"message": "broke", "type": "api_error", "code": "upstream_error", "param": None}
    }


def test_tools_functions_and_images_count_in_the_estimate() -> None:
    plain = estimate("openai", "chat", CHAT)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    with_tools = estimate("openai", "chat", {**CHAT, "tools": [tool], "tool_choice": "auto"})
    schema_bytes = len(orjson.dumps([tool])) + len(b"auto")
    assert with_tools.max_input_tokens == plain.max_input_tokens + schema_bytes
    assert with_tools.estimated_input_tokens > plain.estimated_input_tokens
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    parts = [{"type": "text", "text": "hello there"}, image]
    with_image = estimate("openai", "chat", {**CHAT, "messages": [{"role": "user", "content": parts}]})
    assert with_image.max_input_tokens == plain.max_input_tokens + IMAGE_MAX_TOKENS
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    history = estimate("openai", "chat", {**CHAT, "messages": [{"role": "assistant", "tool_calls": calls}]})
    assert history.max_input_tokens == len(orjson.dumps(calls)) + 4 + CHAT_TEMPLATE_TOKENS


def test_embeddings_are_bounded_by_their_input() -> None:
    shape = estimate("openai", "embeddings", {"input": ["ab", "cde"]})
    assert (shape.max_input_tokens, shape.max_output_tokens) == (7, 0)
    assert estimate("openai", "embeddings", {"input": [1, 2, 3]}).max_input_tokens == 3
    assert estimate("openai", "embeddings", {"input": [[1, 2], [3]]}).max_input_tokens == 3
    with pytest.raises(RequestError, match=r"^input:"):
        estimate("openai", "embeddings", {"input": 5})


def test_embeddings_route_and_quota_errors_as_openai_sends_them() -> None:
    assert match_path("/v1/embeddings") == Route("openai", "embeddings", None)
    assert match_path("/openai/v1/embeddings") == Route("openai", "embeddings", None)
    assert upstream_path(Route("openai", "embeddings", None), "m") == "/openai/v1/embeddings"
    assert openai_error(402, "budget_exhausted") == (429, "insufficient_quota", ((b"x-should-retry", b"false"),))
    assert openai_error(429, "rate_limited") == (429, "rate_limited", ())
    body = json.loads(error_body("openai", 429, "insufficient_quota", "no money"))
    assert body["error"]["type"] == body["error"]["code"] == "insufficient_quota"


def test_request_ids_are_echoed_when_sane_and_minted_otherwise() -> None:
    assert request_id(b"trace-1") == b"trace-1"
    for bad in (None, b"", b"has space", b"x" * 129, "é".encode()):
        minted = request_id(bad)
        assert minted.startswith(b"req_") and len(minted) == 36


def test_ratelimit_headers_from_the_limiters_backlog() -> None:
    headers = dict(ratelimit_headers(2.0, 10, 6000, b"1500000", b"600000"))
    assert headers == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"7",  # 1.5 s of backlog at 2/s = 3 used
        b"x-ratelimit-reset-requests": b"1.5s",
        b"x-ratelimit-limit-tokens": b"6000",
        b"x-ratelimit-remaining-tokens": b"5940",  # 0.6 s at 100 tokens/s
        b"x-ratelimit-reset-tokens": b"600ms",
    }
    assert ratelimit_headers(0.0, 10, 0, b"", b"") == []
    assert [duration(us) for us in (0, 1, 999_000, 60_000_000, 372_000_000)] == ["0s", "1ms", "999ms", "1m0s", "6m12s"]


def test_a_stream_is_charged_when_it_completed_or_delivered_text_else_not() -> None:
    """``COMPLETED`` means the model sent [DONE] or its usage (``relay``): its prompt was processed."""
    assert stream_outcome(StreamEnd.COMPLETED, delivered=False) == "ok"
    for end in StreamEnd:
        assert stream_outcome(end, delivered=True) == "ok"
    assert stream_outcome(StreamEnd.CLIENT_CLOSED, delivered=False) == "cancelled"
    assert stream_outcome(StreamEnd.UPSTREAM_BROKEN, delivered=False) == "upstream_error"
    assert stream_outcome(StreamEnd.TIMEOUT, delivered=False) == "timeout"


def test_fields_and_comments_before_data_do_not_hide_the_payload() -> None:
    """``id:``/``event:``/``retry:``/comment lines are SSE fields: the text is still counted, the usage
    still read, and the usage chunk the client did not ask for still stripped."""
    meter = SseMeter(client_wants_usage=False)
    text = b": keep-alive\nid: 7\nevent: message\n" + _event(_chunk("abcdefgh"))
    assert meter.feed(text) == text
    assert (meter.text_chunks, meter.text_chars) == (1, 8)
    usage = b"id: 8\nretry: 1000\n" + _event(USAGE)
    assert meter.feed(usage) == b""  # not leaked to a client that did not ask
    assert meter.usage == (4, 3)
    assert meter.feed(b"id: 9\n" + DONE) == b"" and meter.done and meter.held == [DONE]


def test_usage_on_a_text_chunk_with_fields_is_removed_and_the_fields_kept() -> None:
    meter = SseMeter(client_wants_usage=False)
    chunk = {**_chunk("ab"), "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    out = meter.feed(b"event: message\n" + _event(chunk))
    assert out.startswith(b"event: message\ndata: ") and out.endswith(b"\n\n")
    assert orjson.loads(out.split(b"data: ", 1)[1]) == _chunk("ab")
    assert meter.usage == (2, 1) and meter.text_chars == 2


def test_multi_line_data_is_joined_into_one_payload() -> None:
    meter = SseMeter(client_wants_usage=True)
    raw = orjson.dumps(_chunk("abcd"))
    half = raw.index(b',"choices"') + 1  # joined with a newline: JSON whitespace between members
    event = b"data: " + raw[:half] + b"\ndata:" + raw[half:] + b"\n\n"
    assert meter.feed(event) == event
    assert meter.text_chars == 4 and meter.text_chunks == 1
    usage = orjson.dumps(USAGE)
    cut = usage.index(b',"usage"') + 1
    assert meter.feed(b"data: " + usage[:cut] + b"\ndata: " + usage[cut:] + b"\n\n") == b""
    assert meter.usage == (4, 3) and len(meter.held) == 1


def test_an_event_larger_than_the_limit_breaks_the_stream() -> None:
    """``SseMeter`` buffers one event at most; a model sending an endless event cannot fill memory."""
    meter = SseMeter(client_wants_usage=False, max_event_bytes=100)
    assert meter.feed(b"data: " + b"x" * 50) == b""
    with pytest.raises(EventTooLarge):
        meter.feed(b"x" * 60)
    ok = SseMeter(client_wants_usage=False, max_event_bytes=100)
    assert ok.feed(_event(_chunk("a" * 30)) * 5)  # many small events in one read are fine
