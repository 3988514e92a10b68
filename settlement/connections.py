"""A small bounded pool of PostgreSQL connections, shared by every settler of a process.

The operator settles every RewardPool from one process. A permanent connection
per pool would exhaust ``max_connections`` at a few hundred pools and, after a
PostgreSQL restart, keep a dead socket forever. Instead each settler pass
borrows a connection for the pass and gives it back:

* at most ``max_size`` connections are open at once, whatever the number of
  pools (a pass waits up to ``acquire_timeout_s`` for one, then reports the
  database unavailable);
* a connection that raised, or is not idle when given back, is closed, never
  reused; an idle one is checked with a round trip before reuse, so a restart of
  PostgreSQL costs at most one failed check, and the next borrow reconnects.

Thread-safe (settler passes run in worker threads). ``psycopg_pool`` would do
the same; it is not a dependency of the product, and this is all we need.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

DEFAULT_MAX_SIZE = 4
DEFAULT_ACQUIRE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5


class DatabaseUnavailable(Exception):
    """No usable connection: PostgreSQL is down, restarting, or the pool stayed busy (temporary)."""

    temporary = True


class PoolBusy(DatabaseUnavailable):
    """Every connection stayed lent for the whole wait: PostgreSQL may be fine, the settlers are slow."""


class ConnectionPool:
    """At most ``max_size`` autocommit connections to ``url``, lent one pass at a time."""

    def __init__(
        self,
        url: str,
        max_size: int = DEFAULT_MAX_SIZE,
        acquire_timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S,
        application_name: str = "openledger-settler",
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size: {max_size} must be at least 1")
        self.url = url
        self.max_size = max_size
        self.acquire_timeout_s = acquire_timeout_s
        self.application_name = application_name
        self._slots = threading.BoundedSemaphore(max_size)
        self._lock = threading.Lock()
        self._idle: list[Conn] = []
        self._open = 0
        self.peak_open = 0  # most connections ever open at once (tests and capacity checks)
        self._closed = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """Borrow a connection for one unit of work; raises ``DatabaseUnavailable`` when none can be had."""
        if self._closed:
            raise DatabaseUnavailable("the connection pool is closed")
        if not self._slots.acquire(timeout=self.acquire_timeout_s):
            raise PoolBusy(f"no database connection within {self.acquire_timeout_s:g} s (all {self.max_size} in use)")
        conn: Conn | None = None
        try:
            conn = self._take()
            yield conn
        except BaseException:
            if conn is not None:
                self._discard(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    # ------------------------------------------------------------ internals

    def _take(self) -> Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:  # died while idle (a restart): drop it, try the next one
                self._discard(conn)

    def _connect(self) -> Conn:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=self.application_name,
            )
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {type(exc).__name__}") from exc
        with self._lock:
            self._open += 1
            self.peak_open = max(self.peak_open, self._open)
        return conn

    def _give_back(self, conn: Conn) -> None:
        healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if not healthy or self._closed:
            self._discard(conn)
            return
        with self._lock:
            self._idle.append(conn)

    def _discard(self, conn: Conn) -> None:
        try:
            conn.close()
        finally:
            with self._lock:
                self._open -= 1


__all__ = ["DEFAULT_MAX_SIZE", "ConnectionPool", "DatabaseUnavailable"]
