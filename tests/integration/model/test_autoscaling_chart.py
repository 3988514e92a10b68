"""The chart's autoscaling options: a KEDA ScaledObject for the ledger worker (consumer-group lag
of the usage stream) and for the gateway (in-flight requests per pod + CPU). Each option renders
objects the API server accepts against the real KEDA CRDs (server-side dry run, strict fields),
with the Redis TLS/auth settings of the chart's Redis values."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from openledger.local.platform import LocalPlatform, shared_crd_dir

from .test_chart import CHART, KUBE_VERSION, helm, objects, render

WORKER = "ol-openledger-ledger-worker"
GATEWAY = "ol-openledger-gateway"
PROM = "http://prometheus-operated.monitoring.svc:9090"
# Trigger metadata the scalers read (kedacore/keda 8b4f083, pkg/scalers/redis_streams_scaler.go,
# redis_scaler.go, prometheus_scaler.go): KEDA stores metadata as free strings, so the API
# server cannot catch a misspelt key; this does.
REDIS_STREAMS_KEYS = {
    "address", "addresses", "host", "hosts", "port", "ports", "username", "databaseIndex", "enableTLS", "unsafeSsl",
    "stream", "consumerGroup", "lagCount", "activationLagCount", "pendingEntriesCount", "streamLength",
}  # fmt: skip
PROMETHEUS_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "ignoreNullValues"}
TLS_URL = "rediss://openledger@redis.data:6380/2?ssl_ca_certs=/etc/openledger/redis-tls/ca.crt"

OPTIONS: dict[str, tuple[str, ...]] = {
    "worker-plain-redis": ("ledgerWorker.autoscaling.enabled=true",),
    "worker-tls-acl-password": (
        "ledgerWorker.autoscaling.enabled=true",
        f"redis.url={TLS_URL}",
        "redis.tls.caSecret.name=redis-ca",
        "redis.tls.clientSecret.name=redis-client",
        "ledgerWorker.autoscaling.redis.passwordSecret.name=redis-auth",
    ),
    "worker-url-in-secret": (
        "ledgerWorker.autoscaling.enabled=true",
        "ledgerWorker.autoscaling.minReplicas=0",
        "redis.existingSecret.name=redis-auth",
        "ledgerWorker.autoscaling.redis.address=redis.data:6379",
        "ledgerWorker.autoscaling.redis.username=openledger",
        "ledgerWorker.autoscaling.redis.passwordSecret.name=redis-auth",
    ),
    "gateway-inflight": (
        "gateway.autoscaling.inflight.enabled=true",
        f"gateway.autoscaling.inflight.serverAddress={PROM}",
    ),
}


@pytest.fixture(scope="module")
def keda_crds() -> Path:
    found = shared_crd_dir()
    if found is None or not (found / "keda").is_dir():
        pytest.skip("../shared/third_party/crds/keda is absent: the real KEDA CRDs are needed to validate against")
    return found


def kinds(sets: tuple[str, ...]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects(render(*sets))}


def trigger(obj: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [t for t in obj["spec"]["triggers"] if t["name"] == name]
    return found


@pytest.mark.parametrize("sets", OPTIONS.values(), ids=OPTIONS.keys())
def test_each_autoscaling_option_is_accepted_by_the_api_server(
    local_platform: LocalPlatform, keda_crds: Path, sets: tuple[str, ...]
) -> None:
    namespace = f"ol-scale-{secrets.token_hex(3)}"
    local_platform.kubectl("create", "namespace", namespace)
    text = render(*sets, namespace=namespace)
    assert "kind: ScaledObject" in text
    result = local_platform.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=text, check=False
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scaledobject.keda.sh/" in result.stdout and "created (server dry run)" in result.stdout


def test_no_scaled_object_by_default_and_the_cpu_hpa_stays() -> None:
    rendered = kinds(())
    assert not [k for k in rendered if k[0] in ("ScaledObject", "TriggerAuthentication")]
    assert ("HorizontalPodAutoscaler", GATEWAY) in rendered


def test_worker_scales_on_the_usage_streams_consumer_group_lag() -> None:
    rendered = kinds(OPTIONS["worker-plain-redis"] + ("usageStream=custom:usage",))
    scaled = rendered[("ScaledObject", WORKER)]
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 8)
    assert scaled["spec"]["cooldownPeriod"] == 300
    lag = trigger(scaled, "usage-stream-lag")
    assert lag["type"] == "redis-streams"
    assert set(lag["metadata"]) <= REDIS_STREAMS_KEYS
    assert lag["metadata"] == {
        "address": "redis:6379",  # from the default redis.url redis://redis:6379/0
        "stream": "custom:usage",
        "consumerGroup": "ledger",
        "lagCount": "5000",
        "activationLagCount": "0",
        "databaseIndex": "0",
        "enableTLS": "false",
    }
    assert "authenticationRef" not in lag  # no password, no TLS files: nothing to authenticate with
    assert ("TriggerAuthentication", f"{WORKER}-redis") not in rendered


def test_worker_trigger_follows_the_redis_tls_and_acl_values() -> None:
    rendered = kinds(OPTIONS["worker-tls-acl-password"])
    lag = trigger(rendered[("ScaledObject", WORKER)], "usage-stream-lag")
    meta = lag["metadata"]
    assert (meta["address"], meta["databaseIndex"], meta["enableTLS"], meta["username"]) == (
        "redis.data:6380",
        "2",
        "true",
        "openledger",
    )
    assert "password" not in meta and "passwordFromEnv" not in meta  # never a secret in plain metadata
    assert lag["authenticationRef"] == {"name": f"{WORKER}-redis"}
    auth = rendered[("TriggerAuthentication", f"{WORKER}-redis")]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": ("redis-auth", "redis-password"),
        "ca": ("redis-ca", "ca.crt"),
        "cert": ("redis-client", "tls.crt"),
        "key": ("redis-client", "tls.key"),
    }


def test_worker_with_the_redis_url_in_a_secret_needs_an_address() -> None:
    args = ["template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}"]
    for item in ("ledgerWorker.autoscaling.enabled=true", "redis.existingSecret.name=redis-auth"):
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0 and "ledgerWorker.autoscaling.redis.address" in result.stderr, result.stderr
    lag = trigger(kinds(OPTIONS["worker-url-in-secret"])[("ScaledObject", WORKER)], "usage-stream-lag")
    assert (lag["metadata"]["address"], lag["metadata"]["username"]) == ("redis.data:6379", "openledger")


def test_keda_owns_the_worker_replicas_when_enabled() -> None:
    """helm upgrade must not reset what KEDA scaled: the chart sets no replicas then."""
    with_keda = kinds(OPTIONS["worker-plain-redis"])[("Deployment", WORKER)]
    without = kinds(())[("Deployment", WORKER)]
    assert "replicas" not in with_keda["spec"]
    assert without["spec"]["replicas"] == 2


def test_gateway_scales_on_in_flight_requests_per_pod_and_cpu_instead_of_the_hpa() -> None:
    rendered = kinds(OPTIONS["gateway-inflight"])
    assert ("HorizontalPodAutoscaler", GATEWAY) not in rendered  # two HPAs on one Deployment would fight
    scaled = rendered[("ScaledObject", GATEWAY)]
    assert scaled["spec"]["scaleTargetRef"]["name"] == GATEWAY
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 10)
    inflight = trigger(scaled, "inflight-requests")
    assert inflight["type"] == "prometheus" and set(inflight["metadata"]) <= PROMETHEUS_KEYS
    assert inflight["metadata"] == {
        "serverAddress": PROM,
        "query": 'sum(openledger_gateway_inflight_requests{namespace="openledger", service="ol-openledger-gateway"})'
        " or vector(0)",
        "threshold": "64",
    }
    cpu = trigger(scaled, "cpu")
    assert (cpu["type"], cpu["metricType"], cpu["metadata"]) == ("cpu", "Utilization", {"value": "70"})
    assert "replicas" not in rendered[("Deployment", GATEWAY)]["spec"]


def test_gateway_inflight_needs_a_prometheus_and_accepts_a_query() -> None:
    args = [
        "template",
        "ol",
        str(CHART),
        f"--kube-version={KUBE_VERSION}",
        "--set",
        "gateway.autoscaling.inflight.enabled=true",
    ]
    result = helm(*args, check=False)
    assert result.returncode != 0 and "gateway.autoscaling.inflight.serverAddress" in result.stderr, result.stderr
    query = 'sum(openledger_gateway_inflight_requests{job="gw"})'
    scaled = kinds((*OPTIONS["gateway-inflight"], f"gateway.autoscaling.inflight.query={query}"))[
        ("ScaledObject", GATEWAY)
    ]
    assert trigger(scaled, "inflight-requests")["metadata"]["query"] == query


@pytest.mark.parametrize(
    "bad",
    [
        "ledgerWorker.autoscaling.lagCount=0",
        "ledgerWorker.autoscaling.redis.address=redis",  # no port
        "ledgerWorker.autoscaling.lagcount=5",  # typo
        "gateway.autoscaling.inflight.serverAddress=prometheus:9090",  # no scheme
    ],
)
def test_values_schema_refuses_bad_autoscaling_values(bad: str) -> None:
    result = helm("template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--set", bad, check=False)
    assert result.returncode != 0 and "schema" in result.stderr, result.stderr
