"""The gateway in the Helm chart: Deployment, Service and HPA render, are hardened and accepted by the API server."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.gateway.journal import STOP_WAIT_S
from openledger.local.platform import LocalPlatform
from openledger.local.toolchain import KUBERNETES_VERSION, helm_binary

CHART = Path(__file__).resolve().parents[3] / "charts" / "openledger"


def _render(*sets: str, namespace: str = "openledger") -> list[dict[str, Any]]:
    args = [
        str(helm_binary()),
        "template",
        "ol",
        str(CHART),
        "-n",
        namespace,
        f"--kube-version={KUBERNETES_VERSION.lstrip('v')}",
    ]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _gateway(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith("-gateway")]


def test_gateway_deployment_service_and_hpa_are_hardened() -> None:
    objs = _render()
    [deployment], [service], [hpa] = (_gateway(objs, k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler"))
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert container["args"] == ["gateway"] and container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPENLEDGER_REDIS_URL"] == "redis://redis:6379/0" and env["OPENLEDGER_GATEWAY_RETRY_RATIO"] == "0.1"
    assert env["OPENLEDGER_GATEWAY_CONNECT_RETRY_S"] == "3"
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}


def test_gateway_can_be_disabled_or_fixed_size() -> None:
    assert not _gateway(_render("gateway.enabled=false"), "Deployment")
    objs = _render("gateway.autoscaling.enabled=false", "gateway.replicas=3")
    assert _gateway(objs, "Deployment")[0]["spec"]["replicas"] == 3 and not _gateway(objs, "HorizontalPodAutoscaler")


def test_rendered_gateway_is_accepted_by_the_api_server(local_platform: LocalPlatform) -> None:
    namespace = f"ol-gwchart-{secrets.token_hex(3)}"
    local_platform.kubectl("create", "namespace", namespace)
    text = yaml.safe_dump_all([o for o in _render(namespace=namespace) if o["metadata"]["name"].endswith("-gateway")])
    result = local_platform.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
    assert result.returncode == 0, result.stderr
    assert "horizontalpodautoscaler.autoscaling/ol-openledger-gateway created (server dry run)" in result.stdout


def test_rollouts_drain_then_let_requests_in_flight_finish_and_be_metered() -> None:
    [deployment] = _gateway(_render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    upstream_s, shutdown_s = (
        int(env["OPENLEDGER_GATEWAY_UPSTREAM_TIMEOUT_S"]),
        int(env["OPENLEDGER_GATEWAY_SHUTDOWN_TIMEOUT_S"]),
    )
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 1 and shutdown_s > upstream_s
    settle_wait_s = (
        5 * int(env["OPENLEDGER_GATEWAY_REDIS_TIMEOUT_S"])
        + int(env["OPENLEDGER_GATEWAY_DURABILITY_TIMEOUT_MS"]) // 1000
    )
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + shutdown_s + settle_wait_s + STOP_WAIT_S
    assert env["OPENLEDGER_GATEWAY_DURABILITY"] == "aof"
    custom = _render("gateway.upstreamTimeoutSeconds=600", "gateway.preStopSleepSeconds=0")
    [deployment] = _gateway(custom, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["OPENLEDGER_GATEWAY_SHUTDOWN_TIMEOUT_S"]) > 600 and "lifecycle" not in container
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 600


def test_a_shutdown_shorter_than_the_upstream_timeout_is_refused() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _render("gateway.shutdownTimeoutSeconds=30")
    assert "gateway.shutdownTimeoutSeconds (30) must exceed gateway.upstreamTimeoutSeconds (60)" in failed.value.stderr


def test_durability_policy_is_validated_by_the_schema() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _render("gateway.durability.policy=fsync")
    assert "durability" in failed.value.stderr
