"""A real KEDA (v2.21.0, built from its Go module) on the local platform, no node needed.

KEDA's operator and metrics adapter run as host processes (``openledger.local.keda``); the
API server's aggregation layer serves ``external.metrics.k8s.io`` from the adapter. The chart's
ledger-worker ScaledObject is applied as rendered: the operator makes its HPA, and the external
metric the HPA reads is the usage stream's consumer-group lag in the platform's real Redis —
it grows when events are added and drops when a consumer reads and acknowledges them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from openledger.local import keda
from openledger.local.platform import LocalPlatform
from openledger.local.processes import ComponentError, free_port
from openledger.wire import USAGE_CONSUMER_GROUP
from tests.integration.ledger.conftest import make_event
from tests.integration.model.test_chart import objects, render
from tests.waiting import wait_for

WORKER = "ol-openledger-ledger-worker"
LAG_COUNT = 5


@pytest.fixture(scope="module")
def keda_server(local_platform: LocalPlatform, kubeconfig: Path, redis_url: str) -> Iterator[keda.KedaServer]:
    server = keda.start_keda(local_platform)
    try:
        yield server
    finally:
        keda.stop_keda(local_platform)


def apply_worker(platform: LocalPlatform, redis_url: str, stream: str, *extra: str) -> tuple[str, dict[str, Any]]:
    """The chart's worker Deployment and ScaledObject, as rendered, in a fresh namespace."""
    namespace = f"ol-keda-{secrets.token_hex(3)}"
    platform.kubectl("create", "namespace", namespace)
    sets = (
        "ledgerWorker.autoscaling.enabled=true",
        "ledgerWorker.autoscaling.minReplicas=1",
        "ledgerWorker.autoscaling.maxReplicas=3",
        f"ledgerWorker.autoscaling.lagCount={LAG_COUNT}",
        "ledgerWorker.autoscaling.pollingInterval=1",
        "ledgerWorker.autoscaling.cooldownPeriod=5",
        f"redis.url={redis_url}",
        f"usageStream={stream}",
        *extra,
    )
    wanted = {("Deployment", WORKER), ("ScaledObject", WORKER)}
    picked = [o for o in objects(render(*sets, namespace=namespace)) if (o["kind"], o["metadata"]["name"]) in wanted]
    assert len(picked) == 2, [o["kind"] for o in picked]
    [deployment] = [o for o in picked if o["kind"] == "Deployment"]
    [scaled] = [o for o in picked if o["kind"] == "ScaledObject"]
    # KEDA resolves the scale target's environment, its Secrets included, as an install has them.
    items = picked + [secret(name, keys) for name, keys in secret_refs(deployment).items()]
    platform.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps({"kind": "List", "apiVersion": "v1", "items": items})
    )
    return namespace, scaled


def secret_refs(deployment: dict[str, Any]) -> dict[str, set[str]]:
    """Secret name → keys the Deployment's containers read into their environment."""
    refs: dict[str, set[str]] = {}
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(ref["name"], set()).add(ref["key"])
    return refs


def secret(name: str, keys: set[str]) -> dict[str, Any]:
    data = dict.fromkeys(keys, "unused-by-this-test")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def scaled_object(platform: LocalPlatform, namespace: str) -> dict[str, Any]:
    return dict(json.loads(platform.kubectl("get", "scaledobject", WORKER, "-n", namespace, "-o", "json").stdout))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The condition ``kind`` once KEDA has decided it ({} while absent or Unknown)."""
    found: dict[str, Any] = next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == kind), {})
    return found if found.get("status") in ("True", "False") else {}


def metric_name(platform: LocalPlatform, namespace: str) -> str:
    names = wait_for(
        lambda: scaled_object(platform, namespace).get("status", {}).get("externalMetricNames"),
        60,
        "KEDA to record the ScaledObject's external metric",
        interval_s=0.5,
    )
    [name] = names
    return str(name)


def expected_metric(stream: str) -> str:
    """KEDA's name for the first trigger's metric (pkg/scalers: s<index>-redis-streams-<stream>, normalized)."""
    return "s0-redis-streams-" + stream.replace(":", "-").replace(".", "-").replace("/", "-")


def lag(platform: LocalPlatform, namespace: str, metric: str) -> Decimal:
    return keda.external_metric(platform, namespace, metric, WORKER)


def wait_lag(platform: LocalPlatform, namespace: str, metric: str, expected: int) -> None:
    wait_for(lambda: lag(platform, namespace, metric) == expected, 30, f"the external metric to be {expected}", 0.5)


@pytest.fixture(scope="module")
def worker(keda_server: keda.KedaServer, local_platform: LocalPlatform, redis_url: str) -> tuple[str, str, str]:
    """(namespace, stream, metric name) of the chart's worker ScaledObject, once KEDA made its HPA."""
    stream = f"ol-keda-{secrets.token_hex(4)}:usage"
    namespace, _ = apply_worker(local_platform, redis_url, stream)
    return namespace, stream, metric_name(local_platform, namespace)


