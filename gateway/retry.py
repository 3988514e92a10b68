"""Retry budget and jittered backoff: pure decisions, no I/O.

The budget is a token bucket filled by client requests: each request deposits
``ratio`` tokens (0.1 = at most 10 % extra attempts), each retry withdraws one.
It starts empty, so upstream attempts never exceed ``(1 + ratio) x`` client
requests, whatever the failure pattern — a failing model cannot become a retry storm.

A refused connection is not such an attempt: the model never saw the request (no
endpoint behind its Service yet, or one going away), so the gateway tries to connect
again on a fixed doubling schedule (``connect_pause_s``) for a bounded time, as Envoy's
``connect-failure`` retries do, without spending the budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryBudget", "backoff_s", "connect_pause_s"]


@dataclass
class RetryBudget:
    ratio: float = 0.1
    max_tokens: float = 10.0
    tokens: float = 0.0

    def deposit(self) -> None:
        """Called once per client request."""
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def try_withdraw(self) -> bool:
        """Called before each retry; False means: do not retry."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def backoff_s(attempt: int, base_s: float = 0.02, cap_s: float = 0.5, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]; ``attempt`` counts from 0."""
    ceiling = min(cap_s, base_s * (2**attempt))
    return (rng or random).uniform(0.0, ceiling)


def connect_pause_s(attempt: int, base_s: float = 0.025, cap_s: float = 0.25) -> float:
    """The pause before connecting again after ``attempt`` refused connections (counted from 0):
    25, 50, 100, 200 ms, then every 250 ms; no jitter, since nothing on the model's side is loaded."""
    return min(cap_s, base_s * (1 << min(attempt, 32)))  # bounded shift: a long window makes many tries
