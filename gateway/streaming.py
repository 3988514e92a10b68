"""Relaying a streamed answer: model -> gateway -> client, one chunk at a time.

``relay`` reads the model's next chunk only after the client's ASGI ``send`` of
the previous one returned (uvicorn's ``send`` waits while the socket's write
buffer is full), and ``UpstreamPool`` stops reading from the model while chunks
pile up (``STREAM_HIGH_WATER``): backpressure end to end, nothing buffered whole.

How a stream ends (``StreamEnd``) decides its usage event (``app.py``):
``completed`` (the model finished: it sent ``[DONE]`` or its usage; its ``[DONE]``
is held until the event is written), ``client_closed`` (``ClientWatch`` saw the client go: the model's
connection is closed, which cancels the generation), ``upstream_broken`` (the
model's connection died mid-stream, it closed without ``[DONE]`` or usage, or sent
an event over ``sse.MAX_EVENT_BYTES``), ``timeout`` (the stream outlived the
upstream deadline, which bounds the whole stream so the in-flight ttl of
``lifetimes.py`` still outlives every live request).

``SessionStream`` adapts an aiohttp response (https:// upstreams) to the same
``read``/``abort``/``close`` interface as ``upstream.UpstreamStream``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import aiohttp

from openledger.gateway.sse import EventTooLarge, SseMeter, StreamEnd
from openledger.gateway.upstream import UpstreamBroken

__all__ = ["ClientWatch", "ModelStream", "SessionStream", "StreamEnd", "relay"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


class ModelStream(Protocol):
    status: int
    content_type: bytes
    deadline: float  # the event loop's time (``loop.time()``) past which the stream has timed out

    async def read(self) -> bytes: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class ClientWatch:
    """Waits on ASGI ``receive`` for the client's disconnect; then aborts the model's stream."""

    def __init__(self, receive: Receive, stream: ModelStream) -> None:
        self.gone = False
        self._receive = receive
        self._stream = stream
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self._stream.abort()
                return

    def stop(self) -> None:
        self._task.cancel()


async def relay(
    stream: ModelStream,
    meter: SseMeter,
    send: Send,
    watch: ClientWatch,
    progress: Callable[[str, int, int], None],
    request_id: str,
) -> StreamEnd:
    """Pass the model's events to the client as they come until the stream ends; say how it ended.

    ``progress(request_id, chunks, chars)`` is told what was delivered after each send (the journal).
    The upstream deadline bounds the whole relay, the client's ``send`` included: a client that
    stops reading cannot keep a stream (and its slot) alive past it.
    """
    try:
        async with asyncio.timeout_at(stream.deadline):
            return await _relay(stream, meter, send, watch, progress, request_id)
    except TimeoutError:
        return StreamEnd.TIMEOUT


async def _relay(
    stream: ModelStream,
    meter: SseMeter,
    send: Send,
    watch: ClientWatch,
    progress: Callable[[str, int, int], None],
    request_id: str,
) -> StreamEnd:
    while True:
        try:
            data = await stream.read()
        except UpstreamBroken:
            return StreamEnd.CLIENT_CLOSED if watch.gone else StreamEnd.UPSTREAM_BROKEN
        if watch.gone:
            return StreamEnd.CLIENT_CLOSED
        try:
            out = meter.feed(data) if data else meter.rest()
        except EventTooLarge:
            return StreamEnd.UPSTREAM_BROKEN
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
            progress(request_id, meter.text_chunks, meter.text_chars)
            if watch.gone:
                return StreamEnd.CLIENT_CLOSED
        if not data:
            # A model that closes without [DONE] or its usage (an error event, then EOF) did not finish.
            return StreamEnd.COMPLETED if meter.done or meter.usage is not None else StreamEnd.UPSTREAM_BROKEN


class SessionStream:
    """An aiohttp response read as a stream (``read`` raises ``UpstreamBroken`` like the pool's)."""

    def __init__(self, response: aiohttp.ClientResponse, deadline: float) -> None:
        self.status = response.status
        self.deadline = deadline
        self.content_type = response.headers.get("Content-Type", "application/json").encode()
        self._response = response

    async def read(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamBroken(f"upstream stream broke: {exc}") from None

    def abort(self) -> None:
        self._response.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._response.release()
