"""Pure decisions of the Model controller: no I/O, no client library.

- ``desired_inference_service(model)``: the KServe InferenceService a Model maps to.
- ``scaling_plan(model)``: its autoscaler per deployment mode (Knative KPA, HPA or KEDA)
  and a warning when the Model asks for scaling KServe would ignore.
- ``drift_patch(desired, actual)``: the merge patch that repairs a live
  InferenceService, or ``None`` when the fields we own already match.
- ``model_status(...)``: phase, url, replicas and conditions mirrored from KServe.
- ``model_route(model, url)``: what the gateway needs (``openledger.wire.ModelRoute``).

Ownership rule (level-based, and peaceful next to KServe's own defaulting): the
controller owns every field it sets, plus a few "toggles" it must also remove
when the Model stops asking for them (canary percent, replica bounds, scale metric,
target and autoScaling when the autoscaler changes, GPU limit, GPU node selector and
toleration). Fields nobody in the Model mentions are left alone, so KServe's webhook
defaults never cause a fight.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from openledger.controllers.api import API_VERSION, DEFAULT_SCALE_METRIC, SCALE_METRICS_BY_MODE, defaulted_spec
from openledger.controllers.conditions import (
    FALSE,
    TRUE,
    UNKNOWN,
    Condition,
    condition,
    find_condition,
    merge_conditions,
)
from openledger.money import MoneyError, to_base_units
from openledger.wire import Contributor, ModelRoute, Price, object_ref

ISVC_GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
ISVC_API_VERSION = f"{ISVC_GROUP}/{ISVC_VERSION}"

FINALIZER = "openledger.io/model-cleanup"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "openledger"
MODEL_LABEL = "openledger.io/model"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS_ANNOTATION = "serving.kserve.io/autoscalerClass"
# The gauge the gateway exports per Model (``namespace/name``): requests it admitted and
# has not finished, streams included. Summed over every gateway pod.
INFLIGHT_METRIC = "openledger_gateway_inflight_requests"
# Answers the gateway gave for a Model (any status): it wakes a Model scaled to zero.
REQUESTS_METRIC = "openledger_gateway_requests_total"
# A Model at zero replicas answers fast (502/503), so its in-flight gauge may read 0 at
# every scrape: any request in this window asks for one replica (threshold above any count).
WAKE_WINDOW = "2m"
WAKE_THRESHOLD = "1000000000"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
NVIDIA_TOLERATION: dict[str, str] = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# The Model's protocol → KServe's predictor.model.protocolVersion. KServe has no
# "openai" protocol: its LLM runtimes serve the OpenAI endpoints beside V1.
PROTOCOL_VERSIONS = {"v1": "v1", "v2": "v2", "openai": "v1"}

# Reasons KServe writes when a model cannot serve (status.modelStatus.lastFailureInfo.reason).
FAILURE_REASONS = frozenset(
    {
        "ModelLoadFailed",
        "RuntimeUnhealthy",
        "RuntimeDisabled",
        "NoSupportingRuntime",
        "RuntimeNotRecognized",
        "InvalidPredictorSpec",
    }
)

# Predictor fields the controller removes when the Model does not ask for them.
_PREDICTOR_TOGGLES = ("canaryTrafficPercent", "maxReplicas", "scaleTarget", "scaleMetric", "autoScaling")


# ------------------------------------------------------------------- desired


def _spec(model: Mapping[str, Any]) -> Mapping[str, Any]:
    """The Model's spec with the CRD's defaults applied (they are written once, in ``api``)."""
    return defaulted_spec("Model", model.get("spec"))


# ------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class ScalingPlan:
    """How KServe will scale the Model: its autoscaler, the predictor fields and annotations
    that ask for it, and ``warning`` when the Model asks for something KServe would ignore."""

    autoscaler: str  # kpa (Knative Pod Autoscaler) | hpa | keda
    metric: str
    predictor: dict[str, Any]
    annotations: dict[str, str]
    warning: str = ""


def inflight_query(namespace: str, name: str) -> str:
    """PromQL of the Model's in-flight requests over every gateway pod (0 when none are reported)."""
    return f'sum({INFLIGHT_METRIC}{{model="{object_ref(namespace, name)}"}}) or vector(0)'


