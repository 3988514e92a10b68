"""The gateway's Lua scripts and their reply codes as named values.

``lua/money.lua`` (exact decimal-string arithmetic on base units) is prepended to
every script that touches money, so admission and settlement share one
implementation and no amount ever becomes a Lua number.
"""

from __future__ import annotations

from enum import IntEnum
from importlib import resources

from openledger.gateway.redisproto import Script

__all__ = ["ADMIT", "IDEMPOTENCY", "JOURNAL", "MONEY_PRELUDE", "SETTLE", "AdmitCode", "IdempotencyCode", "SettleCode"]


def _lua(name: str) -> str:
    return resources.files("openledger.gateway").joinpath(f"lua/{name}").read_text()


MONEY_PRELUDE = _lua("money.lua")
ADMIT = Script(MONEY_PRELUDE + "\n" + _lua("admit.lua"))
SETTLE = Script(MONEY_PRELUDE + "\n" + _lua("settle.lua"))
IDEMPOTENCY = Script(_lua("idempotency.lua"))
JOURNAL = Script(_lua("journal.lua"))


class AdmitCode(IntEnum):
    """First element of admit.lua's reply."""

    ADMITTED = 1
    UNKNOWN_KEY = -1
    STALE_CONFIG = -2
    RATE_LIMITED = -3
    TOO_MANY_TOKENS = -4
    BUDGET_EXHAUSTED = -5
    QUEUED = -6
    QUEUE_FULL = -7
    WAITING = -8
    SPEND_UNKNOWN = -9


class SettleCode(IntEnum):
    """First element of settle.lua's reply."""

    SETTLED = 1
    ALREADY_SETTLED = 0


class IdempotencyCode(IntEnum):
    """First element of idempotency.lua's ``claim`` reply."""

    CLAIMED = 1
    DONE = 2
    IN_PROGRESS = -1
    KEY_REUSED = -2
