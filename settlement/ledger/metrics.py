"""The ledger's Prometheus metrics (``openledger_ledger_*``) on the one registry.

| metric | type | meaning |
|---|---|---|
| openledger_ledger_ingest_lag_seconds | gauge | age of the oldest event in the last committed batch (0 when idle) |
| openledger_ledger_ingest_lag_entries | gauge | stream entries not yet delivered plus entries pending ack |
| openledger_ledger_batch_size_events | histogram | events per committed batch |
| openledger_ledger_batch_seconds | histogram | write latency of a batch (BEGIN to COMMIT, retries included) |
| openledger_ledger_events_ingested_total | counter | events inserted (posted, or recorded when they cost 0) |
| openledger_ledger_postings_total | counter | posting rows written |
| openledger_ledger_duplicates_total | counter | messages whose event id was stored with the same fields (no-ops) |
| openledger_ledger_quarantined_total | counter | messages whose event id was stored with different fields |
| openledger_ledger_dead_lettered_total | counter | messages moved to the dead-letter stream |
| openledger_ledger_write_retries_total | counter | batch writes retried after an error of the environment |
| openledger_ledger_stream_length_entries | gauge | entries in the usage stream (after the last trim) |
| openledger_ledger_stream_trimmed_entries_total | counter | entries trimmed by ``XTRIM MINID`` (acked by every group) |
| openledger_ledger_last_verify_success | gauge | 1 when the last ``ledger verify`` found no drift, else 0 |
| openledger_ledger_last_verify_timestamp_seconds | gauge | when it ran |
| openledger_ledger_last_verify_drifts | gauge | how many drifts it found |
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from openledger.metrics import REGISTRY

INGEST_LAG_SECONDS = Gauge(
    "openledger_ledger_ingest_lag_seconds", "Age of the oldest event in the last committed batch", registry=REGISTRY
)
INGEST_LAG_ENTRIES = Gauge(
    "openledger_ledger_ingest_lag_entries", "Usage-stream entries not yet delivered plus pending ack", registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "openledger_ledger_batch_size_events",
    "Events per committed batch",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "openledger_ledger_batch_seconds",
    "Write latency of one batch, retries included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
EVENTS = Counter("openledger_ledger_events_ingested_total", "Usage events inserted into the ledger", registry=REGISTRY)
POSTINGS = Counter("openledger_ledger_postings_total", "Posting rows written", registry=REGISTRY)
DUPLICATES = Counter(
    "openledger_ledger_duplicates_total",
    "Messages whose event id was already stored with the same fields",
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "openledger_ledger_quarantined_total", "Messages whose event id was stored with different fields", registry=REGISTRY
)
DEAD_LETTERED = Counter(
    "openledger_ledger_dead_lettered_total", "Messages moved to the dead-letter stream", registry=REGISTRY
)
WRITE_RETRIES = Counter(
    "openledger_ledger_write_retries_total", "Batch writes retried after an error of the environment", registry=REGISTRY
)
STREAM_LENGTH = Gauge(
    "openledger_ledger_stream_length_entries", "Entries in the usage stream after the last trim", registry=REGISTRY
)
STREAM_TRIMMED = Counter(
    "openledger_ledger_stream_trimmed_entries_total",
    "Usage-stream entries trimmed after every consumer group acknowledged them",
    registry=REGISTRY,
)
LAST_VERIFY_SUCCESS = Gauge(
    "openledger_ledger_last_verify_success", "1 when the last ledger verify found no drift", registry=REGISTRY
)
LAST_VERIFY_TIMESTAMP = Gauge(
    "openledger_ledger_last_verify_timestamp_seconds", "Unix time of the last ledger verify", registry=REGISTRY
)
LAST_VERIFY_DRIFTS = Gauge(
    "openledger_ledger_last_verify_drifts", "Drifts found by the last ledger verify", registry=REGISTRY
)
