"""The API server itself rejects bad Models (schema + CEL), with a message naming the field;
and the CRDs are discoverable the way an SRE expects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from openledger.local.platform import LocalPlatform

from .conftest import OWNER, Kube, model_manifest

ADDR = "0x" + "33" * 20


def spec_with(**changes: Any) -> dict[str, Any]:
    return changes


# (case id, manifest changes, text the server's message must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("missing-storage-uri", {"storageUri": None}, "spec.storageUri"),
    ("missing-owner", {"owner": None}, "spec.owner"),
    ("missing-format-name", {"format": {"version": "1"}}, "spec.format.name"),
    ("bad-owner-address", {"owner": "0x1234"}, "spec.owner"),
    ("storage-uri-without-scheme", {"storageUri": "just-a-path"}, "spec.storageUri"),
    ("unknown-protocol", {"protocol": "grpc"}, "spec.protocol"),
    ("unknown-deployment-mode", {"deploymentMode": "Serverless"}, "spec.deploymentMode"),
    ("negative-gpus", {"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ("gpu-product-without-gpus", {"resources": {"gpus": 0, "gpuProduct": "A100"}}, "spec.resources.gpuProduct"),
    ("bad-memory-quantity", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ("min-above-max-replicas", {"scaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.scaling.minReplicas"),
    ("unknown-scale-metric", {"scaling": {"metric": "gpu"}}, "spec.scaling.metric"),
    ("scale-to-zero-in-standard-mode", {"scaling": {"minReplicas": 0}}, "spec.scaling.minReplicas"),
    (
        "canary-in-standard-mode",
        {"canary": {"storageUri": "hf://org/v2", "trafficPercent": 10}},
        "spec.canary",
    ),
    (
        "canary-without-storage-uri",
        {"deploymentMode": "Knative", "canary": {"trafficPercent": 10}},
        "spec.canary.storageUri",
    ),
    (
        "canary-traffic-over-100",
        {"deploymentMode": "Knative", "canary": {"storageUri": "hf://org/v2", "trafficPercent": 150}},
        "spec.canary.trafficPercent",
    ),
    ("money-with-float-exponent", {"pricing": {"perInputToken": "1e-6"}}, "spec.pricing.perInputToken"),
    ("negative-price", {"pricing": {"perRequest": "-1"}}, "spec.pricing.perRequest"),
    (
        "more-decimals-than-token",
        {"pricing": {"decimals": 2, "perOutputToken": "0.001"}},
        "spec.pricing.perOutputToken",
    ),
    (
        "contributor-shares-over-10000",
        {"contributors": [{"account": ADDR, "shareBps": 6000}, {"account": "0x" + "44" * 20, "shareBps": 6000}]},
        "spec.contributors",
    ),
    ("contributor-share-zero", {"contributors": [{"account": ADDR, "shareBps": 0}]}, "spec.contributors[0].shareBps"),
    (
        "duplicate-contributor",
        {"contributors": [{"account": ADDR, "shareBps": 10}, {"account": ADDR, "shareBps": 20}]},
        "spec.contributors[1]",
    ),
    ("contributor-bad-address", {"contributors": [{"account": "bob", "shareBps": 10}]}, "spec.contributors[0].account"),
    ("unknown-contributor-role", {"contributors": [{"account": ADDR, "shareBps": 10, "role": "boss"}]}, "role"),
]


@pytest.mark.parametrize(("changes", "field"), [(c, f) for _, c, f in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_model_is_rejected_naming_the_field(kube: Kube, changes: dict[str, Any], field: str) -> None:
    manifest = model_manifest("bad", "default")
    for key, value in changes.items():
        if value is None:
            manifest["spec"].pop(key, None)
        else:
            manifest["spec"][key] = value
    with pytest.raises(ApiException) as info:
        kube.create_model(manifest, dry_run=True)
    assert info.value.status == 422, info.value.body
    message = json.loads(info.value.body)["message"]
    assert field in message, message


def test_name_that_cannot_name_an_inference_service_is_rejected(kube: Kube) -> None:
    manifest = model_manifest("x" * 50, "default")
    with pytest.raises(ApiException) as info:
        kube.create_model(manifest, dry_run=True)
    assert info.value.status == 422
    assert "metadata.name" in json.loads(info.value.body)["message"]


def test_a_valid_model_gets_its_defaults(kube: Kube) -> None:
    created = kube.create_model(model_manifest("defaults", "default"), dry_run=True)
    spec = created["spec"]
    assert spec["protocol"] == "v1"
    assert spec["deploymentMode"] == "Standard"
    assert spec["scaling"] == {"minReplicas": 1}  # metric: none; the operator picks the mode's default
    assert spec["resources"] == {"gpus": 0}
    assert spec["pricing"]["decimals"] == 18 and spec["pricing"]["token"] == "OPEN"
    assert spec["owner"] == OWNER


def test_invalid_agent_and_rewardpool_are_rejected_too(kube: Kube) -> None:
    agent = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "a", "namespace": "default"},
        "spec": {"account": ADDR, "models": ["m"], "budget": {"amount": "1.5.0", "period": "Week"}},
    }
    with pytest.raises(ApiException) as info:
        kube.objects.create_namespaced_custom_object(
            "openledger.io", "v1alpha1", "default", "agents", agent, dry_run="All"
        )
    message = json.loads(info.value.body)["message"]
    assert "spec.budget.amount" in message and "spec.budget.period" in message
    pool = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "RewardPool",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "modelSelector": {"matchLabels": {"team": "a"}},
            "protocolFeeBps": 20000,
            "chain": {
                "chainId": 31337,
                "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                "tokenAddress": ADDR,
                "distributorAddress": "nope",
            },
        },
    }
    with pytest.raises(ApiException) as info:
        kube.objects.create_namespaced_custom_object(
            "openledger.io", "v1alpha1", "default", "rewardpools", pool, dry_run="All"
        )
    message = json.loads(info.value.body)["message"]
    assert "spec.protocolFeeBps" in message and "spec.chain.distributorAddress" in message


def test_kubectl_get_openledger_lists_all_three_kinds(local_platform: LocalPlatform) -> None:
    resources = local_platform.kubectl("api-resources", "--categories=openledger", "-o", "name").stdout.split()
    assert sorted(resources) == ["agents.openledger.io", "models.openledger.io", "rewardpools.openledger.io"]
    short = local_platform.kubectl("api-resources", "--api-group=openledger.io").stdout
    for name in ("mdl", "agt", "rwp"):
        assert f" {name} " in short
    assert local_platform.kubectl("get", "openledger", "-A").returncode == 0


def test_kubectl_explain_teaches_the_api(local_platform: LocalPlatform) -> None:
    text = local_platform.kubectl("explain", "model.spec.scaling").stdout
    assert "minReplicas" in text and "scales to zero" in text
    text = local_platform.kubectl("explain", "rewardpool.spec.chain").stdout
    assert "distributorAddress" in text


def _pool_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "RewardPool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "modelSelector": {"matchLabels": {"team": "a"}},
            "epochSeconds": 3600,
            "chain": {
                "chainId": 31337,
                "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                "tokenAddress": ADDR,
                "distributorAddress": "0x" + "d1" * 20,
            },
        },
    }


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("chain", "distributorAddress"), "0x" + "d2" * 20, "spec.chain.distributorAddress"),
        (("chain", "tokenAddress"), "0x" + "02" * 20, "spec.chain.tokenAddress"),
        (("chain", "chainId"), 1, "spec.chain.chainId"),
        (("chain", "tokenDecimals"), 6, "spec.chain.tokenDecimals"),  # created with 18 (below)
        (("epochSeconds",), 60, "spec.epochSeconds"),
    ],
)
def test_the_api_server_refuses_to_move_a_pools_settlement_to_another_identity(
    kube: Kube, path: tuple[str, ...], value: Any, field: str
) -> None:
    name = "immutable-" + field.rsplit(".", 1)[-1].lower()
    api = ("openledger.io", "v1alpha1", "default", "rewardpools")
    manifest = _pool_manifest(name)
    manifest["spec"]["chain"]["tokenDecimals"] = 18
    kube.objects.create_namespaced_custom_object(*api, manifest)
    try:
        pool = kube.objects.get_namespaced_custom_object(*api, name)
        pool["spec"]["protocolFeeBps"] = 300  # other fields stay editable
        pool = kube.objects.replace_namespaced_custom_object(*api, name, pool)
        target = pool["spec"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ApiException) as info:
            kube.objects.replace_namespaced_custom_object(*api, name, pool)
        assert info.value.status == 422, info.value.body
        message = json.loads(info.value.body)["message"]
        assert field in message and "immutable" in message and "new RewardPool" in message, message
    finally:
        kube.objects.delete_namespaced_custom_object(*api, name)


def test_a_pool_created_without_token_decimals_may_declare_them_once(kube: Kube) -> None:
    """Pools from before ``tokenDecimals`` existed (unset = 18) can declare a 6-decimals token, once."""
    name = "decimals-once"
    api = ("openledger.io", "v1alpha1", "default", "rewardpools")
    kube.objects.create_namespaced_custom_object(*api, _pool_manifest(name))
    try:
        pool = kube.objects.get_namespaced_custom_object(*api, name)
        assert "tokenDecimals" not in pool["spec"]["chain"]  # no default: unset stays unset
        pool["spec"]["chain"]["tokenDecimals"] = 6
        pool = kube.objects.replace_namespaced_custom_object(*api, name, pool)
        pool["spec"]["chain"]["tokenDecimals"] = 18
        with pytest.raises(ApiException) as info:
            kube.objects.replace_namespaced_custom_object(*api, name, pool)
        message = json.loads(info.value.body)["message"]
        assert "spec.chain.tokenDecimals" in message and "immutable" in message, message
        del pool["spec"]["chain"]["tokenDecimals"]
        with pytest.raises(ApiException):  # unsetting it is a change too
            kube.objects.replace_namespaced_custom_object(*api, name, pool)
    finally:
        kube.objects.delete_namespaced_custom_object(*api, name)
