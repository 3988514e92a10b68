"""GCRA (generic cell rate algorithm): the pure reference of the limiter.

The production limiter is ``lua/admit.lua``, run inside Redis so every gateway
replica shares one state; this module is the same arithmetic in Python, used by
the unit tests and to check that the Lua script agrees with it.

State is one number per limit: the theoretical arrival time (TAT) in integer
microseconds. A limit of ``rate`` cells per second with ``burst`` has emission
interval ``T = 1e6 / rate`` µs and lets ``burst`` cells through at once from idle.
A request of ``cost`` cells (1 for the request limit, its token count for the
token limit) is allowed when ``max(TAT, now) - now + cost*T <= burst*T``.
Floating point is used for the interval only (Lua numbers are IEEE doubles, so
both sides compute the same values); TATs are rounded up to whole microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GcraDecision", "Limit", "gcra", "gcra_pair"]


@dataclass(frozen=True)
class Limit:
    """``rate_per_s`` cells per second, up to ``burst`` at once. ``rate_per_s <= 0`` means unlimited."""

    rate_per_s: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s <= 0

    @property
    def interval_us(self) -> float:
        return 1e6 / self.rate_per_s


@dataclass(frozen=True)
class GcraDecision:
    allowed: bool
    tat_us: int  # the TAT to store (unchanged when denied)
    retry_after_us: int  # 0 when allowed; -1 when the cost can never fit (cost > burst)


def gcra(tat_us: int | None, now_us: int, limit: Limit, cost: int = 1) -> GcraDecision:
    """Decide one request against one limit. Pure; ``tat_us`` None means no state yet."""
    if limit.unlimited or cost <= 0:
        return GcraDecision(True, tat_us if tat_us is not None else now_us, 0)
    if cost > limit.burst:
        return GcraDecision(False, tat_us if tat_us is not None else now_us, -1)
    interval = limit.interval_us
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    # Relative to now (small numbers, exact integer part): allowed when the TAT after
    # this request is no more than ``burst`` intervals ahead.
    need = (tat - now_us) + interval * cost
    tolerance = interval * limit.burst
    if need > tolerance:
        return GcraDecision(False, tat, math.ceil(need - tolerance))
    return GcraDecision(True, now_us + math.ceil(need), 0)


def gcra_pair(
    req_tat_us: int | None,
    tok_tat_us: int | None,
    now_us: int,
    requests: Limit,
    tokens: Limit,
    token_cost: int,
) -> tuple[GcraDecision, GcraDecision]:
    """Both limits, all-or-nothing: when either denies, neither TAT moves (as in the Lua script).

    Each decision keeps its own verdict and retry time; the request passes only when both allow.
    """
    req = gcra(req_tat_us, now_us, requests, 1)
    tok = gcra(tok_tat_us, now_us, tokens, token_cost)
    if req.allowed and tok.allowed:
        return req, tok
    keep_req = req_tat_us if req_tat_us is not None else now_us
    keep_tok = tok_tat_us if tok_tat_us is not None else now_us
    return GcraDecision(req.allowed, keep_req, req.retry_after_us), GcraDecision(
        tok.allowed, keep_tok, tok.retry_after_us
    )
