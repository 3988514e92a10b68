"""Server-sent events of an OpenAI stream, metered as they pass: pure.

The gateway asks the model for its own counts (``stream_options.include_usage``:
a last chunk with ``choices: []`` and ``usage``) and ``SseMeter`` takes the stream
apart event by event as it is relayed:

- text chunks pass through at once (never buffered whole), and what they carry
  is counted: chunks with text and characters of text (``delta.content``,
  ``delta.reasoning_content``, tool-call arguments, ``text`` for completions);
- the usage chunk is held back when the client asked for usage, dropped when it
  did not (usage on a chunk that also has choices is removed from that chunk);
- ``data: [DONE]`` is held back: the gateway sends the held events only after the
  usage event is written (and durable by policy).

Metering (``StreamUsage``): the model's usage when it sent one; otherwise (the
client hung up, the model broke off or sends no usage) what was delivered:
output tokens = max(chunks with text, ceil(characters / 4)) (a streaming model
sends about one token per chunk; four characters per token is OpenAI's rule of
thumb), input tokens = the request's estimate (characters / 4 plus per-message
overhead, ``RequestShape.estimated_input_tokens``). Both are capped by the bounds
the reservation covered, so a stream never costs more than was reserved.
``stream_outcome`` says whether it is charged at all: a completed stream, or one
that delivered text, is; one that ended early with nothing delivered is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from openledger.gateway.metering import RequestShape

__all__ = ["DONE", "SseMeter", "StreamEnd", "StreamUsage", "error_event", "request_usage_body", "stream_outcome"]

DONE = b"data: [DONE]\n\n"


class StreamEnd(Enum):
    """How a relayed stream ended (``streaming.relay``)."""

    COMPLETED = "completed"
    CLIENT_CLOSED = "client_closed"
    UPSTREAM_BROKEN = "upstream_broken"
    TIMEOUT = "timeout"


def stream_outcome(end: StreamEnd, delivered: bool) -> str:
    """The usage event's outcome: ``ok`` (charged) for a completed stream or one that delivered
    text; one that ended early with no text delivered is charged nothing."""
    if delivered or end is StreamEnd.COMPLETED:
        return "ok"
    if end is StreamEnd.UPSTREAM_BROKEN:
        return "upstream_error"
    if end is StreamEnd.TIMEOUT:
        return "timeout"
    return "cancelled"


@dataclass(frozen=True)
class StreamUsage:
    input_tokens: int
    output_tokens: int
    reported: bool  # from the model's own usage chunk (else counted from what was delivered)


def request_usage_body(body: dict[str, Any]) -> tuple[bytes, bool]:
    """The body to send upstream (usage requested) and whether the client itself asked for usage."""
    options = body.get("stream_options")
    wants = isinstance(options, dict) and options.get("include_usage") is True
    if wants:
        return orjson.dumps(body), True
    upstream = dict(body)
    upstream["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps(upstream), False


def error_event(code: str, message: str, kind: str = "api_error") -> bytes:
    """An OpenAI-shaped error as an SSE event (how a stream that already began reports a failure)."""
    error = {"message": message, "type": kind, "code": code, "param": None}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def _count_of(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SseMeter:
    """Feeds on the upstream's bytes; says what to send now and what to hold until settled."""

    def __init__(self, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: tuple[int, int] | None = None
        self.text_chunks = 0
        self.text_chars = 0
        self.done = False  # ``[DONE]`` seen
        self.held: list[bytes] = []  # the usage chunk (if the client wants it) and [DONE]
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes from the model; return the complete events to send now."""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return b""
        self._buffer = buffer[end + 2 :]
        out: list[bytes] = []
        for event in buffer[:end].split(b"\n\n"):
            if event:
                kept = self._event(event)
                if kept is not None:
                    out.append(kept + b"\n\n")
        return b"".join(out)

    def rest(self) -> bytes:
        """An unterminated last event (the model closed without a blank line): sent as it is."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return b""
        kept = self._event(rest.rstrip(b"\n"))
        return b"" if kept is None else kept + b"\n\n"

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data:") or b"\ndata:" in event:
            return event  # comments, named events, multi-line data: relayed untouched
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            self.held.append(DONE)
            return None
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            self._count(choices)
        if not isinstance(usage, dict):
            return event
        if not choices:  # the usage chunk itself
            if self.client_wants_usage:
                self.held.append(event + b"\n\n")
            return None
        if self.client_wants_usage:
            return event
        chunk.pop("usage")
        return b"data: " + orjson.dumps(chunk)

    def _take_usage(self, usage: dict[str, Any]) -> None:
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int) and isinstance(c, int) and _count_of(p) and _count_of(c):
            self.usage = (p, c)

    def _count(self, choices: list[Any]) -> None:
        chars = 0
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")
            if isinstance(text, str):
                chars += len(text)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for name in ("content", "reasoning_content", "refusal"):
                    value = delta.get(name)
                    if isinstance(value, str):
                        chars += len(value)
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict):
                            for name in ("name", "arguments"):
                                value = function.get(name)
                                if isinstance(value, str):
                                    chars += len(value)
        if chars:
            self.text_chunks += 1
            self.text_chars += chars

    def result(self, shape: RequestShape) -> StreamUsage:
        """What to charge, capped at what the reservation covered."""
        if self.usage is not None:
            tokens_in, tokens_out = self.usage
            reported = True
        else:
            tokens_in = shape.estimated_input_tokens
            tokens_out = max(self.text_chunks, math.ceil(self.text_chars / 4))
            reported = False
        return StreamUsage(min(tokens_in, shape.max_input_tokens), min(tokens_out, shape.max_output_tokens), reported)

    @property
    def delivered(self) -> bool:
        """Whether any text reached the client."""
        return self.text_chunks > 0