def _ignored_metric_warning(mode: str, metric: str, used: str) -> str:
    supported = " or ".join(SCALE_METRICS_BY_MODE[mode])
    return (
        f"scaling.metric {metric} is not available in deploymentMode {mode} (KServe scales on {supported} there);"
        f" scaling on {used} instead. Set scaling.metric to one of: {', '.join(SCALE_METRICS_BY_MODE[mode])}"
    )


def _effective_metric(mode: str, metric: str, target: Any) -> tuple[str, Any, str]:
    """(metric, target, warning): what KServe will really scale on in ``mode``."""
    if metric not in SCALE_METRICS_BY_MODE[mode]:
        used = DEFAULT_SCALE_METRIC[mode]
        return used, None, _ignored_metric_warning(mode, metric, used)
    if metric == "memory" and target is None:
        return "cpu", None, "scaling.metric memory needs a target (KServe's HPA would fall back to CPU); scaling on cpu"
    return metric, target, ""


def wake_query(namespace: str, name: str) -> str:
    """PromQL of the requests the gateway answered for the Model lately (0 when none)."""
    ref = object_ref(namespace, name)
    return f'sum(increase({REQUESTS_METRIC}{{model="{ref}"}}[{WAKE_WINDOW}])) or vector(0)'


def _prometheus_metric(server_address: str, query: str, threshold: str) -> dict[str, Any]:
    metric = {"backend": "prometheus", "serverAddress": server_address, "query": query}
    return {"type": "External", "external": {"metric": metric, "target": {"type": "Value", "value": threshold}}}


def _keda_autoscaling(model: Mapping[str, Any], server_address: str, target: int, min_replicas: int) -> dict[str, Any]:
    """``spec.predictor.autoScaling``: Prometheus triggers on the gateway's gauges. KServe passes
    ``target.value`` to KEDA as the threshold per replica (AverageValue); the largest wins."""
    ns, name = model["metadata"]["namespace"], model["metadata"]["name"]
    metrics = [_prometheus_metric(server_address, inflight_query(ns, name), str(target))]
    if min_replicas == 0:
        metrics.append(_prometheus_metric(server_address, wake_query(ns, name), WAKE_THRESHOLD))
    return {"metrics": metrics}


def scaling_plan(model: Mapping[str, Any]) -> ScalingPlan:
    """The autoscaling KServe gets for a Model, per deployment mode (pure).

    The CRD's CEL rules refuse combinations KServe would ignore; Models stored before
    those rules (the old default was metric concurrency in Standard mode, which KServe's
    HPA silently replaced by CPU) still come here: they keep what KServe did (CPU at its
    default target) and get ``warning``, which the controller reports as a condition
    and an Event.
    """
    spec = _spec(model)
    scaling = spec["scaling"]
    mode = str(spec["deploymentMode"])
    requested = str(scaling.get("metric") or DEFAULT_SCALE_METRIC[mode])
    metric, target, warning = _effective_metric(mode, requested, scaling.get("target"))

    predictor: dict[str, Any] = {"minReplicas": int(scaling["minReplicas"])}
    if scaling.get("maxReplicas") is not None:
        predictor["maxReplicas"] = int(scaling["maxReplicas"])
    if mode == "Knative":
        autoscaler, annotations = "kpa", {}
    elif metric == "inflight":
        autoscaler, annotations = "keda", {AUTOSCALER_CLASS_ANNOTATION: "keda"}
    else:
        autoscaler, annotations = "hpa", {AUTOSCALER_CLASS_ANNOTATION: "hpa"}
        predictor["minReplicas"] = max(1, predictor["minReplicas"])  # KServe's HPA never goes below one

    if autoscaler == "keda":
        # KServe refuses scaleMetric with KEDA: the trigger lives in autoScaling.
        address = str(scaling["prometheus"]["serverAddress"])
        predictor["autoScaling"] = _keda_autoscaling(model, address, int(target), predictor["minReplicas"])
    else:
        predictor["scaleMetric"] = metric
        if target is not None:
            predictor["scaleTarget"] = int(target)
    return ScalingPlan(autoscaler, metric, predictor, annotations, warning)


