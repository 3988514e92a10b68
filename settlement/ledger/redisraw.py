"""A small synchronous Redis client on ``hiredis``: raw replies, no per-entry dicts.

The worker reads tens of thousands of stream entries per second; redis-py's
response callbacks turn every entry into dicts and strings first, which costs
more CPU than the rest of the ingest path (see calibration.md). This client
sends RESP and hands back hiredis' nested lists of ``bytes`` as they are.
Every call has a timeout; error replies raise ``RedisReplyError``. The URL
means what it means to redis-py (``rediss://`` is TLS, ``user:password@`` an ACL
user): ``openledger.redisurl``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import hiredis

from openledger.redisurl import parse_redis_url

Arg = bytes | str | int


class RedisReplyError(Exception):
    """Redis answered with an error (``-ERR …``)."""


def _encode(args: Sequence[Arg]) -> bytes:
    # hiredis' C encoder: an XACK of thousands of ids costs no Python loop.
    # (hiredis' stubs type the tuple as having one element.)
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]


class RawRedis:
    """One connection. Not thread-safe: give each thread its own."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.target = parse_redis_url(url)
        self.host = self.target.host
        self.port = self.target.port
        self.db = self.target.db
        self._tls = self.target.ssl_context()
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader()
        self.unread = 0  # commands sent with ``send`` whose replies ``receive`` has not read yet

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._reader = hiredis.Reader()
        self.unread = 0
        auth = self.target.auth_command()
        if auth is not None:
            self.execute(*auth)
        if self.db:
            self.execute("SELECT", self.db)
        return sock

    def close(self) -> None:
        self.unread = 0  # their replies are lost with the connection
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def send(self, *args: Arg) -> None:
        """Send one command without waiting; ``receive`` reads the replies in order."""
        sock = self._sock or self._connect()
        try:
            sock.sendall(_encode(args))
        except OSError:
            self.close()
            raise
        self.unread += 1

    def receive(self, timeout_s: float | None = None) -> Any:
        """The reply of the oldest command ``send`` sent whose reply is unread."""
        if not self.unread:
            raise RuntimeError("receive() with no command sent")
        sock = self._sock
        if sock is None:
            raise ConnectionError(f"redis {self.host}:{self.port}: connection lost before the reply")
        try:
            sock.settimeout(timeout_s if timeout_s is not None else self.timeout_s)
            reply = self._reader.gets()
            while reply is False:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"redis {self.host}:{self.port} closed the connection")
                self._reader.feed(chunk)
                reply = self._reader.gets()
        except (OSError, ConnectionError):
            self.close()
            raise
        self.unread -= 1
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def execute(self, *args: Arg, timeout_s: float | None = None) -> Any:
        return self.pipeline([args], timeout_s=timeout_s)[0]

    def pipeline(self, commands: Sequence[Sequence[Arg]], timeout_s: float | None = None) -> list[Any]:
        """Send all commands, then read one reply per command. Raises on the first error reply."""
        if self.unread:
            raise RuntimeError("pipeline() on a connection with unread replies: receive() them first")
        sock = self._sock or self._connect()
        try:
            sock.settimeout(timeout_s if timeout_s is not None else self.timeout_s)
            sock.sendall(b"".join(_encode(c) for c in commands))
            replies: list[Any] = []
            while len(replies) < len(commands):
                reply = self._reader.gets()
                if reply is False:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError(f"redis {self.host}:{self.port} closed the connection")
                    self._reader.feed(chunk)
                    continue
                replies.append(reply)
        except (OSError, ConnectionError):
            self.close()
            raise
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisReplyError(str(reply))
        return replies
