"""Durability of the usage stream: the answer leaves only once its usage event is durable.

Until the ledger ingests it, the Redis stream is the only record of served usage.
``Settings.gateway_durability`` says what "durable" means:

- ``none``: in Redis memory only (a Redis loss loses unread events).
- ``aof``: Redis runs ``appendonly yes`` + ``appendfsync always``, so a write is on
  disk before Redis replies; the gateway adds nothing to the hot path (it checks
  the server's configuration once at start and logs an error if it differs).
- ``waitaof``: after settling, ``WAITAOF 1 0 <timeout>`` (Redis 7.2+): the local
  AOF has fsynced the write.
- ``wait``: after settling, ``WAIT 1 <timeout>``: one replica has the write.

Waits are grouped (one in flight; every settle that finished before it is sent
shares it) and run on their own connection so they never stall admissions. Each
wait is preceded by a tiny write on that connection, so the wait covers every
earlier write to Redis (replication and the AOF are one ordered log) whichever
connection made it. A wait that fails or times out raises ``NotDurable``: the
gateway withholds the answer (503) but the usage event stays written, so the
request is charged once; a retry with the same ``Idempotency-Key`` gets the
stored answer once it is durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable

__all__ = ["POLICIES", "DurabilityBarrier", "NotDurable", "check_server"]

log = logging.getLogger(__name__)

POLICIES = ("none", "aof", "waitaof", "wait")
PROBE_KEY = "openledger:durability-probe"


class NotDurable(Exception):
    """The usage event was written but could not be confirmed durable in time (temporary)."""


def durable(policy: str, reply: Any) -> bool:
    """Whether a WAIT/WAITAOF reply confirms the policy (pure)."""
    if policy == "wait":
        return isinstance(reply, int) and reply >= 1
    if policy == "waitaof":
        return isinstance(reply, list) and len(reply) == 2 and int(reply[0]) >= 1
    raise ValueError(f"gateway_durability: no wait for policy {policy!r}")


class DurabilityBarrier:
    """Group commit of durability waits for one gateway process."""

    def __init__(self, client: RedisClient, policy: str, timeout_ms: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"gateway_durability: must be one of {POLICIES}, got {policy!r}")
        self.client = client
        self.policy = policy
        self.timeout_ms = timeout_ms
        self.waits = policy in ("wait", "waitaof")
        self._pending: list[asyncio.Future[bool]] = []
        self._task: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        """Return once every write made before this call is durable; raise NotDurable otherwise."""
        if not self.waits:
            return
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        if not await asyncio.shield(future):
            raise NotDurable(f"usage event not confirmed durable ({self.policy}) within {self.timeout_ms} ms")

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            ok = await self._wait_once()
            for future in batch:
                if not future.done():
                    future.set_result(ok)

    async def _wait_once(self) -> bool:
        timeout = str(self.timeout_ms)
        command = ("WAIT", "1", timeout) if self.policy == "wait" else ("WAITAOF", "1", "0", timeout)
        try:
            _, reply = await self.client.execute_many(("INCR", PROBE_KEY), command)
            return durable(self.policy, reply)
        except (RedisUnavailable, RedisError) as exc:
            log.warning("durability wait failed", extra={"action": "durability", "error": str(exc)})
            return False


async def check_server(client: RedisClient, policy: str) -> None:
    """Log an error when Redis does not run the persistence the policy relies on."""
    if policy not in ("aof", "waitaof"):
        return
    try:
        reply = await client.execute("CONFIG", "GET", "append*")
    except (RedisUnavailable, RedisError) as exc:  # managed Redis may refuse CONFIG
        log.warning("cannot read Redis persistence config", extra={"action": "durability", "error": str(exc)})
        return
    config = {k.decode(): v.decode() for k, v in zip(reply[::2], reply[1::2], strict=True)}
    wanted = {"appendonly": "yes"} | ({"appendfsync": "always"} if policy == "aof" else {})
    wrong = {k: config.get(k) for k, v in wanted.items() if config.get(k) != v}
    if wrong:
        log.error(
            "Redis persistence does not match gateway_durability; usage events may be lost on a Redis crash",
            extra={"action": "durability", "policy": policy, "wanted": wanted, "found": wrong},
        )
