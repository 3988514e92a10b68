"""The settlement metrics are on the product registry, named openledger_settlement_*."""

from __future__ import annotations

from prometheus_client import generate_latest

import openledger.settlement.metrics as m
from openledger.metrics import REGISTRY


def test_settlement_metrics_are_exposed_with_their_documented_names() -> None:
    m.EPOCHS_SETTLED.labels("ns/p")
    m.LAG_EPOCHS.labels("ns/p").set(2)
    m.PENDING_BASE_UNITS.labels("ns/p").set(5)
    m.TRANSACTIONS.labels("confirmed")
    m.CHAIN_ERRORS.labels("block_number")
    text = generate_latest(REGISTRY).decode()
    for name in (
        "openledger_settlement_epochs_settled_total",
        "openledger_settlement_lag_epochs",
        "openledger_settlement_pending_base_units",
        "openledger_settlement_settled_base_units",
        "openledger_settlement_transactions_total",
        "openledger_settlement_fee_bumps_total",
        "openledger_settlement_reorgs_total",
        "openledger_settlement_chain_errors_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert name in m.__doc__  # type: ignore[operator]
    assert 'openledger_settlement_lag_epochs{pool="ns/p"} 2.0' in text


def test_chain_errors_never_quote_the_rpc_url() -> None:
    import pytest

    from openledger.local.processes import free_port
    from openledger.settlement.chain.rpc import Chain, make_web3
    from openledger.settlement.errors import ChainUnavailable

    chain = Chain(make_web3(f"http://127.0.0.1:{free_port()}/v3/SECRET-API-KEY", timeout_s=1))
    with pytest.raises(ChainUnavailable) as info:
        chain.head()
    assert "SECRET-API-KEY" not in str(info.value) and "block_number" in str(info.value)
