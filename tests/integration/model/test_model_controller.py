"""The Model controller against the real API server with the real KServe CRD installed:
the server validates every InferenceService the operator writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import yaml

from openledger.controllers.model_builder import FINALIZER
from openledger.wire import ModelRoute, model_route_key

from .conftest import CONTRIBUTOR, OWNER, Kube, Operator, model_manifest, wait_for

ROOT = Path(__file__).resolve().parents[3]


def predictor(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    isvc = wait_for(lambda: kube.isvc(ns, name), what=f"InferenceService {ns}/{name}")
    return dict(isvc["spec"]["predictor"])


def condition(model: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in model["status"]["conditions"]:
        if cond["type"] == type_:
            return dict(cond)
    raise AssertionError(f"no condition {type_}")


def test_model_becomes_an_owned_gpu_inference_service(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    kube.create_model(
        model_manifest(
            "llama",
            namespace,
            runtime="kserve-huggingfaceserver",
            protocol="openai",
            resources={"gpus": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "4", "memory": "32Gi"},
            scaling={"minReplicas": 1, "maxReplicas": 4, "metric": "cpu", "target": 70},
        )
    )
    pred = predictor(kube, namespace, "llama")
    isvc = kube.isvc(namespace, "llama")
    model = kube.model(namespace, "llama")
    assert isvc is not None and model is not None
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    [ref] = isvc["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "Model",
        "llama",
        model["metadata"]["uid"],
        True,
    )
    assert pred["model"]["modelFormat"] == {"name": "huggingface", "version": "1"}
    assert pred["model"]["runtime"] == "kserve-huggingfaceserver"
    assert pred["model"]["storageUri"] == "hf://org/llama"
    assert pred["model"]["protocolVersion"] == "v1"
    assert pred["model"]["resources"]["limits"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pred["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pred["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (1, 4, "cpu", 70)
    model = wait_for(
        lambda: (m := kube.model(namespace, "llama")) and m.get("status", {}).get("phase") == "Deploying" and m
    )
    assert FINALIZER in model["metadata"]["finalizers"]
    assert model["status"]["inferenceService"] == "llama"
    assert condition(model, "Priced")["status"] == "True"


def test_scale_to_zero_and_canary_in_knative_mode(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    kube.create_model(
        model_manifest(
            "sklearn",
            namespace,
            format={"name": "sklearn"},
            deploymentMode="Knative",
            scaling={"minReplicas": 0, "maxReplicas": 3, "metric": "rps", "target": 20},
            canary={"storageUri": "gs://bucket/sklearn-v2", "trafficPercent": 25},
        )
    )
    pred = predictor(kube, namespace, "sklearn")
    isvc = kube.isvc(namespace, "sklearn")
    assert isvc is not None
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert pred["minReplicas"] == 0
    assert pred["canaryTrafficPercent"] == 25
    assert pred["model"]["storageUri"] == "gs://bucket/sklearn-v2"
    assert "nodeSelector" not in pred and "tolerations" not in pred
    assert "nvidia.com/gpu" not in (pred["model"].get("resources") or {}).get("limits", {})


def test_status_mirrors_kserve_and_the_route_reaches_redis(
    kube: Kube, namespace: str, shared_operator: Operator, redis_url: str
) -> None:
    kube.create_model(
        model_manifest("mistral", namespace, contributors=[{"account": CONTRIBUTOR, "shareBps": 1500, "role": "data"}])
    )
    wait_for(lambda: kube.isvc(namespace, "mistral"))
    kube.kserve_ready(namespace, "mistral", url="http://mistral.example.com", copies=2)
    model = wait_for(lambda: kube.phase(namespace, "mistral") == "Ready" and kube.model(namespace, "mistral"))
    assert model["status"]["url"] == "http://mistral.example.com"
    assert model["status"]["replicas"] == 2
    assert model["status"]["observedGeneration"] == model["metadata"]["generation"]
    for type_ in ("Ready", "InferenceServiceReady", "Priced"):
        cond = condition(model, type_)
        assert cond["status"] == "True"
        assert cond["observedGeneration"] == model["metadata"]["generation"]
        assert cond["lastTransitionTime"]

    client = redis.Redis.from_url(redis_url)

    # The route exists from the start (url "" until ready): wait for the ready one, not just any.
    def ready_route() -> ModelRoute | None:
        raw = client.get(model_route_key(namespace, "mistral"))
        route = ModelRoute.from_json(raw) if raw else None
        return route if route is not None and route.url else None

    route = wait_for(ready_route, what="the ready route in Redis")
    assert route.model == f"{namespace}/mistral"
    assert route.url == "http://mistral.example.com"
    assert route.price.per_input_token == 10**12 and route.price.per_output_token == 2 * 10**12
    assert route.owner == OWNER
    assert route.contributors[0].share_bps == 1500
    # Events are posted right after the writes they describe.
    wait_for(
        lambda: {"InferenceServiceCreated", "Ready"} <= {e.reason for e in kube.events(namespace, "mistral")},
        what="the Created and Ready events",
    )


def test_model_load_failure_is_mirrored_with_kserves_reason(
    kube: Kube, namespace: str, shared_operator: Operator
) -> None:
    kube.create_model(model_manifest("broken", namespace))
    wait_for(lambda: kube.isvc(namespace, "broken"))
    kube.kserve_status(
        namespace,
        "broken",
        {
            "observedGeneration": 1,
            "conditions": [
                {"type": "PredictorReady", "status": "False", "reason": "ModelLoadFailed"},
                {"type": "Ready", "status": "False", "reason": "ModelLoadFailed"},
            ],
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no weights at hf://org/broken"},
            },
        },
    )
    model = wait_for(lambda: kube.phase(namespace, "broken") == "Failed" and kube.model(namespace, "broken"))
    ready = condition(model, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModelLoadFailed")
    assert "no weights" in ready["message"]
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "Failed" and "ModelLoadFailed" in e.message
            for e in kube.events(namespace, "broken")
        ),
        what="a Warning event naming ModelLoadFailed",
    )


def test_model_change_rolls_forward(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    kube.create_model(model_manifest("phi", namespace, resources={"gpus": 1, "gpuProduct": "A100"}))
    wait_for(lambda: kube.isvc(namespace, "phi"))
    kube.kserve_ready(namespace, "phi")
    wait_for(lambda: kube.phase(namespace, "phi") == "Ready")
    kube.patch_model(
        namespace,
        "phi",
        {
            "spec": {
                "storageUri": "hf://org/phi-2",
                "resources": {"gpus": 0, "gpuProduct": None},
                "scaling": {"maxReplicas": 5},
            }
        },
    )
    pred = wait_for(
        lambda: (p := predictor(kube, namespace, "phi"))["model"]["storageUri"] == "hf://org/phi-2" and p,
        what="the new storageUri",
    )
    assert pred["maxReplicas"] == 5
    assert "nodeSelector" not in pred or "nvidia.com/gpu.product" not in pred["nodeSelector"]
    assert not pred.get("tolerations")
    assert "nvidia.com/gpu" not in pred["model"].get("resources", {}).get("limits", {})
    # KServe has not observed the new generation yet: rolling forward.
    model = wait_for(lambda: kube.phase(namespace, "phi") == "Deploying" and kube.model(namespace, "phi"))
    assert condition(model, "InferenceServiceReady")["reason"] == "RollingForward"
    kube.kserve_ready(namespace, "phi")
    model = wait_for(lambda: kube.phase(namespace, "phi") == "Ready" and kube.model(namespace, "phi"))
    assert model["status"]["observedGeneration"] == model["metadata"]["generation"] == 2


def test_hand_edits_of_the_inference_service_are_repaired(
    kube: Kube, namespace: str, shared_operator: Operator
) -> None:
    kube.create_model(model_manifest("gemma", namespace, scaling={"minReplicas": 2, "maxReplicas": 2}))
    wait_for(lambda: kube.isvc(namespace, "gemma"))
    kube.patch_isvc(
        namespace,
        "gemma",
        {
            "metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Knative"}},
            "spec": {"predictor": {"minReplicas": 9, "maxReplicas": 9, "model": {"storageUri": "hf://evil/model"}}},
        },
    )
    pred = wait_for(
        lambda: (p := predictor(kube, namespace, "gemma"))["model"]["storageUri"] == "hf://org/gemma" and p,
        what="the repair",
    )
    assert (pred["minReplicas"], pred["maxReplicas"]) == (2, 2)
    isvc = kube.isvc(namespace, "gemma")
    assert isvc is not None
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    wait_for(lambda: any(e.reason == "InferenceServiceUpdated" for e in kube.events(namespace, "gemma")))
    assert 'openledger_operator_drift_repairs_total{kind="Model"}' in shared_operator.metrics()


def test_a_deleted_inference_service_is_recreated(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    kube.create_model(model_manifest("qwen", namespace))
    first = wait_for(lambda: kube.isvc(namespace, "qwen"))
    kube.delete_isvc(namespace, "qwen")
    second = wait_for(
        lambda: (i := kube.isvc(namespace, "qwen")) and i["metadata"]["uid"] != first["metadata"]["uid"] and i,
        what="a new InferenceService",
    )
    assert second["spec"]["predictor"]["model"]["storageUri"] == "hf://org/qwen"
    assert len(kube.isvcs(namespace)) == 1


def test_deleting_the_model_removes_its_inference_service_and_route(
    kube: Kube, namespace: str, shared_operator: Operator, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    kube.create_model(model_manifest("falcon", namespace))
    wait_for(lambda: kube.isvc(namespace, "falcon"))
    wait_for(lambda: client.get(model_route_key(namespace, "falcon")))
    kube.delete_model(namespace, "falcon")
    wait_for(lambda: kube.model(namespace, "falcon") is None, what="the Model to go")
    assert kube.isvc(namespace, "falcon") is None
    assert client.get(model_route_key(namespace, "falcon")) is None


def test_the_example_manifest_applies_and_deploys(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "model.yaml").read_text()) if d]
    model = next(d for d in docs if d["kind"] == "Model")
    model["metadata"]["namespace"] = namespace
    kube.create_model(model)
    name = model["metadata"]["name"]
    wait_for(lambda: kube.isvc(namespace, name))
    kube.kserve_ready(namespace, name)
    wait_for(lambda: kube.phase(namespace, name) == "Ready", what="the example Model to be Ready")
