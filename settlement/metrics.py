"""``openledger_settlement_*`` metrics, declared on the one product registry.

| metric | type | labels | meaning |
|---|---|---|---|
| openledger_settlement_epochs_settled_total | counter | pool | epochs confirmed on chain and committed |
| openledger_settlement_lag_epochs | gauge | pool | closed epochs not yet settled (the backlog) |
| openledger_settlement_pending_base_units | gauge | pool | earned by payees but not yet in a confirmed root |
| openledger_settlement_settled_base_units | gauge | pool | cumulative total of the last confirmed root |
| openledger_settlement_transactions_total | counter | outcome | submitted, confirmed, reverted, nonce_consumed, … |
| openledger_settlement_fee_bumps_total | counter | — | replacement transactions with higher EIP-1559 fees |
| openledger_settlement_reorgs_total | counter | — | receipts that vanished or moved to another block |
| openledger_settlement_chain_errors_total | counter | operation | failed RPC calls (chain down, timeouts, errors) |
| openledger_settlement_database_up | gauge | pool | 1: the pool's last pass reached PostgreSQL; 0: it could not |
| openledger_settlement_publication_blocked | gauge | pool, reason | 1 while the settler refuses to publish for reason |
| openledger_settlement_gas_spent_wei_total | counter | pool | gasUsed * effectiveGasPrice of confirmed transactions |

Publication reasons (``BLOCK_REASONS``): IdentityChanged, DistributorInUse, ContractStateMismatch
(``settler.decide`` refuses), PublicationBlocked (the preflight reverts: no allowance, funds or
role). Each pass that reaches the chain sets every reason of its pool: 1 for the one that
blocks it, 0 for the others; a pass cut short by the chain or PostgreSQL leaves them as they were.
Gas counts every settlement transaction that reached its confirmations, reverted ones too
(they cost gas as well).

Amounts are gauges of base units (floats lose precision past 2**53, which is fine
for alerting; the ledger has the exact numbers).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from openledger.metrics import REGISTRY

EPOCHS_SETTLED = Counter(
    "openledger_settlement_epochs_settled", "Epochs settled on chain and in the ledger", ["pool"], registry=REGISTRY
)
LAG_EPOCHS = Gauge("openledger_settlement_lag_epochs", "Closed epochs not yet settled", ["pool"], registry=REGISTRY)
PENDING_BASE_UNITS = Gauge(
    "openledger_settlement_pending_base_units", "Earned but not yet in a confirmed root", ["pool"], registry=REGISTRY
)
SETTLED_BASE_UNITS = Gauge(
    "openledger_settlement_settled_base_units",
    "Cumulative total of the last confirmed root",
    ["pool"],
    registry=REGISTRY,
)
TRANSACTIONS = Counter(
    "openledger_settlement_transactions", "Settlement transactions by outcome", ["outcome"], registry=REGISTRY
)
FEE_BUMPS = Counter("openledger_settlement_fee_bumps", "Replacement transactions with higher fees", registry=REGISTRY)
REORGS = Counter("openledger_settlement_reorgs", "Receipts that vanished or changed block", registry=REGISTRY)
CHAIN_ERRORS = Counter("openledger_settlement_chain_errors", "Failed chain RPC calls", ["operation"], registry=REGISTRY)
DATABASE_UP = Gauge(
    "openledger_settlement_database_up",
    "1 when the pool's last settler pass reached PostgreSQL, 0 when it could not",
    ["pool"],
    registry=REGISTRY,
)

PUBLICATION_BLOCKED = Gauge(
    "openledger_settlement_publication_blocked",
    "1 while the pool's settler refuses to publish, by reason; 0 otherwise",
    ["pool", "reason"],
    registry=REGISTRY,
)
BLOCK_REASONS = ("IdentityChanged", "DistributorInUse", "ContractStateMismatch", "PublicationBlocked")
GAS_SPENT_WEI = Counter(
    "openledger_settlement_gas_spent_wei",
    "gasUsed x effectiveGasPrice of confirmed settlement transactions (wei)",
    ["pool"],
    registry=REGISTRY,
)

__all__ = [
    "BLOCK_REASONS",
    "CHAIN_ERRORS",
    "DATABASE_UP",
    "EPOCHS_SETTLED",
    "FEE_BUMPS",
    "GAS_SPENT_WEI",
    "LAG_EPOCHS",
    "PENDING_BASE_UNITS",
    "PUBLICATION_BLOCKED",
    "REORGS",
    "SETTLED_BASE_UNITS",
    "TRANSACTIONS",
]
