"""Model status mirrored from KServe's InferenceService status."""

from __future__ import annotations

from typing import Any

from openledger.controllers import model_builder as mb
from openledger.controllers.conditions import find_condition

from .test_model_builder import make_model

NOW = "2026-01-01T00:00:00Z"


def isvc(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "llama", "namespace": "team-a", "generation": generation}, "status": status or {}}


def ready_isvc(url: str = "http://llama.team-a.example.com") -> dict[str, Any]:
    return isvc(
        {
            "url": url,
            "observedGeneration": 1,
            "conditions": [
                {"type": "PredictorReady", "status": "True"},
                {"type": "IngressReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
            "modelStatus": {"transitionStatus": "UpToDate", "copies": {"failedCopies": 0, "totalCopies": 3}},
        }
    )


def cond(status: mb.ModelStatus, type_: str) -> dict[str, Any]:
    found = find_condition(status.conditions, type_)
    assert found is not None, type_
    return dict(found)


def test_ready_isvc_makes_a_ready_model_with_url_and_replicas() -> None:
    status = mb.model_status(make_model(), mb.Observation(isvc=ready_isvc()), NOW)
    assert status.phase == "Ready"
    assert status.url == "http://llama.team-a.example.com"
    assert status.replicas == 3
    assert status.observed_generation == 3
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "InferenceServiceReady")["status"] == "True"
    assert cond(status, "Priced")["reason"] == "Free"
    assert [c["type"] for c in status.conditions] == ["Ready", "Priced", "InferenceServiceReady"]


def test_no_isvc_yet_is_pending() -> None:
    status = mb.model_status(make_model(), mb.Observation(), NOW)
    assert status.phase == "Pending"
    assert cond(status, "Ready")["status"] == "Unknown"


def test_isvc_without_readiness_is_deploying() -> None:
    status = mb.model_status(make_model(), mb.Observation(isvc=isvc()), NOW)
    assert status.phase == "Deploying"
    assert cond(status, "InferenceServiceReady")["reason"] == "AwaitingKServe"


def test_model_load_failure_mirrors_kserve_reason_and_message() -> None:
    failed = isvc(
        {
            "conditions": [
                {"type": "PredictorReady", "status": "False", "reason": "ModelLoadFailed"},
                {"type": "Ready", "status": "False", "reason": "ModelLoadFailed"},
            ],
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "weights not found at hf://org/model"},
            },
        }
    )
    status = mb.model_status(make_model(), mb.Observation(isvc=failed), NOW)
    assert status.phase == "Failed"
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModelLoadFailed")
    assert "weights not found" in ready["message"]


def test_a_serving_model_that_breaks_is_degraded() -> None:
    model = make_model()
    model["status"] = {"phase": "Ready"}
    broken = isvc(
        {
            "url": "http://x",
            "observedGeneration": 1,
            "conditions": [
                {"type": "PredictorReady", "status": "False", "reason": "RevisionMissing", "message": "pods crash"},
                {"type": "Ready", "status": "False"},
            ],
        }
    )
    status = mb.model_status(model, mb.Observation(isvc=broken), NOW)
    assert status.phase == "Degraded"
    assert cond(status, "InferenceServiceReady")["reason"] == "RevisionMissing"


def test_stale_observed_generation_is_rolling_forward() -> None:
    rolling = ready_isvc()
    rolling["metadata"]["generation"] = 2
    status = mb.model_status(make_model(), mb.Observation(isvc=rolling), NOW)
    assert status.phase == "Deploying"
    assert cond(status, "InferenceServiceReady")["reason"] == "RollingForward"


def test_missing_crd_is_a_clear_condition_not_a_crash() -> None:
    status = mb.model_status(make_model(), mb.Observation(crd_missing=True), NOW)
    assert status.phase == "Pending"
    ready = cond(status, "Ready")
    assert ready["reason"] == "InferenceServiceCRDMissing"
    assert "install KServe" in ready["message"]


def test_rejected_isvc_is_failed_with_the_servers_message() -> None:
    status = mb.model_status(make_model(), mb.Observation(write_error="spec.predictor.minReplicas: Invalid"), NOW)
    assert status.phase == "Failed"
    assert "minReplicas" in cond(status, "Ready")["message"]


def test_invalid_price_is_priced_false() -> None:
    model = make_model(pricing={"decimals": 2, "perRequest": "0.001"})
    status = mb.model_status(model, mb.Observation(isvc=ready_isvc()), NOW)
    priced = cond(status, "Priced")
    assert (priced["status"], priced["reason"]) == ("False", "InvalidPrice")
    assert "spec.pricing.perRequest" in priced["message"]
    assert status.phase == "Failed"


def test_status_is_stable_across_reconciles() -> None:
    model = make_model()
    first = mb.model_status(model, mb.Observation(isvc=ready_isvc()), NOW)
    model["status"] = first.as_patch()
    second = mb.model_status(model, mb.Observation(isvc=ready_isvc()), "2030-01-01T00:00:00Z")
    assert not mb.status_changed(model, second)
