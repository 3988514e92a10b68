"""The CRDs in crds/ are generated from controllers/api.py and describe every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from openledger.controllers import api
from openledger.controllers.commands import CHART_CRD_DIR, DEFAULT_CRD_DIR, generated_files, stale_files
from openledger.money import MONEY_PATTERN

ROOT = Path(__file__).resolve().parents[2]


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


def test_committed_crd_yaml_is_not_stale() -> None:
    assert DEFAULT_CRD_DIR == ROOT / "crds"
    assert stale_files(DEFAULT_CRD_DIR) == [], "run `openledger crds generate` and commit crds/"
    assert stale_files(CHART_CRD_DIR) == [], "run `openledger crds generate` (the chart ships the same CRDs)"


def test_stale_check_notices_a_hand_edit(tmp_path: Path) -> None:
    for name, text in generated_files().items():
        (tmp_path / name).write_text(text)
    assert stale_files(tmp_path) == []
    victim = tmp_path / "openledger.io_models.yaml"
    victim.write_text(victim.read_text().replace("mdl", "mod"))
    assert stale_files(tmp_path) == ["openledger.io_models.yaml"]


def test_every_field_of_every_kind_has_a_description() -> None:
    for kind in api.KINDS:
        schema = api.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, sub in _walk(schema, kind.kind):
            if path.endswith(".metadata"):
                continue
            if path.endswith("[]") and sub.get("type") == "string":
                continue  # scalar list items are described by the list
            assert sub.get("description"), f"{path} has no description"


def test_names_short_names_and_category() -> None:
    docs = {d["spec"]["names"]["kind"]: d for d in (yaml.safe_load(t) for t in generated_files().values())}
    assert set(docs) == {"Model", "Agent", "RewardPool"}
    assert {k: d["spec"]["names"]["shortNames"] for k, d in docs.items()} == {
        "Model": ["mdl"],
        "Agent": ["agt"],
        "RewardPool": ["rwp"],
    }
    for doc in docs.values():
        assert doc["spec"]["group"] == "openledger.io"
        assert doc["spec"]["names"]["categories"] == ["openledger"]
        version = doc["spec"]["versions"][0]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns[:2] == ["Phase", "Ready"] and columns[-1] == "Age"
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert {"observedGeneration", "conditions", "phase"} <= set(status)


def test_money_and_address_fields_use_the_shared_patterns() -> None:
    spec = api.model_spec_schema()["properties"]
    for field in ("perRequest", "perInputToken", "perOutputToken"):
        assert spec["pricing"]["properties"][field]["pattern"] == MONEY_PATTERN
    assert spec["owner"]["pattern"] == api.ADDRESS_PATTERN
    assert api.agent_spec_schema()["properties"]["budget"]["properties"]["amount"]["pattern"] == MONEY_PATTERN
    chain = api.rewardpool_spec_schema()["properties"]["chain"]["properties"]
    assert chain["tokenAddress"]["pattern"] == chain["distributorAddress"]["pattern"] == api.ADDRESS_PATTERN


def test_printer_columns_show_what_an_sre_scans_for() -> None:
    def paths(kind: str) -> list[str]:
        return [c["jsonPath"] for c in api.KINDS_BY_NAME[kind].columns]

    assert {".status.url", ".status.replicas"} <= set(paths("Model"))
    assert {".status.queueDepth", ".status.spentThisPeriod"} <= set(paths("Agent"))
    assert {".status.lastSettledEpoch", ".status.pendingAmount"} <= set(paths("RewardPool"))


def test_builders_read_specs_with_the_schema_defaults_written_once() -> None:
    from openledger.controllers.api import defaulted_spec

    spec = defaulted_spec("Model", {"contributors": [{"account": "0x" + "a" * 40, "shareBps": 10}], "scaling": {}})
    assert spec["protocol"] == "v1" and spec["deploymentMode"] == "Standard"
    # Nested defaults inside a given object; metric has none (it depends on deploymentMode).
    assert spec["scaling"] == {"minReplicas": 1}
    assert spec["pricing"] == {"token": "OPEN", "decimals": 18, "perRequest": "0", "perInputToken": "0",
                               "perOutputToken": "0"}  # fmt: skip
    assert spec["contributors"][0]["role"] == "data"  # array items too
    assert "canary" not in spec  # no default, not invented
    pool = defaulted_spec("RewardPool", {"chain": {"chainId": 1, "confirmations": 5}})
    assert pool["chain"] == {"chainId": 1, "confirmations": 5}  # given values are kept; tokenDecimals has no default
    assert defaulted_spec("RewardPool", None)["epochSeconds"] == 3600
