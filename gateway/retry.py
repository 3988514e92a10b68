"""Retry budget and jittered backoff: pure decisions, no I/O.

The budget is a token bucket filled by client requests: each request deposits
``ratio`` tokens (0.1 = at most 10 % extra attempts), each retry withdraws one.
It starts empty, so upstream attempts never exceed ``(1 + ratio) x`` client
requests, whatever the failure pattern — a failing model cannot become a retry storm.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryBudget", "backoff_s"]


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
