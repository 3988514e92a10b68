"""Per-model circuit breaker: a pure state machine, driven by the clock it is given.

    CLOSED --(failures >= threshold within the window)--> OPEN
    OPEN   --(cooldown elapsed; next request is the probe)--> HALF_OPEN
    HALF_OPEN --(probe succeeds)--> CLOSED
    HALF_OPEN --(probe fails)--> OPEN (cooldown restarts)

While OPEN the gateway answers 503 without calling the model, so a failing model
gets at most one probe per cooldown from each gateway process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5  # consecutive failures that open the circuit
    cooldown_s: float = 5.0  # how long it stays open before one probe


@dataclass
class CircuitBreaker:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at_s: float = 0.0
    probe_in_flight: bool = False

    def allow(self, now_s: float) -> bool:
        """May a request go to the model now? Moves OPEN -> HALF_OPEN after the cooldown."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now_s - self.opened_at_s < self.config.cooldown_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self.probe_in_flight = False
        if self.probe_in_flight:
            return False
        self.probe_in_flight = True
        return True

    def retry_after_s(self, now_s: float) -> float:
        if self.state is BreakerState.OPEN:
            return max(0.0, self.config.cooldown_s - (now_s - self.opened_at_s))
        return 0.0

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.probe_in_flight = False

    def record_failure(self, now_s: float) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.config.failure_threshold:
            self.state = BreakerState.OPEN
            self.opened_at_s = now_s
            self.probe_in_flight = False

    def release_probe(self) -> None:
        """A probe that ended without a verdict (e.g. the client went away) frees the slot."""
        self.probe_in_flight = False
