"""The product on the node: ``make image``'s image in containerd, then ``helm install`` of the chart.

Values are generated for this cluster (the image just built, ``pullPolicy:
Never``, the platform's Redis and PostgreSQL through their in-cluster Service
names, requests small enough for a two-CPU node) and written to
``<base>/node/values.json``; only keys the chart's ``values.schema.json``
knows are set, so the chart stays the one source of truth for its values.
URLs reach the chart through Secrets this module creates, never as plain
values.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from openledger.local import node, toolchain
from openledger.local.cluster import PRODUCT_NAMESPACE, RELEASE, in_cluster_url
from openledger.local.platform import PROJECT_ROOT, LocalPlatform
from openledger.local.processes import ComponentError

CHART = PROJECT_ROOT / "charts" / "openledger"
DATABASE_SECRET = "openledger-database"
REDIS_SECRET = "openledger-redis"


def _schema_properties() -> dict[str, object]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return dict(schema.get("properties", {}))


def chart_values(repository: str, tag: str, secrets_known: dict[str, bool]) -> dict[str, object]:
    """Values for this cluster; ``secrets_known`` says which of database/redis the chart reads from a Secret."""
    values: dict[str, object] = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"resources": {"requests": {"cpu": "50m", "memory": "128Mi"}}},
        "gateway": {
            "replicas": 2,
            "autoscaling": {"enabled": False},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        },
    }
    if secrets_known.get("redis"):
        values["redis"] = {"url": "", "existingSecret": {"name": REDIS_SECRET, "key": "redis-url"}}
    if secrets_known.get("database"):
        values["database"] = {"existingSecret": {"name": DATABASE_SECRET, "key": "database-url"}}
    return values


def _secret(name: str, key: str, value: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": PRODUCT_NAMESPACE},
        "type": "Opaque",
        "stringData": {key: value},
    }


def helm(platform: LocalPlatform, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(toolchain.helm_binary()), f"--kubeconfig={platform.endpoints.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        raise ComponentError(f"helm {' '.join(args[:2])} failed:\n{result.stderr[-4000:]}")
    return result


def install_product(platform: LocalPlatform) -> dict[str, float]:
    """Build/import the image, create the Secrets, ``helm upgrade --install``; returns step timings."""
    from openledger.local import image

    timings: dict[str, float] = {}
    started = time.monotonic()
    built = image.build()
    timings["image (make image, cached by its inputs)"] = time.monotonic() - started
    started = time.monotonic()
    node.import_image(platform.base_dir, built.archive, built.keyed_reference)
    timings["image import"] = time.monotonic() - started
    properties = _schema_properties()
    known = {"database": "database" in properties, "redis": "redis" in properties}
    node.apply(
        platform.kubectl,
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PRODUCT_NAMESPACE}},
            _secret(DATABASE_SECRET, "database-url", in_cluster_url(platform, "postgres")),
            _secret(REDIS_SECRET, "redis-url", in_cluster_url(platform, "redis")),
        ],
    )
    repository, tag = built.keyed_reference.rsplit(":", 1)
    values_path = node.node_dir(platform.base_dir) / "values.json"
    values_path.write_text(json.dumps(chart_values(repository, tag, known), indent=2))
    started, started_at = time.monotonic(), time.time() - 1
    helm(
        platform,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        PRODUCT_NAMESPACE,
        "--values",
        str(values_path),
        "--timeout",
        "10m",
    )
    wait_release_ready(platform, 600, started_at)
    timings["helm install to all pods Ready"] = time.monotonic() - started
    platform.endpoints.extra.update(product_exports(platform))
    return timings


def crash_looping(pods: dict[str, Any], since: str = "", restarts: int = 2) -> list[tuple[str, str]]:
    """(pod, container) pairs that keep failing: the install cannot succeed, so say why at once.

    ``since`` (RFC 3339, UTC): only pods made from then on count; an old revision's pods may still be failing.
    """
    found = []
    for pod in pods.get("items", []):
        if pod["metadata"].get("creationTimestamp", "") < since:
            continue
        status = pod.get("status", {})
        for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if container.get("restartCount", 0) >= restarts and waiting.get("reason") == "CrashLoopBackOff":
                found.append((pod["metadata"]["name"], container["name"]))
    return found


def wait_release_ready(platform: LocalPlatform, timeout_s: float, started_at: float) -> None:
    """Every Deployment of the release available; fails early, with the logs, when a container crash-loops."""
    selector = f"app.kubernetes.io/instance={RELEASE}"
    deadline = time.monotonic() + timeout_s
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at))
    while time.monotonic() < deadline:
        pods = json.loads(platform.kubectl("-n", PRODUCT_NAMESPACE, "get", "pods", "-l", selector, "-o", "json").stdout)
        failing = crash_looping(pods, since)
        if failing:
            pod, container = failing[0]
            log = platform.kubectl("-n", PRODUCT_NAMESPACE, "logs", pod, "-c", container, "--previous", "--tail=25",
                                   check=False)  # fmt: skip
            raise ComponentError(f"{pod}/{container} keeps crashing; its last log lines:\n{log.stdout or log.stderr}")
        deployments = json.loads(
            platform.kubectl("-n", PRODUCT_NAMESPACE, "get", "deployments", "-l", selector, "-o", "json").stdout
        )["items"]
        if deployments and all(_available(d) for d in deployments):
            return
        time.sleep(1)
    raise ComponentError(
        f"the release's pods were not Ready within {timeout_s:.0f} s:\n"
        + platform.kubectl("-n", PRODUCT_NAMESPACE, "get", "pods", "-o", "wide", check=False).stdout
    )


def _available(deployment: dict[str, Any]) -> bool:
    want = deployment["spec"].get("replicas", 1)
    status = deployment.get("status", {})
    return bool(
        status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == want
        and status.get("readyReplicas", 0) == want
        and status.get("replicas", 0) == want
    )


def product_exports(platform: LocalPlatform) -> dict[str, str]:
    """The variables ``make up`` exports for its product processes, pointing into the cluster.

    Services by their cluster IPs (kube-proxy's rules serve the host's own connections, nothing
    leaves the machine); a URL of one pod (the operator's health port has no Service) by its IP on
    the node's bridge. Metrics behind a Service answer for one replica per request.
    """
    services = {
        s["metadata"]["name"]: s
        for s in json.loads(platform.kubectl("-n", PRODUCT_NAMESPACE, "get", "services", "-o", "json").stdout)["items"]
    }

    def url(service: str, port_name: str | None = None, index: int = 0) -> str:
        spec = services[f"{RELEASE}-{service}"]["spec"]
        ports = spec["ports"]
        port = next((p for p in ports if p.get("name") == port_name), ports[index]) if port_name else ports[index]
        return f"http://{spec['clusterIP']}:{port['port']}"

    exports: dict[str, str] = {}
    if f"{RELEASE}-gateway" in services:
        exports["GATEWAY_URL"] = url("gateway", "http")
        if len(services[f"{RELEASE}-gateway"]["spec"]["ports"]) > 1:
            exports["GATEWAY_METRICS_URL"] = url("gateway", "metrics", 1) + "/metrics"
            exports["METRICS_URL"] = exports["GATEWAY_METRICS_URL"]
    if f"{RELEASE}-claims" in services:
        exports["CLAIMS_URL"] = url("claims")
    if f"{RELEASE}-operator-metrics" in services:
        exports["OPERATOR_METRICS_URL"] = url("operator-metrics") + "/metrics"
    if f"{RELEASE}-ledger-worker-metrics" in services:
        exports["LEDGER_METRICS_URL"] = url("ledger-worker-metrics") + "/metrics"
    pods = json.loads(
        platform.kubectl(
            "-n", PRODUCT_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator", "-o", "json"
        ).stdout
    )["items"]
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        ports = [
            p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") in ("health", "healthz")
        ]
        if ip and ports:
            exports["OPERATOR_HEALTH_URL"] = f"http://{ip}:{ports[0]['containerPort']}/healthz"
            break
    return exports
