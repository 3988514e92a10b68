"""How long an admitted request may live, derived from the timeouts (pure).

A request holds a concurrency slot and a budget reservation from admission until
settle.lua releases them. If its gateway dies, the next admission reclaims them
once the slot's ttl has passed, so the ttl must outlive every live request but
no more (minutes, not an hour):

    inflight_ttl_s = upstream_timeout_s                       # all attempts and backoffs share one deadline
                   + redis_timeout_s * (SETTLE_ATTEMPTS + 1)  # settle and its retries, then the release
                   + durability_timeout_s                     # the wait for a durable usage event
                   + STREAM_LEASE_S + STREAM_SWEEP_INTERVAL_S # a dead gateway's stream is swept (journal.py)
                   + INFLIGHT_MARGIN_S                        # clock skew between gateways and Redis

The stream journal's terms: a stream whose gateway died is settled by another
gateway's sweep once its lease (renewed until the gateway died) has expired, at
most ``STREAM_LEASE_S + STREAM_SWEEP_INTERVAL_S`` later; that must happen before
its slot is reclaimed (which releases the reservation without a charge). The lease
is at least the margin, as it is renewed across Redis calls that may each take
``redis_timeout_s``.

Graceful shutdown lets every admitted request finish and be metered (the sum
without the journal's terms and with a smaller margin); Kubernetes'
terminationGracePeriodSeconds must exceed it plus the preStop sleep (the chart
computes that).
"""

from __future__ import annotations

__all__ = [
    "INFLIGHT_MARGIN_S",
    "SETTLE_ATTEMPTS",
    "SHUTDOWN_MARGIN_S",
    "STREAM_LEASE_S",
    "STREAM_SWEEP_INTERVAL_S",
    "inflight_ttl_s",
    "shutdown_timeout_s",
]

SETTLE_ATTEMPTS = 4
INFLIGHT_MARGIN_S = 60.0
SHUTDOWN_MARGIN_S = 5.0
STREAM_LEASE_S = INFLIGHT_MARGIN_S
STREAM_SWEEP_INTERVAL_S = 2.0


def _request_lifetime_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    return upstream_timeout_s + redis_timeout_s * (SETTLE_ATTEMPTS + 1) + durability_timeout_s


def inflight_ttl_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    """Seconds a concurrency slot and its reservation live unless settled."""
    lifetime = _request_lifetime_s(upstream_timeout_s, redis_timeout_s, durability_timeout_s)
    return lifetime + STREAM_LEASE_S + STREAM_SWEEP_INTERVAL_S + INFLIGHT_MARGIN_S


def shutdown_timeout_s(upstream_timeout_s: float, redis_timeout_s: float, durability_timeout_s: float) -> float:
    """Seconds uvicorn waits for requests in flight on SIGTERM before cancelling them."""
    return _request_lifetime_s(upstream_timeout_s, redis_timeout_s, durability_timeout_s) + SHUTDOWN_MARGIN_S
