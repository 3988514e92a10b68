"""How a Model's ``scaling`` becomes KServe autoscaling, for every deployment mode and metric."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from openledger.controllers import model_builder as mb
from openledger.controllers.conditions import find_condition

PROMETHEUS = "http://prometheus.monitoring.svc:9090"
CLASS = "serving.kserve.io/autoscalerClass"


def make_model(mode: str, status: dict[str, Any] | None = None, **scaling: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-1", "generation": 2},
        "spec": {
            "format": {"name": "huggingface"},
            "storageUri": "hf://org/model",
            "owner": "0x" + "ab" * 20,
            "deploymentMode": mode,
            "scaling": scaling,
        },
    }
    if status is not None:
        model["status"] = status
    return model


def isvc(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    out = mb.desired_inference_service(model)
    return out["spec"]["predictor"], out["metadata"]["annotations"]


# (mode, scaling, autoscaler class annotation or None, predictor scaling fields)
SUPPORTED: list[tuple[str, dict[str, Any], str | None, dict[str, Any]]] = [
    ("Knative", {}, None, {"minReplicas": 1, "scaleMetric": "concurrency"}),
    (
        "Knative",
        {"metric": "concurrency", "target": 4, "minReplicas": 0, "maxReplicas": 3},
        None,
        {"minReplicas": 0, "maxReplicas": 3, "scaleMetric": "concurrency", "scaleTarget": 4},
    ),
    ("Knative", {"metric": "rps", "target": 50}, None, {"minReplicas": 1, "scaleMetric": "rps", "scaleTarget": 50}),
    ("Standard", {}, "hpa", {"minReplicas": 1, "scaleMetric": "cpu"}),
    (
        "Standard",
        {"metric": "cpu", "target": 70, "maxReplicas": 5},
        "hpa",
        {"minReplicas": 1, "maxReplicas": 5, "scaleMetric": "cpu", "scaleTarget": 70},
    ),
    (
        "Standard",
        {"metric": "memory", "target": 60},
        "hpa",
        {"minReplicas": 1, "scaleMetric": "memory", "scaleTarget": 60},
    ),
]


@pytest.mark.parametrize(("mode", "scaling", "klass", "fields"), SUPPORTED)
def test_supported_combinations_map_to_kserve_fields(
    mode: str, scaling: dict[str, Any], klass: str | None, fields: dict[str, Any]
) -> None:
    model = make_model(mode, **scaling)
    pred, annotations = isvc(model)
    assert {k: v for k, v in pred.items() if k != "model"} == fields
    assert annotations.get(CLASS) == klass
    assert annotations["serving.kserve.io/deploymentMode"] == mode
    assert mb.scaling_plan(model).warning == ""
    assert mb.scaling_condition(model, 2, "now") is None  # a healthy Model does not carry the condition


@pytest.mark.parametrize("min_replicas", [0, 2])
def test_inflight_scales_with_keda_on_the_gateways_gauge(min_replicas: int) -> None:
    model = make_model(
        "Standard",
        metric="inflight",
        target=16,
        minReplicas=min_replicas,
        maxReplicas=8,
        prometheus={"serverAddress": PROMETHEUS},
    )
    pred, annotations = isvc(model)
    assert annotations[CLASS] == "keda"
    assert "scaleMetric" not in pred and "scaleTarget" not in pred  # KServe refuses scaleMetric with KEDA
    assert (pred["minReplicas"], pred["maxReplicas"]) == (min_replicas, 8)  # KEDA may scale to zero
    inflight = {
        "type": "External",
        "external": {
            "metric": {
                "backend": "prometheus",
                "serverAddress": PROMETHEUS,
                "query": 'sum(openledger_gateway_inflight_requests{model="team-a/llama"}) or vector(0)',
            },
            "target": {"type": "Value", "value": "16"},
        },
    }
    # At zero replicas a request fails fast, so the in-flight gauge may never show it: any
    # request the gateway answered lately asks for one replica (threshold above any count).
    wake = {
        "type": "External",
        "external": {
            "metric": {
                "backend": "prometheus",
                "serverAddress": PROMETHEUS,
                "query": 'sum(increase(openledger_gateway_requests_total{model="team-a/llama"}[2m])) or vector(0)',
            },
            "target": {"type": "Value", "value": "1000000000"},
        },
    }
    assert pred["autoScaling"] == {"metrics": [inflight, wake] if min_replicas == 0 else [inflight]}
    assert mb.scaling_plan(model).autoscaler == "keda"


# Stored before the CEL rules (the old default was concurrency in Standard mode), or
# anything else KServe would ignore: what KServe would really do, plus a warning.
IGNORED: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("Standard", {"metric": "concurrency", "target": 8}, {"scaleMetric": "cpu"}, "concurrency"),
    ("Standard", {"metric": "rps"}, {"scaleMetric": "cpu"}, "rps"),
    ("Standard", {"metric": "memory"}, {"scaleMetric": "cpu"}, "memory needs a target"),
    ("Knative", {"metric": "cpu", "target": 50}, {"scaleMetric": "concurrency"}, "cpu"),
    ("Knative", {"metric": "memory", "target": 50}, {"scaleMetric": "concurrency"}, "memory"),
    ("Knative", {"metric": "inflight", "target": 5}, {"scaleMetric": "concurrency"}, "inflight"),
]


@pytest.mark.parametrize(("mode", "scaling", "fields", "named"), IGNORED)
def test_combinations_kserve_would_ignore_fall_back_visibly(
    mode: str, scaling: dict[str, Any], fields: dict[str, Any], named: str
) -> None:
    model = make_model(mode, **scaling)
    pred, _ = isvc(model)
    assert {k: pred.get(k) for k in fields} == fields
    assert "scaleTarget" not in pred  # a concurrency target is no CPU percentage
    warning = mb.scaling_plan(model).warning
    assert "scaling.metric" in warning and named in warning
    cond = mb.scaling_condition(model, 2, "now")
    assert cond is not None
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "MetricNotSupported", warning)


def test_the_condition_turns_true_once_the_model_is_fixed() -> None:
    old = {"conditions": [{"type": "ScalingSupported", "status": "False", "reason": "MetricNotSupported"}]}
    fixed = make_model("Standard", status=old, metric="cpu")
    cond = mb.scaling_condition(fixed, 3, "now")
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", "Supported")
    status = mb.model_status(fixed, mb.Observation(), "now")
    found = find_condition(status.conditions, "ScalingSupported")
    assert found is not None and found["status"] == "True"


def test_model_status_reports_the_ignored_metric() -> None:
    status = mb.model_status(make_model("Standard", metric="concurrency"), mb.Observation(), "now")
    found = find_condition(status.conditions, "ScalingSupported")
    assert found is not None and found["status"] == "False"
    assert status.phase == "Pending"  # a warning, not a failure: KServe still serves the Model


def test_hpa_never_gets_fewer_than_one_replica() -> None:
    # Unreachable through the API server (CEL), kept safe for objects that predate it.
    pred, _ = isvc(make_model("Standard", minReplicas=0, metric="cpu"))
    assert pred["minReplicas"] == 1


def test_switching_to_keda_removes_scale_metric_and_target_from_the_live_object() -> None:
    hpa = mb.desired_inference_service(make_model("Standard", metric="cpu", target=70))
    keda = mb.desired_inference_service(
        make_model("Standard", metric="inflight", target=4, maxReplicas=3, prometheus={"serverAddress": PROMETHEUS})
    )
    drift = mb.drift_patch(keda, hpa)
    assert drift is not None
    pred = drift.patch["spec"]["predictor"]
    assert (pred["scaleMetric"], pred["scaleTarget"]) == (None, None)
    assert pred["autoScaling"] == keda["spec"]["predictor"]["autoScaling"]
    assert pred["maxReplicas"] == 3
    assert drift.patch["metadata"]["annotations"][CLASS] == "keda"


def test_switching_back_to_hpa_removes_autoscaling() -> None:
    keda = mb.desired_inference_service(
        make_model("Standard", metric="inflight", target=4, maxReplicas=3, prometheus={"serverAddress": PROMETHEUS})
    )
    hpa = mb.desired_inference_service(make_model("Standard", metric="cpu"))
    drift = mb.drift_patch(hpa, keda)
    assert drift is not None
    pred = drift.patch["spec"]["predictor"]
    assert pred["autoScaling"] is None and pred["scaleMetric"] == "cpu" and pred["maxReplicas"] is None
    assert drift.patch["metadata"]["annotations"][CLASS] == "hpa"


def test_keda_autoscaling_with_extra_live_fields_is_not_drift() -> None:
    desired = mb.desired_inference_service(
        make_model("Standard", metric="inflight", target=4, maxReplicas=3, prometheus={"serverAddress": PROMETHEUS})
    )
    live = copy.deepcopy(desired)
    live["spec"]["predictor"]["autoScaling"]["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": 60}}
    assert mb.drift_patch(desired, live) is None
