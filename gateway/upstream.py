"""A small keep-alive HTTP/1.1 client on httptools for the gateway's upstream calls.

Why not aiohttp on the hot path: its request/response machinery costs about as
much CPU as the rest of the gateway together (see ../shared/calibration.md).
This pool does two things: POST a body to ``http://host:port/path`` over a reused
connection, one request per connection at a time, and return (status, body,
content type) (``post``); or open such a POST and hand its body over chunk by
chunk as it arrives (``open_stream``, for server-sent events): reading from the
model's socket pauses while ``STREAM_HIGH_WATER`` chunks or more wait for the client
(what one socket read already held is kept too), so a slow client slows the
model's connection down through TCP instead of filling memory.

Bounded: at most ``max_connections`` per upstream (callers wait for a free one),
idle connections are dropped after ``idle_s``; every call has a deadline.
A reused connection that the server had already closed fails before any byte of
a response arrives; that (and only that) is retried once on a fresh connection —
the server never saw the request, so this is not a retry in the budget's sense.

Errors: ``UpstreamRefused`` (could not connect: the model never saw the request),
``UpstreamBroken`` (the connection died mid-request: it may have), ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["STREAM_HIGH_WATER", "UpstreamBroken", "UpstreamPool", "UpstreamRefused", "UpstreamStream"]

STREAM_HIGH_WATER = 64  # chunks buffered per stream before reading from the model pauses


class UpstreamRefused(ConnectionError):
    """No connection could be made: the request never reached the model."""


class UpstreamBroken(ConnectionError):
    """The connection failed after the request was (maybe) sent."""


class _Conn(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.future: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.body: list[bytes] = []
        self.content_type = b"application/json"
        self.header_name = b""
        self.closed = False
        self.got_bytes = False
        self.idle_since = 0.0
        # Streaming mode (``stream_request``): the head resolves ``future``; chunks queue here.
        self.streaming = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: Exception | None = None
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"bad HTTP response from upstream: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamBroken(f"upstream closed the connection: {exc or 'EOF'}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        future = self.future
        if self.streaming and future is not None and not future.done():
            future.set_result((self.parser.get_status_code(), b"", self.content_type))

    def on_body(self, body: bytes) -> None:
        if not self.streaming:
            self.body.append(body)
            return
        self.chunks.append(body)
        self._wake()
        if len(self.chunks) >= STREAM_HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.streaming:
            self.complete = True
            if not self.parser.should_keep_alive():
                self.closed = True
                self.transport.close()
            self._wake()
            return
        future = self.future
        if future is not None and not future.done():
            status = self.parser.get_status_code()
            if not self.parser.should_keep_alive():
                self.closed = True
                self.transport.close()
            future.set_result((status, b"".join(self.body), self.content_type))

    def _fail(self, exc: Exception) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_exception(exc)
        if self.streaming and not self.complete and self.error is None:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stream_request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes, bytes]]:
        """Send ``payload``; the future resolves at the response head, the body then queues in ``chunks``."""
        self.streaming = True
        self.chunks.clear()
        self.complete = False
        self.error = None
        return self.request(payload)

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes, bytes]]:
        self.future = self.loop.create_future()
        self.body = []
        self.content_type = b"application/json"
        self.got_bytes = False
        self.transport.write(payload)
        return self.future


class UpstreamStream:
    """A response read as it arrives: ``read()`` returns the next chunk, ``b""`` at its end.

    ``read`` raises ``UpstreamBroken`` when the connection dies before the end and
    ``TimeoutError`` past the deadline (``deadline``, the loop's time), chunks queued
    or not. ``close()`` must be called once, always: it returns a finished connection
    to the pool, closes an unfinished one (which is how a stream is cancelled: the
    model sees its client go) and frees the slot.
    """

    def __init__(
        self, pool: UpstreamPool, upstream: _Upstream, conn: _Conn, status: int, content_type: bytes, deadline: float
    ) -> None:
        self.status = status
        self.content_type = content_type
        self._pool = pool
        self._upstream = upstream
        self._conn = conn
        self.deadline = deadline
        self._closed = False

    async def read(self) -> bytes:
        conn = self._conn
        if conn.loop.time() >= self.deadline:
            raise TimeoutError  # even with chunks queued: the deadline bounds the whole stream
        while not conn.chunks:
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            loop = conn.loop
            conn.waiter = loop.create_future()
            timer = loop.call_at(self.deadline, _expire, conn.waiter)
            try:
                await conn.waiter
            finally:
                timer.cancel()
                conn.waiter = None
        chunk = conn.chunks.popleft()
        if conn.paused and len(conn.chunks) < STREAM_HIGH_WATER // 2:
            conn.paused = False
            conn.transport.resume_reading()
        return chunk

    def abort(self) -> None:
        """Cut the connection now (the client left): ``read`` then raises ``UpstreamBroken``."""
        self._conn.transport.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        conn.streaming = False
        conn.future = None
        if conn.complete and not conn.closed and not conn.paused:
            conn.idle_since = time.monotonic()
            self._upstream.idle.append(conn)
        else:
            conn.closed = True
            conn.transport.close()
        self._upstream.slots.release()


class _Upstream:
    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host = host
        self.port = port
        self.host_header = f"{host}:{port}".encode()
        self.idle: collections.deque[_Conn] = collections.deque()
        self.slots = asyncio.Semaphore(max_connections)


class UpstreamPool:
    def __init__(self, max_connections: int = 256, idle_s: float = 4.0, connect_timeout_s: float = 2.0) -> None:
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        self._upstreams: dict[str, _Upstream] = {}

    def _upstream(self, base_url: str) -> _Upstream:
        upstream = self._upstreams.get(base_url)
        if upstream is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"upstream url must be http://host[:port], got {base_url!r}")
            upstream = self._upstreams[base_url] = _Upstream(parts.hostname, parts.port or 80, self.max_connections)
        return upstream

    async def post(self, base_url: str, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes, bytes]:
        """POST ``body`` (JSON) to ``base_url + path``; returns (status, body, content type)."""
        upstream = self._upstream(base_url)
        payload = b"".join((
            b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", upstream.host_header,
            b"\r\nContent-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body,
        ))  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with upstream.slots:
            for attempt in range(2):
                conn, reused = await self._connection(upstream, loop, deadline)
                future = conn.request(payload)
                timer = loop.call_at(deadline, _expire, future)
                try:
                    result = await future
                except UpstreamBroken:
                    conn.transport.close()
                    if reused and not conn.got_bytes and attempt == 0:
                        continue  # a stale keep-alive connection: the server never read this request
                    raise
                except TimeoutError:
                    conn.transport.close()
                    raise
                finally:
                    timer.cancel()
                if not conn.closed:
                    conn.idle_since = time.monotonic()
                    conn.future = None
                    upstream.idle.append(conn)
                return result
        raise AssertionError("unreachable")

    async def open_stream(self, base_url: str, path: str, body: bytes, timeout_s: float) -> UpstreamStream:
        """POST ``body`` and return once the response head arrived; the body is read from the stream.

        ``timeout_s`` bounds the whole response, head and body. Raises like ``post``.
        """
        upstream = self._upstream(base_url)
        payload = b"".join((
            b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", upstream.host_header,
            b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n\r\n", body,
        ))  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await upstream.slots.acquire()
        try:
            for attempt in range(2):
                conn, reused = await self._connection(upstream, loop, deadline)
                future = conn.stream_request(payload)
                timer = loop.call_at(deadline, _expire, future)
                try:
                    status, _, ctype = await future
                except UpstreamBroken:
                    conn.transport.close()
                    if reused and not conn.got_bytes and attempt == 0:
                        continue  # a stale keep-alive connection: the server never read this request
                    raise
                except BaseException:
                    conn.transport.close()
                    raise
                finally:
                    timer.cancel()
                return UpstreamStream(self, upstream, conn, status, ctype, deadline)
        except BaseException:
            upstream.slots.release()
            raise
        raise AssertionError("unreachable")

    async def _connection(
        self, upstream: _Upstream, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> tuple[_Conn, bool]:
        now = time.monotonic()
        while upstream.idle:
            conn = upstream.idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn, True
            conn.transport.close()
        timeout = max(0.001, min(self.connect_timeout_s, deadline - loop.time()))
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), upstream.host, upstream.port), timeout
            )
        except TimeoutError:
            raise UpstreamRefused(f"connect to {upstream.host}:{upstream.port} timed out") from None
        except OSError as exc:
            raise UpstreamRefused(f"connect to {upstream.host}:{upstream.port} failed: {exc}") from None
        return conn, False

    def close(self) -> None:
        for upstream in self._upstreams.values():
            while upstream.idle:
                upstream.idle.pop().transport.close()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("upstream did not answer in time"))
