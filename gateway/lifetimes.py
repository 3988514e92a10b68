"""How long an admitted request may live, derived from the timeouts (pure).

A request holds a concurrency slot and a budget reservation from admission until
settle.lua releases them. If its gateway dies, the next admission reclaims them
once the slot's ttl has passed, so the ttl must outlive every live request but
no more (minutes, not an hour):

    inflight_ttl_s = upstream_timeout_s                       # all attempts and backoffs share one deadline
                   + redis_timeout_s * (SETTLE_ATTEMPTS + 1)  # settle and its retries, then the release
                   + durability_timeout_s                     # the wait for a durable usage event
                   + INFLIGHT_MARGIN_S                        # clock skew between gateways and Redis

Graceful shutdown lets every admitted request finish and be metered (the same
sum with a smaller margin); Kubernetes' terminationGracePeriodSeconds must exceed
it plus the preStop sleep (the chart computes that).
"""

from __future__ import annotations

__all__ = ["INFLIGHT_MARGIN_S", "SETTLE_ATTEMPTS", "SHUTDOWN_MARGIN_S", "inflight_ttl_s", "shutdown_timeout_s"]

SETTLE_ATTEMPTS = 4
INFLIGHT_MARGIN_S = 60.0
SHUTDOWN_MARGIN_S = 5.0


def _request_lifetime_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    return upstream_timeout_s + redis_timeout_s * (SETTLE_ATTEMPTS + 1) + durability_timeout_s


def inflight_ttl_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    """Seconds a concurrency slot and its reservation live unless settled."""
    return _request_lifetime_s(upstream_timeout_s, redis_timeout_s, durability_timeout_s) + INFLIGHT_MARGIN_S


def shutdown_timeout_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    """Seconds uvicorn waits for requests in flight on SIGTERM before cancelling them."""
    return _request_lifetime_s(upstream_timeout_s, redis_timeout_s, durability_timeout_s) + SHUTDOWN_MARGIN_S