def owner_reference(model: Mapping[str, Any]) -> dict[str, Any]:
    meta = model["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def desired_inference_service(model: Mapping[str, Any]) -> dict[str, Any]:
    """The InferenceService (same name and namespace, owned by the Model)."""
    meta = model["metadata"]
    spec = _spec(model)
    fmt = spec.get("format") or {}
    resources = spec["resources"]
    canary = spec.get("canary")
    mode = spec["deploymentMode"]

    model_fmt: dict[str, Any] = {"name": fmt["name"]}
    if fmt.get("version"):
        model_fmt["version"] = str(fmt["version"])
    # With a canary, the spec KServe sees is the new revision; KServe routes
    # (100 - canaryTrafficPercent) to the last rolled-out revision.
    storage_uri = canary["storageUri"] if canary else spec["storageUri"]
    predictor_model: dict[str, Any] = {
        "modelFormat": model_fmt,
        "storageUri": storage_uri,
        "protocolVersion": PROTOCOL_VERSIONS[spec["protocol"]],
    }
    if spec.get("runtime"):
        predictor_model["runtime"] = spec["runtime"]

    gpus = int(resources["gpus"])
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    for name in ("cpu", "memory"):
        if resources.get(name) not in (None, ""):
            limits[name] = requests[name] = str(resources[name])
    if gpus > 0:
        limits[GPU_RESOURCE] = str(gpus)
    if limits:
        predictor_model["resources"] = {"limits": limits, **({"requests": requests} if requests else {})}

    scaling = scaling_plan(model)
    predictor: dict[str, Any] = {"model": predictor_model, **scaling.predictor}
    if canary and mode == "Knative":
        predictor["canaryTrafficPercent"] = int(canary["trafficPercent"])
    if gpus > 0:
        predictor["tolerations"] = [dict(NVIDIA_TOLERATION)]
        if resources.get("gpuProduct"):
            predictor["nodeSelector"] = {GPU_PRODUCT_LABEL: resources["gpuProduct"]}

    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, MODEL_LABEL: meta["name"]},
            "annotations": {DEPLOYMENT_MODE_ANNOTATION: mode, **scaling.annotations},
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {"predictor": predictor},
    }


# --------------------------------------------------------------------- drift


