"""Server-sent events of an OpenAI stream, metered as they pass: pure.

The gateway asks the model for its own counts (``stream_options.include_usage``:
a last chunk with ``choices: []`` and ``usage``) and ``SseMeter`` takes the stream
apart event by event as it is relayed:

- text chunks pass through at once (never buffered whole), and what they carry
  is counted: chunks with text and characters of text (``delta.content``,
  ``delta.reasoning_content``, tool-call arguments, ``text`` for completions);
- events are parsed per the SSE spec: the ``data:`` lines are the payload, other
  fields (``id:``, ``event:``, ``retry:``, ``:`` comments) do not hide it; one event
  may not exceed ``MAX_EVENT_BYTES`` (``EventTooLarge``: the stream is broken);
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
``stream_outcome`` says whether it is charged at all: a completed stream (the
model sent ``[DONE]`` or its usage; a bare end of the connection is a broken
stream), or one that delivered text, is; one that ended early with nothing
delivered is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from openledger.gateway.metering import RequestShape

__all__ = [
    "DONE",
    "MAX_EVENT_BYTES",
    "EventTooLarge",
    "SseMeter",
    "StreamEnd",
    "StreamUsage",
    "error_event",
    "request_usage_body",
    "stream_outcome",
]

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20  # one event (a chunk of a few tokens) is far smaller; a bigger one is a broken model


class EventTooLarge(ValueError):
    """The model sent an event larger than ``MAX_EVENT_BYTES`` (without its end): the stream is broken."""


class StreamEnd(Enum):
    """How a relayed stream ended (``streaming.relay``)."""

    COMPLETED = "completed"
    CLIENT_CLOSED = "client_closed"
    UPSTREAM_BROKEN = "upstream_broken"
    TIMEOUT = "timeout"


def stream_outcome(end: StreamEnd, delivered: bool) -> str:
    """The usage event's outcome: ``ok`` (charged) for a completed stream (the model sent ``[DONE]``
    or its usage: ``streaming.relay``) or one that delivered text; one that ended early with no
    text delivered is charged nothing."""
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

    def __init__(self, client_wants_usage: bool, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.client_wants_usage = client_wants_usage
        self.max_event_bytes = max_event_bytes
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
        self._buffer = buffer if end < 0 else buffer[end + 2 :]
        if len(self._buffer) > self.max_event_bytes:
            raise EventTooLarge(f"an event of the model's stream exceeds {self.max_event_bytes} bytes")
        if end < 0:
            return b""
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
        """One event (its lines, per the SSE spec): relayed, rewritten, held or dropped.

        Its ``data:`` lines are joined into the payload; ``id:``/``event:``/``retry:``
        and ``:`` comment lines are kept on what is relayed but never hide the payload.
        """
        fields: list[bytes] = []
        data: list[bytes] = []
        for line in event.split(b"\n"):
            if line == b"data" or line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            else:
                fields.append(line)
        if not data:
            return event  # comments, keep-alives: relayed untouched
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
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
        return b"\n".join((*fields, b"data: " + orjson.dumps(chunk)))

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
