"""The gateway's metrics (``openledger_gateway_*``), declared on the one registry.

| metric | type | labels | meaning |
|---|---|---|---|
| ``openledger_gateway_requests_total`` | counter | model, agent, code | requests answered, by HTTP status |
| ``openledger_gateway_request_duration_seconds`` | histogram | — | total time in the gateway, upstream included |
| ``openledger_gateway_overhead_seconds`` | histogram | — | gateway time excluding the upstream call |
| ``openledger_gateway_upstream_attempts_total`` | counter | model, result | calls to models by result |
| ``openledger_gateway_limiter_rejections_total`` | counter | agent, reason | refusals by reason (below) |
| ``openledger_gateway_queue_depth`` | gauge | agent | requests this process holds in the agent's queue |
| ``openledger_gateway_queue_wait_seconds`` | histogram | — | time spent queued before admission |
| ``openledger_gateway_circuit_state`` | gauge | model | 0 closed, 1 half-open, 2 open |
| ``openledger_gateway_budget_remaining_base_units`` | gauge | agent | budget left after the last admission |
| ``openledger_gateway_budget_limit_base_units`` | gauge | agent, enforcement | the Agent's budget for the period |
| ``openledger_gateway_budget_store_up`` | gauge | — | 1: last Redis call succeeded; 0: connection error/timeout |
| ``openledger_gateway_inflight_requests`` | gauge | model | admitted, not yet finished (streams until they end) |
| ``openledger_gateway_usage_events_total`` | counter | outcome | usage events written |
| ``openledger_gateway_streams_total`` | counter | end | streamed answers by how they ended |

Limiter reasons: rate_requests, rate_tokens, too_large, budget, queue_full, queue_timeout,
spend_restoring, not_durable. The budget limit is set when the gateway loads an Agent's
configuration (join it to the remaining gauge on ``agent``); Agents without a budget have none.
Agent and model labels are ``namespace/name`` references, never keys.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from openledger.metrics import REGISTRY

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter(
    "openledger_gateway_requests", "Requests answered by the gateway.", ["model", "agent", "code"], registry=REGISTRY
)
DURATION = Histogram(
    "openledger_gateway_request_duration_seconds",
    "Total time of a request in the gateway, upstream included.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OVERHEAD = Histogram(
    "openledger_gateway_overhead_seconds",
    "Time a request spends in the gateway excluding the upstream call.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
    registry=REGISTRY,
)
UPSTREAM_ATTEMPTS = Counter(
    "openledger_gateway_upstream_attempts", "Calls to model servers.", ["model", "result"], registry=REGISTRY
)
LIMITER_REJECTIONS = Counter(
    "openledger_gateway_limiter_rejections", "Requests refused by limits.", ["agent", "reason"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge(
    "openledger_gateway_queue_depth", "Requests this process holds queued per agent.", ["agent"], registry=REGISTRY
)
QUEUE_WAIT = Histogram(
    "openledger_gateway_queue_wait_seconds",
    "Time requests waited in the queue before admission.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "openledger_gateway_circuit_state",
    "Circuit breaker per model: 0 closed, 1 half-open, 2 open.",
    ["model"],
    registry=REGISTRY,
)
BUDGET_REMAINING = Gauge(
    "openledger_gateway_budget_remaining_base_units",
    "Budget left in the current period after the last admission (base units).",
    ["agent"],
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    "openledger_gateway_budget_limit_base_units",
    "The Agent's budget for the current period (base units), by enforcement (Hard or Soft).",
    ["agent", "enforcement"],
    registry=REGISTRY,
)
BUDGET_STORE_UP = Gauge(
    "openledger_gateway_budget_store_up",
    "1 when the gateway's last Redis call succeeded, 0 after a Redis connection error or timeout.",
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "openledger_gateway_inflight_requests",
    "Requests this process admitted and has not finished yet (streams until they end).",
    ["model"],
    registry=REGISTRY,
)
USAGE_EVENTS = Counter(
    "openledger_gateway_usage_events", "Usage events written to the usage stream.", ["outcome"], registry=REGISTRY
)
STREAMS = Counter(
    "openledger_gateway_streams",
    "Streamed answers by how they ended (completed, client_closed, upstream_broken, timeout).",
    ["end"],
    registry=REGISTRY,
)


@functools.lru_cache(maxsize=65_536)
def child(metric: Any, *labels: str) -> Any:
    """A labelled child, cached: prometheus-client's ``labels()`` takes a lock and builds a tuple each call."""
    return metric.labels(*labels)
