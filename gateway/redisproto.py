"""A small asyncio Redis client on hiredis: one pipelined connection, no pool.

Why not redis-py: its pool checkout and retry wrappers cost about a quarter of
the gateway's CPU per request (see ../shared/calibration.md). Here a command is
``pack_command`` + one buffered write; replies are matched to waiters in order.
Writes issued in the same loop pass are coalesced into one ``write`` syscall.

Failure model: a lost connection fails every waiting command with
``RedisUnavailable`` (temporary: the caller answers 503); the next command
reconnects. Scripts are called by SHA and loaded on ``NOSCRIPT``. The URL means
what it means to redis-py (``rediss://`` is TLS, ``user:password@`` an ACL user):
``openledger.redisurl``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Sequence
from typing import Any

import hiredis

from openledger.redisurl import parse_redis_url

__all__ = ["RedisClient", "RedisError", "RedisUnavailable", "Script"]


class RedisError(Exception):
    """A Redis error reply (permanent for that command)."""


class RedisUnavailable(ConnectionError):
    """Redis could not be reached or the connection dropped (temporary)."""


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            waiter = self.waiters.popleft()
            if waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RedisUnavailable(f"redis connection lost: {exc or 'closed'}"))

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise RedisUnavailable("redis connection is closed")
        future: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append(future)
        self.buffer.append(payload)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and not self.closed and self.buffer:
            self.transport.write(b"".join(self.buffer))
        self.buffer.clear()


def _pack(args: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


def _expire(future: asyncio.Future[Any], command: object) -> None:
    if not future.done():
        future.set_exception(RedisUnavailable(f"redis command {command!r} timed out"))


class Script:
    """A Lua script called with EVALSHA (loaded on NOSCRIPT)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


class RedisClient:
    def __init__(self, url: str, connect_timeout_s: float = 2.0, command_timeout_s: float = 5.0) -> None:
        self.target = parse_redis_url(url)
        self.host = self.target.host
        self.port = self.target.port
        self.db = self.target.db
        self._tls = self.target.ssl_context()
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(loop),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls is not None else None,
                ),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis at {self.target.describe()} unreachable: {exc}") from None
        try:
            auth = self.target.auth_command()
            if auth is not None:
                await proto.send(_pack(auth))
            if self.db:
                await proto.send(_pack(("SELECT", str(self.db))))
        except BaseException:
            if proto.transport is not None:
                proto.transport.close()
            raise
        self._proto = proto
        return proto

    async def execute(self, *args: str | bytes | int | float) -> Any:
        proto = await self._connection()
        future = proto.send(_pack(args))
        # One timer per command (cheaper than wait_for); the waiter stays queued so
        # later replies still match their commands, and the late reply is dropped.
        timer = proto.loop.call_later(self.command_timeout_s, _expire, future, args[0])
        try:
            return await future
        finally:
            timer.cancel()

    async def execute_many(self, *commands: Sequence[str | bytes | int | float]) -> list[Any]:
        """Send the commands in this order in one write; their replies in order (any error raises)."""
        proto = await self._connection()
        futures = [proto.send(_pack(tuple(c))) for c in commands]
        timeout_s = self.command_timeout_s
        timers = [proto.loop.call_later(timeout_s, _expire, f, c[0]) for f, c in zip(futures, commands, strict=True)]
        try:
            replies = list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            for timer in timers:
                timer.cancel()
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int | float]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
