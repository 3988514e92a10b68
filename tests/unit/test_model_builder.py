"""Model → InferenceService mapping and drift repair, as pure functions."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from openledger.controllers import model_builder as mb

OWNER = "0x" + "ab" * 20
CONTRIB = "0x" + "cd" * 20


def make_model(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": {"name": "huggingface", "version": "1"},
        "storageUri": "hf://org/model",
        "protocol": "v1",
        "deploymentMode": "Standard",
        "resources": {"gpus": 0},
        "scaling": {"minReplicas": 1},
        "pricing": {"token": "OPEN", "decimals": 18, "perRequest": "0", "perInputToken": "0", "perOutputToken": "0"},
        "owner": OWNER,
    }
    base.update(spec)
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-1", "generation": 3, "resourceVersion": "10"},
        "spec": base,
    }


def predictor(model: dict[str, Any]) -> dict[str, Any]:
    return mb.desired_inference_service(model)["spec"]["predictor"]


def test_isvc_has_the_models_name_namespace_owner_and_mode_annotation() -> None:
    isvc = mb.desired_inference_service(make_model(deploymentMode="Knative"))
    meta = isvc["metadata"]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert (meta["name"], meta["namespace"]) == ("llama", "team-a")
    assert meta["annotations"] == {"serving.kserve.io/deploymentMode": "Knative"}
    assert meta["labels"][mb.MODEL_LABEL] == "llama"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "openledger.io/v1alpha1",
            "kind": "Model",
            "name": "llama",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_format_runtime_storage_and_protocol_map_to_the_predictor_model() -> None:
    pred = predictor(make_model(runtime="kserve-huggingfaceserver", protocol="v2"))
    assert pred["model"] == {
        "modelFormat": {"name": "huggingface", "version": "1"},
        "runtime": "kserve-huggingfaceserver",
        "storageUri": "hf://org/model",
        "protocolVersion": "v2",
    }


@pytest.mark.parametrize(("protocol", "version"), [("v1", "v1"), ("v2", "v2"), ("openai", "v1")])
def test_protocol_versions(protocol: str, version: str) -> None:
    assert predictor(make_model(protocol=protocol))["model"]["protocolVersion"] == version


def test_gpus_become_limits_node_selector_and_nvidia_toleration() -> None:
    pred = predictor(
        make_model(resources={"gpus": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "4", "memory": "32Gi"})
    )
    assert pred["model"]["resources"] == {
        "limits": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "2"},
        "requests": {"cpu": "4", "memory": "32Gi"},
    }
    assert pred["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pred["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_only_model_has_no_gpu_limit_selector_or_toleration() -> None:
    pred = predictor(make_model(resources={"gpus": 0, "cpu": 2}))
    assert pred["model"]["resources"]["limits"] == {"cpu": "2"}
    assert "nodeSelector" not in pred and "tolerations" not in pred


def test_scaling_maps_including_scale_to_zero() -> None:
    pred = predictor(
        make_model(deploymentMode="Knative", scaling={"minReplicas": 0, "maxReplicas": 4, "metric": "rps", "target": 8})
    )
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (0, 4, "rps", 8)


def test_canary_serves_the_new_uri_with_its_traffic_share_in_knative_mode() -> None:
    pred = predictor(
        make_model(deploymentMode="Knative", canary={"storageUri": "hf://org/model-v2", "trafficPercent": 10})
    )
    assert pred["model"]["storageUri"] == "hf://org/model-v2"
    assert pred["canaryTrafficPercent"] == 10


def test_no_drift_when_the_live_object_carries_what_we_own_plus_kserve_defaults() -> None:
    desired = mb.desired_inference_service(make_model(resources={"gpus": 1, "cpu": "4"}))
    live = copy.deepcopy(desired)
    live["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"] = 4  # server may return a number
    live["spec"]["predictor"]["timeout"] = 60  # a KServe default we do not own
    live["metadata"]["labels"]["extra"] = "x"
    assert mb.drift_patch(desired, live) is None


def test_hand_edits_are_repaired_by_a_merge_patch() -> None:
    desired = mb.desired_inference_service(make_model(scaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu"}))
    live = copy.deepcopy(desired)
    live["spec"]["predictor"]["model"]["storageUri"] = "hf://evil"
    live["spec"]["predictor"]["minReplicas"] = 9
    live["spec"]["predictor"]["canaryTrafficPercent"] = 50
    live["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Knative"
    drift = mb.drift_patch(desired, live)
    assert drift is not None
    assert drift.patch["spec"]["predictor"]["model"] == {"storageUri": "hf://org/model"}
    assert drift.patch["spec"]["predictor"]["minReplicas"] == 1
    assert drift.patch["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert drift.patch["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "Standard",
        "serving.kserve.io/autoscalerClass": "hpa",
    }
    assert "spec.predictor.model.storageUri" in drift.fields


def test_dropping_gpus_removes_limit_selector_and_only_our_toleration() -> None:
    gpu = mb.desired_inference_service(make_model(resources={"gpus": 1, "gpuProduct": "A100"}))
    live = copy.deepcopy(gpu)
    other = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    live["spec"]["predictor"]["tolerations"].append(other)
    cpu = mb.desired_inference_service(make_model(resources={"gpus": 0}))
    drift = mb.drift_patch(cpu, live)
    assert drift is not None
    pred = drift.patch["spec"]["predictor"]
    assert pred["model"]["resources"] == {"limits": {"nvidia.com/gpu": None}}
    assert pred["nodeSelector"] == {"nvidia.com/gpu.product": None}
    assert pred["tolerations"] == [other]


def test_missing_owner_reference_is_added_without_dropping_others() -> None:
    desired = mb.desired_inference_service(make_model())
    live = copy.deepcopy(desired)
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u2"}
    live["metadata"]["ownerReferences"] = [foreign]
    drift = mb.drift_patch(desired, live)
    assert drift is not None
    assert drift.patch["metadata"]["ownerReferences"] == [foreign, desired["metadata"]["ownerReferences"][0]]


def test_route_carries_price_in_base_units_and_lowercased_accounts() -> None:
    model = make_model(
        protocol="openai",
        pricing={
            "token": "OPEN",
            "decimals": 18,
            "perRequest": "1",
            "perInputToken": "0.000001",
            "perOutputToken": "0",
        },
        contributors=[{"account": CONTRIB.upper().replace("0X", "0x"), "shareBps": 1500, "role": "data"}],
    )
    route = mb.model_route(model, "http://llama.team-a")
    assert route.model == "team-a/llama"
    assert route.url == "http://llama.team-a"
    assert route.protocol == "openai"
    assert route.price.per_request == 10**18
    assert route.price.per_input_token == 10**12
    assert route.contributors[0].account == CONTRIB
    assert route.contributors[0].share_bps == 1500
    assert route.generation == 3


def test_finalizer_helpers() -> None:
    model = make_model()
    assert mb.with_finalizer(model) == [mb.FINALIZER]
    model["metadata"]["finalizers"] = ["other", mb.FINALIZER]
    assert mb.with_finalizer(model) is None
    assert mb.without_finalizer(model) == ["other"]
