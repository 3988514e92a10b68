"""Model autoscaling against the real API server and the real KServe CRD: the server refuses
combinations KServe would ignore (naming the field), and every supported combination becomes
an InferenceService the KServe schema accepts (strict field validation, server-side apply)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from openledger.controllers import model_builder as mb
from openledger.controllers.api import crd_documents
from openledger.local.platform import LocalPlatform, shared_crd_dir

from .conftest import Kube, Operator, model_manifest, wait_for

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "model-keda.yaml"
PROMETHEUS = {"serverAddress": "http://prometheus-operated.monitoring.svc:9090"}
KEDA = {"metric": "inflight", "target": 4, "maxReplicas": 6, "prometheus": PROMETHEUS}

REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("concurrency-in-standard", {"scaling": {"metric": "concurrency"}}, "spec.scaling.metric"),
    ("rps-in-standard", {"scaling": {"metric": "rps", "target": 10}}, "spec.scaling.metric"),
    ("cpu-in-knative", {"deploymentMode": "Knative", "scaling": {"metric": "cpu"}}, "spec.scaling.metric"),
    ("inflight-in-knative", {"deploymentMode": "Knative", "scaling": KEDA}, "spec.scaling.metric"),
    ("cpu-target-over-100", {"scaling": {"metric": "cpu", "target": 150}}, "spec.scaling.target"),
    ("memory-without-target", {"scaling": {"metric": "memory"}}, "spec.scaling.target"),
    ("scale-to-zero-on-cpu", {"scaling": {"metric": "cpu", "minReplicas": 0}}, "spec.scaling.minReplicas"),
    (
        "inflight-without-prometheus",
        {"scaling": {"metric": "inflight", "target": 4, "maxReplicas": 3}},
        "spec.scaling.prometheus",
    ),
    (
        "inflight-without-target",
        {"scaling": {"metric": "inflight", "maxReplicas": 3, "prometheus": PROMETHEUS}},
        "spec.scaling.target",
    ),
    (
        "inflight-without-max-replicas",
        {"scaling": {"metric": "inflight", "target": 4, "prometheus": PROMETHEUS}},
        "spec.scaling.maxReplicas",
    ),
    (
        "prometheus-without-inflight",
        {"scaling": {"metric": "cpu", "prometheus": PROMETHEUS}},
        "spec.scaling.prometheus",
    ),
    (
        "prometheus-address-not-a-url",
        {"scaling": {**KEDA, "prometheus": {"serverAddress": "prometheus:9090"}}},
        "spec.scaling.prometheus.serverAddress",
    ),
]

ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("knative-default", {"deploymentMode": "Knative"}),
    ("knative-concurrency-to-zero", {"deploymentMode": "Knative", "scaling": {"minReplicas": 0, "target": 8}}),
    ("knative-rps", {"deploymentMode": "Knative", "scaling": {"metric": "rps", "target": 20, "maxReplicas": 4}}),
    ("standard-default", {}),
    ("standard-cpu", {"scaling": {"metric": "cpu", "target": 70, "maxReplicas": 4}}),
    ("standard-memory", {"scaling": {"metric": "memory", "target": 80, "maxReplicas": 4}}),
    ("standard-keda-inflight", {"scaling": KEDA}),
    ("standard-keda-to-zero", {"scaling": {**KEDA, "minReplicas": 0}}),
]


@pytest.fixture(scope="module")
def real_crds() -> Path:
    found = shared_crd_dir()
    if found is None:
        pytest.skip("../shared/third_party/crds is absent: the real KServe CRD is needed to validate against")
    return found


def manifest(name: str, namespace: str, changes: dict[str, Any]) -> dict[str, Any]:
    body = model_manifest(name, namespace)
    body["spec"].update(changes)
    return body


@pytest.mark.parametrize(("changes", "field"), [(c, f) for _, c, f in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_scaling_kserve_would_ignore_is_rejected_naming_the_field(
    kube: Kube, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as info:
        kube.create_model(manifest("bad-scaling", "default", changes), dry_run=True)
    assert info.value.status == 422, info.value.body
    message = json.loads(info.value.body)["message"]
    assert field in message, message


@pytest.mark.parametrize("changes", [c for _, c in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_every_supported_combination_is_an_inference_service_kserve_accepts(
    kube: Kube, local_platform: LocalPlatform, real_crds: Path, namespace: str, changes: dict[str, Any]
) -> None:
    created = kube.create_model(manifest("scaled", namespace, changes))
    isvc = mb.desired_inference_service(created)
    applied = local_platform.kubectl(
        "apply", "--server-side", "--validate=strict", "--field-manager=openledger-test", "-f", "-",
        stdin=json.dumps(isvc), check=False,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    stored = kube.isvc(namespace, "scaled")
    assert stored is not None
    # Nothing pruned: the schema knows every field the builder writes.
    assert mb.drift_patch(isvc, stored) is None


def test_a_keda_model_becomes_a_keda_inference_service(kube: Kube, namespace: str, shared_operator: Operator) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    example["metadata"]["namespace"] = namespace
    kube.create_model(example)
    name = example["metadata"]["name"]
    isvc = wait_for(lambda: kube.isvc(namespace, name), 30, "the InferenceService")
    assert isvc["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "Standard",
        "serving.kserve.io/autoscalerClass": "keda",
    }
    pred = isvc["spec"]["predictor"]
    assert "scaleMetric" not in pred and "scaleTarget" not in pred
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 8)
    [metric] = pred["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {
        "backend": "prometheus",
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
        "query": f'sum(openledger_gateway_inflight_requests{{model="{namespace}/{name}"}}) or vector(0)',
    }
    assert metric["external"]["target"] == {"type": "Value", "value": "16"}


def test_switching_a_model_from_cpu_to_keda_rewrites_its_autoscaling(
    kube: Kube, namespace: str, shared_operator: Operator
) -> None:
    kube.create_model(manifest("switch", namespace, {"scaling": {"metric": "cpu", "target": 60, "maxReplicas": 3}}))
    isvc = wait_for(lambda: kube.isvc(namespace, "switch"), 30, "the InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (isvc["spec"]["predictor"]["scaleMetric"], isvc["spec"]["predictor"]["scaleTarget"]) == ("cpu", 60)

    kube.patch_model(namespace, "switch", {"spec": {"scaling": KEDA}})

    def switched() -> dict[str, Any] | None:
        got = kube.isvc(namespace, "switch")
        return got if got and "autoScaling" in got["spec"]["predictor"] else None

    isvc = wait_for(switched, 30, "the InferenceService to use KEDA")
    pred = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    assert "scaleMetric" not in pred and "scaleTarget" not in pred
    assert pred["autoScaling"]["metrics"][0]["external"]["target"]["value"] == "4"


def test_strict_apply_would_catch_a_field_kserve_does_not_know(
    kube: Kube, local_platform: LocalPlatform, real_crds: Path, namespace: str
) -> None:
    """The check above can fail: a misspelt autoscaling field is refused by the real schema."""
    created = kube.create_model(manifest("strict", namespace, {"scaling": KEDA}))
    isvc = mb.desired_inference_service(created)
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["serverAdress"] = "http://x"
    applied = local_platform.kubectl(
        "apply", "--server-side", "--validate=strict", "--dry-run=server", "-f", "-", stdin=json.dumps(isvc),
        check=False,
    )  # fmt: skip
    assert applied.returncode != 0 and "serverAdress" in applied.stderr, applied.stderr


@contextlib.contextmanager
def crd_without_the_standard_metric_rule(local_platform: LocalPlatform, kube: Kube) -> Iterator[None]:
    """The Model CRD as it was before the rule (the old default, concurrency in Standard mode,
    was accepted), then the current one back: how a cluster upgrades over stored Models."""
    current = crd_documents()["openledger.io_models.yaml"]
    old = copy.deepcopy(current)
    spec_schema = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [
        r for r in spec_schema["x-kubernetes-validations"] if not r["message"].startswith("scaling.metric: deployment")
    ]
    probe = model_manifest("probe", "default", scaling={"metric": "concurrency"})

    def apply(doc: dict[str, Any], accepted: bool) -> None:
        result = local_platform.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=openledger-local", "-f", "-",
            stdin=json.dumps(doc), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

        def took_effect() -> bool:
            try:
                kube.create_model(copy.deepcopy(probe), dry_run=True)
            except ApiException:
                return not accepted
            return accepted

        wait_for(took_effect, 30, "the Model CRD change to take effect")

    apply(old, accepted=True)
    try:
        yield
    finally:
        apply(current, accepted=False)


def test_a_stored_model_kserve_would_ignore_is_warned_about_and_must_be_fixed_on_its_next_edit(
    kube: Kube, local_platform: LocalPlatform, namespace: str, shared_operator: Operator
) -> None:
    with crd_without_the_standard_metric_rule(local_platform, kube):
        kube.create_model(model_manifest("legacy", namespace, scaling={"metric": "concurrency", "target": 8}))

    # What KServe's HPA really did with concurrency: CPU at its default target, said out loud.
    isvc = wait_for(lambda: kube.isvc(namespace, "legacy"), 30, "the InferenceService")
    pred = isvc["spec"]["predictor"]
    assert pred["scaleMetric"] == "cpu" and "scaleTarget" not in pred
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"

    def scaling_condition() -> dict[str, Any] | None:
        model = kube.model(namespace, "legacy") or {}
        found = [c for c in (model.get("status") or {}).get("conditions") or [] if c["type"] == "ScalingSupported"]
        return found[0] if found else None

    cond = wait_for(scaling_condition, 30, "the ScalingSupported condition")
    assert (cond["status"], cond["reason"]) == ("False", "MetricNotSupported")
    assert "scaling.metric concurrency" in cond["message"]
    warnings = wait_for(
        lambda: [e for e in kube.events(namespace, "legacy") if e.reason == "ScalingNotSupported"], 30, "the Event"
    )
    assert warnings[0].type == "Warning" and "scaling.metric" in warnings[0].message

    # Unchanged, it stays valid (labels, finalizers and status still write); a spec edit must fix it.
    kube.patch_model(namespace, "legacy", {"metadata": {"labels": {"team": "b"}}})
    with pytest.raises(ApiException) as info:
        kube.patch_model(namespace, "legacy", {"spec": {"pricing": {"perRequest": "1"}}})
    assert info.value.status == 422 and "spec.scaling.metric" in json.loads(info.value.body)["message"]
    kube.patch_model(namespace, "legacy", {"spec": {"scaling": {"metric": "cpu", "target": 60}}})
    fixed = wait_for(lambda: (c := scaling_condition()) and c["status"] == "True" and c, 30, "the condition to clear")
    assert fixed["reason"] == "Supported"
    assert wait_for(lambda: (kube.isvc(namespace, "legacy") or {})["spec"]["predictor"].get("scaleTarget") == 60, 30)
