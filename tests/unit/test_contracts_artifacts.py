"""The committed ABI and bytecode are exactly what the sources compile to."""

from __future__ import annotations

import pytest

from openledger.settlement import contracts


def test_committed_artifacts_match_a_fresh_compile() -> None:
    fresh = contracts.compile_contracts()
    for name in contracts.CONTRACT_NAMES:
        committed = (contracts.ARTIFACT_DIR / f"{name}.json").read_text()
        assert committed == contracts.artifact_json(fresh[name]), (
            f"{name}: artifacts are stale; run `python -m openledger.settlement.contracts`"
        )


def test_distributor_abi_has_the_settlement_surface() -> None:
    abi = contracts.load_artifact("RewardDistributor").abi
    functions = {item["name"] for item in abi if item["type"] == "function"}
    assert {"publish", "claim", "fund", "state", "claimed", "pause", "unpause", "SETTLER_ROLE"} <= functions


def test_unknown_contract_name_is_named_in_the_error() -> None:
    with pytest.raises(KeyError, match="Nope"):
        contracts.load_artifact("Nope")