def _contains(actual: Any, desired: Any) -> bool:
    """Every key of ``desired`` is in ``actual`` with an equal value (dicts recursively)."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return False
        return all(_contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, str) and isinstance(actual, int | float) and not isinstance(actual, bool):
        return desired == str(actual)  # quantities may come back as numbers
    return bool(actual == desired)


def _is_nvidia_toleration(t: Mapping[str, Any]) -> bool:
    return t.get("key") == GPU_RESOURCE and t.get("operator") == "Exists" and t.get("effect") == "NoSchedule"


@dataclass(frozen=True)
class Drift:
    """What differs, for the Event and the log, and the patch that repairs it."""

    fields: tuple[str, ...]
    patch: dict[str, Any] = field(default_factory=dict)


def drift_patch(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> Drift | None:
    """The JSON merge patch that makes ``actual`` carry what we own, or ``None``."""
    fields: list[str] = []
    d_meta, a_meta = desired["metadata"], actual.get("metadata") or {}
    meta_patch: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        if not _contains(a_meta.get(key) or {}, d_meta[key]):
            meta_patch[key] = d_meta[key]
            fields.append(f"metadata.{key}")
    our_ref = d_meta["ownerReferences"][0]
    refs = list(a_meta.get("ownerReferences") or [])
    if not any(r.get("uid") == our_ref["uid"] and r.get("controller") for r in refs):
        meta_patch["ownerReferences"] = [r for r in refs if not r.get("controller")] + [our_ref]
        fields.append("metadata.ownerReferences")

    d_pred = desired["spec"]["predictor"]
    a_pred = (actual.get("spec") or {}).get("predictor") or {}
    pred_patch: dict[str, Any] = {}

    a_model = a_pred.get("model") or {}
    model_patch: dict[str, Any] = {}
    for key, value in d_pred["model"].items():
        if key == "resources":
            continue
        if not _contains(a_model.get(key), value):
            model_patch[key] = value
            fields.append(f"spec.predictor.model.{key}")
    if "runtime" not in d_pred["model"] and a_model.get("runtime"):
        model_patch["runtime"] = None
        fields.append("spec.predictor.model.runtime")
    # Resources: set what we ask for; drop a GPU limit we no longer ask for.
    d_res = d_pred["model"].get("resources") or {}
    a_res = a_model.get("resources") or {}
    res_patch: dict[str, Any] = {}
    for part in ("limits", "requests"):
        want = dict(d_res.get(part) or {})
        have = a_res.get(part) or {}
        part_patch = {k: v for k, v in want.items() if not _contains(have.get(k), v)}
        if part == "limits" and GPU_RESOURCE in have and GPU_RESOURCE not in want:
            part_patch[GPU_RESOURCE] = None
        if part_patch:
            res_patch[part] = part_patch
    if res_patch:
        model_patch["resources"] = res_patch
        fields.append("spec.predictor.model.resources")
    if model_patch:
        pred_patch["model"] = model_patch

    for key in ("minReplicas", *_PREDICTOR_TOGGLES):
        want = d_pred.get(key)
        have = a_pred.get(key)
        if want is None and have is not None and key in _PREDICTOR_TOGGLES:
            pred_patch[key] = None
            fields.append(f"spec.predictor.{key}")
        elif want is not None and not _contains(have, want):
            pred_patch[key] = want
            fields.append(f"spec.predictor.{key}")

    want_selector = (d_pred.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
    have_selector = (a_pred.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
    if want_selector != have_selector:
        pred_patch["nodeSelector"] = {GPU_PRODUCT_LABEL: want_selector}
        fields.append("spec.predictor.nodeSelector")

    have_tolerations = list(a_pred.get("tolerations") or [])
    want_nvidia = bool(d_pred.get("tolerations"))
    has_nvidia = any(_is_nvidia_toleration(t) for t in have_tolerations)
    if want_nvidia != has_nvidia:
        others = [t for t in have_tolerations if not _is_nvidia_toleration(t)]
        new = others + ([dict(NVIDIA_TOLERATION)] if want_nvidia else [])
        pred_patch["tolerations"] = new or None
        fields.append("spec.predictor.tolerations")

    patch: dict[str, Any] = {}
    if meta_patch:
        patch["metadata"] = meta_patch
    if pred_patch:
        patch["spec"] = {"predictor": pred_patch}
    if not patch:
        return None
    return Drift(fields=tuple(fields), patch=patch)


# -------------------------------------------------------------------- status


@dataclass(frozen=True)
class Observation:
    """What the controller saw when it tried to converge (inputs to the status)."""

    isvc: Mapping[str, Any] | None = None
    crd_missing: bool = False
    write_error: str = ""  # the API server rejected our InferenceService (message)


@dataclass(frozen=True)
class ModelStatus:
    phase: str
    url: str
    replicas: int | None
    conditions: list[Condition]
    observed_generation: int
    inference_service: str

    def as_patch(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "phase": self.phase,
            "url": self.url,
            "inferenceService": self.inference_service,
            "observedGeneration": self.observed_generation,
            "conditions": self.conditions,
        }
        if self.replicas is not None:
            status["replicas"] = self.replicas
        return status


def price_of(model: Mapping[str, Any]) -> Price:
    """The Model's price in base units; raises ``MoneyError`` naming the field."""
    pricing = _spec(model)["pricing"]
    decimals = int(pricing["decimals"])

    def units(name: str) -> int:
        return to_base_units(str(pricing[name]), decimals, field=f"spec.pricing.{name}")

    return Price(
        token=str(pricing["token"]),
        decimals=decimals,
        per_request=units("perRequest"),
        per_input_token=units("perInputToken"),
        per_output_token=units("perOutputToken"),
    )