def test_keda_makes_the_hpa_for_the_chart_worker_scaled_object(
    local_platform: LocalPlatform, worker: tuple[str, str, str]
) -> None:
    namespace, stream, metric = worker
    assert metric == expected_metric(stream)
    hpa = wait_for(
        lambda: local_platform.kubectl("get", "hpa", f"keda-hpa-{WORKER}", "-n", namespace, "-o", "json", check=False),
        60,
        "KEDA to make the worker's HPA",
        interval_s=0.5,
    )
    assert hpa.returncode == 0, hpa.stderr
    spec = json.loads(hpa.stdout)["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 3)
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 5
    [external] = [m["external"] for m in spec["metrics"]]
    assert external["metric"] == {
        "name": metric,
        "selector": {"matchLabels": {"scaledobject.keda.sh/name": WORKER}},
    }
    assert external["target"] == {"type": "AverageValue", "averageValue": str(LAG_COUNT)}
    ready = wait_for(lambda: condition(scaled_object(local_platform, namespace), "Ready"), 30, "Ready", 0.5)
    assert ready["status"] == "True", ready


def test_the_external_metric_is_the_usage_streams_consumer_group_lag(
    local_platform: LocalPlatform, redis_url: str, worker: tuple[str, str, str]
) -> None:
    namespace, stream, metric = worker
    client = redis.Redis.from_url(redis_url)
    assert lag(local_platform, namespace, metric) == 0  # no stream yet: nothing to do
    client.xgroup_create(stream, USAGE_CONSUMER_GROUP, id="0", mkstream=True)
    for i in range(12):
        client.xadd(stream, make_event(i).to_entry())  # type: ignore[arg-type]
    wait_lag(local_platform, namespace, metric, 12)
    for i in range(12, 20):
        client.xadd(stream, make_event(i).to_entry())  # type: ignore[arg-type]
    wait_lag(local_platform, namespace, metric, 20)
    read_and_ack(client, stream, 15)
    wait_lag(local_platform, namespace, metric, 5)
    read_and_ack(client, stream, 100)
    wait_lag(local_platform, namespace, metric, 0)
    assert client.xlen(stream) == 20  # acknowledged, not trimmed: the lag is the group's, not the length


def test_only_callers_allowed_by_rbac_read_external_metrics(
    local_platform: LocalPlatform, worker: tuple[str, str, str]
) -> None:
    """The API server passes the caller to the adapter (front-proxy headers), which asks RBAC:
    the HPA controller's service account may read, another may not."""
    namespace, _, metric = worker
    path = keda.metric_path(namespace, metric, WORKER)
    hpa = local_platform.kubectl(
        "get", "--raw", path, "--as=system:serviceaccount:kube-system:horizontal-pod-autoscaler"
    )
    assert json.loads(hpa.stdout)["kind"] == "ExternalMetricValueList"
    nobody = local_platform.kubectl("get", "--raw", path, f"--as=system:serviceaccount:{namespace}:nobody", check=False)
    assert nobody.returncode != 0 and "forbidden" in nobody.stderr.lower(), nobody.stderr


def read_and_ack(client: redis.Redis, stream: str, count: int) -> None:
    reply: list[Any] = client.xreadgroup(USAGE_CONSUMER_GROUP, "test-consumer", {stream: ">"}, count=count)  # type: ignore[assignment]
    ids = [entry_id for _, entries in reply for entry_id, _ in entries]
    assert ids
    client.xack(stream, USAGE_CONSUMER_GROUP, *ids)


def test_an_unreachable_redis_is_an_error_not_a_zero_lag(
    keda_server: keda.KedaServer, local_platform: LocalPlatform
) -> None:
    """A zero would let the HPA scale the worker down while the stream is unread."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    namespace, _ = apply_worker(local_platform, nowhere, "ol-keda-nowhere:usage")
    ready = wait_for(lambda: condition(scaled_object(local_platform, namespace), "Ready"), 60, "Ready", 0.5)
    assert ready["status"] == "False", ready
    with pytest.raises(keda.ExternalMetricError, match=r"connection to redis failed.*connection refused"):
        lag(local_platform, namespace, expected_metric("ol-keda-nowhere:usage"))


def test_keda_stops_without_breaking_discovery_and_starts_again(
    keda_server: keda.KedaServer, local_platform: LocalPlatform, worker: tuple[str, str, str]
) -> None:
    namespace, _, metric = worker
    keda.stop_keda(local_platform)
    assert not keda_server.operator.alive() and not keda_server.adapter.alive()
    gone = local_platform.kubectl("get", "apiservice", keda.API_SERVICE, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    # An APIService left behind without its server makes discovery fail: helm would refuse to install.
    discovery = local_platform.kubectl("api-resources", check=False)
    assert discovery.returncode == 0 and "external.metrics" not in discovery.stderr, discovery.stderr
    again = keda.start_keda(local_platform)
    assert (again.adapter_port, again.grpc_port) == (keda_server.adapter_port, keda_server.grpc_port)
    wait_lag(local_platform, namespace, metric, 0)


def test_keda_needs_the_platforms_api_server(tmp_path: Path) -> None:
    bare = LocalPlatform(tmp_path, detached=False, components=[])
    with pytest.raises(ComponentError, match="KEDA needs the platform's kube-apiserver"):
        keda.start_keda(bare)
    assert bare.processes == {}
