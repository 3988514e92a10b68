"""Operator metrics (one registry: ``openledger.metrics.REGISTRY``). Every controller uses these
with its ``kind`` label.

| metric | type | labels | meaning |
|---|---|---|---|
| openledger_operator_reconciles_total | counter | kind, result | ok, error, requeued, unchanged (skipped) |
| openledger_operator_reconcile_duration_seconds | histogram | kind | time of one reconcile pass |
| openledger_operator_errors_total | counter | kind, reason | failures by reason (ApiError409, CRDMissing, Redis…) |
| openledger_operator_managed_objects | gauge | kind | objects the controller currently manages |
| openledger_operator_drift_repairs_total | counter | kind | child objects repaired after a hand edit |
| openledger_operator_leader | gauge | — | 1 while this replica holds the leader Lease |
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge, Histogram

from openledger.metrics import REGISTRY

RECONCILES = Counter(
    "openledger_operator_reconciles",
    "Reconcile passes by kind and result (ok, error, requeued, unchanged).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "openledger_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass.",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
ERRORS = Counter(
    "openledger_operator_errors",
    "Reconcile failures by kind and reason.",
    ["kind", "reason"],
    registry=REGISTRY,
)
MANAGED = Gauge(
    "openledger_operator_managed_objects",
    "Objects the operator currently manages, by kind.",
    ["kind"],
    registry=REGISTRY,
)
DRIFT_REPAIRS = Counter(
    "openledger_operator_drift_repairs",
    "Child objects repaired after they drifted from the desired state.",
    ["kind"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "openledger_operator_leader",
    "1 while this replica holds the leader Lease and runs the controllers.",
    registry=REGISTRY,
)


@asynccontextmanager
async def reconcile_pass(kind: str) -> AsyncIterator[None]:
    """Count and time one reconcile pass of ``kind``: ``ok``, or ``error`` (by exception type) when it raises."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind, type(exc).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