def _isvc_readiness(isvc: Mapping[str, Any]) -> tuple[str, str, str, bool]:
    """(status, reason, message, failed) of the InferenceService as KServe reports it."""
    status = isvc.get("status") or {}
    generation = (isvc.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    ready = find_condition(status.get("conditions"), "Ready")
    failure = ((status.get("modelStatus") or {}).get("lastFailureInfo")) or {}
    failure_reason = str(failure.get("reason") or "")
    if failure_reason in FAILURE_REASONS and (ready is None or ready.get("status") != TRUE):
        return FALSE, failure_reason, str(failure.get("message") or (ready or {}).get("message") or ""), True
    if ready is None:
        return UNKNOWN, "AwaitingKServe", "KServe has not reported the InferenceService's readiness yet", False
    if generation is not None and observed is not None and int(observed) < int(generation):
        return UNKNOWN, "RollingForward", f"KServe is rolling out generation {generation} (observed {observed})", False
    reason = str(ready.get("reason") or ("InferenceServiceReady" if ready.get("status") == TRUE else "NotReady"))
    message = str(ready.get("message") or "")
    if ready.get("status") != TRUE:
        # Name the component that is not ready, as `kubectl describe isvc` would.
        for ctype in ("PredictorReady", "IngressReady"):
            cond = find_condition(status.get("conditions"), ctype)
            if cond is not None and cond.get("status") == FALSE:
                reason = str(cond.get("reason") or reason)
                message = message or f"{ctype} is False: {cond.get('message') or ''}".rstrip(": ")
                break
        failed = reason in FAILURE_REASONS
        return str(ready.get("status")), reason, message, failed
    return TRUE, reason, message or "InferenceService is ready", False


def _replicas(isvc: Mapping[str, Any]) -> int | None:
    copies = ((isvc.get("status") or {}).get("modelStatus") or {}).get("copies") or {}
    total = copies.get("totalCopies")
    return int(total) if isinstance(total, int) else None


def model_status(model: Mapping[str, Any], seen: Observation, now: str) -> ModelStatus:
    """Phase, url, replicas and conditions of a Model, from what was observed."""
    meta = model["metadata"]
    generation = int(meta.get("generation") or 0)
    old = model.get("status") or {}
    conds: list[Condition] = []

    try:
        price = price_of(model)
        free = price.per_request == price.per_input_token == price.per_output_token == 0
        conds.append(
            condition(
                "Priced",
                True,
                "Free" if free else "PriceValid",
                "every request is free"
                if free
                else f"{price.per_request} per request + {price.per_input_token} per input token + "
                f"{price.per_output_token} per output token (base units of {price.token})",
                generation=generation,
                now=now,
            )
        )
        priced = True
    except MoneyError as exc:
        conds.append(condition("Priced", False, "InvalidPrice", str(exc), generation=generation, now=now))
        priced = False

    url = ""
    replicas: int | None = None
    was_serving = old.get("phase") in ("Ready", "Degraded")
    if seen.crd_missing:
        isvc_cond = condition(
            "InferenceServiceReady",
            False,
            "InferenceServiceCRDMissing",
            f"the {ISVC_PLURAL}.{ISVC_GROUP} CRD ({ISVC_API_VERSION}) is not installed: install KServe",
            generation=generation,
            now=now,
        )
        phase = "Pending"
    elif seen.write_error:
        isvc_cond = condition(
            "InferenceServiceReady", False, "InferenceServiceRejected", seen.write_error, generation=generation, now=now
        )
        phase = "Failed"
    elif seen.isvc is None:
        isvc_cond = condition(
            "InferenceServiceReady",
            UNKNOWN,
            "Creating",
            "creating the InferenceService",
            generation=generation,
            now=now,
        )
        phase = "Pending"
    else:
        status, reason, message, failed = _isvc_readiness(seen.isvc)
        isvc_cond = condition("InferenceServiceReady", status, reason, message, generation=generation, now=now)
        url = str((seen.isvc.get("status") or {}).get("url") or "")
        replicas = _replicas(seen.isvc)
        if status == TRUE:
            phase = "Ready"
        elif failed:
            phase = "Degraded" if url and was_serving else "Failed"
        elif status == FALSE and was_serving:
            phase = "Degraded"
        else:
            phase = "Deploying"
    conds.append(isvc_cond)

    if not priced:
        ready = condition("Ready", False, "InvalidPrice", "the price is invalid", generation=generation, now=now)
        phase = "Failed"
    elif isvc_cond["status"] == TRUE:
        ready = condition(
            "Ready", True, "Ready", f"serving at {url}" if url else "serving", generation=generation, now=now
        )
    else:
        ready = condition(
            "Ready",
            isvc_cond["status"],
            isvc_cond["reason"],
            isvc_cond["message"],
            generation=generation,
            now=now,
        )
    conds.insert(0, ready)
    scaling = scaling_condition(model, generation, now)
    if scaling is not None:
        conds.append(scaling)

    return ModelStatus(
        phase=phase,
        url=url,
        replicas=replicas,
        conditions=merge_conditions(old.get("conditions"), conds),
        observed_generation=generation,
        inference_service=str(meta["name"]),
    )


def scaling_condition(model: Mapping[str, Any], generation: int, now: str) -> Condition | None:
    """``ScalingSupported``: False while the Model asks for scaling KServe would ignore; present
    only once it was False (then True after the fix), so a healthy Model does not carry it."""
    warning = scaling_plan(model).warning
    if warning:
        return condition("ScalingSupported", False, "MetricNotSupported", warning, generation=generation, now=now)
    if find_condition((model.get("status") or {}).get("conditions"), "ScalingSupported") is None:
        return None
    return condition(
        "ScalingSupported", True, "Supported", "KServe can scale on scaling.metric", generation=generation, now=now
    )


def status_changed(model: Mapping[str, Any], new: ModelStatus) -> bool:
    old = model.get("status") or {}
    patch = new.as_patch()
    return any(old.get(k) != v for k, v in patch.items())


# --------------------------------------------------------------------- route


def model_route(model: Mapping[str, Any], url: str) -> ModelRoute:
    """The gateway's routing record; raises ``MoneyError`` when the price is invalid."""
    meta = model["metadata"]
    spec = _spec(model)
    return ModelRoute(
        model=object_ref(meta["namespace"], meta["name"]),
        url=url,
        protocol=str(spec["protocol"]),
        price=price_of(model),
        owner=str(spec.get("owner", "")).lower(),
        contributors=tuple(
            Contributor(account=str(c["account"]).lower(), share_bps=int(c["shareBps"]), role=str(c["role"]))
            for c in spec.get("contributors") or ()
        ),
        generation=int(meta.get("generation") or 0),
    )


def with_finalizer(model: Mapping[str, Any]) -> list[str] | None:
    """The finalizer list to write when ours is missing (``None``: nothing to do)."""
    finalizers = list((model.get("metadata") or {}).get("finalizers") or [])
    if FINALIZER in finalizers:
        return None
    return [*finalizers, FINALIZER]


def without_finalizer(model: Mapping[str, Any]) -> list[str] | None:
    finalizers = list((model.get("metadata") or {}).get("finalizers") or [])
    if FINALIZER not in finalizers:
        return None
    return [f for f in finalizers if f != FINALIZER]


def deep_copy(obj: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(obj))
