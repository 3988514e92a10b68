"""The chart's `helm test` pods and shared templates, and `openledger check gateway` against a real gateway.

No node needed (no ``cluster`` fixture): the chart is rendered with ``helm template``, and the
gateway check runs against a real gateway process and a private redis-server that is stopped
mid-test. The same pods run on the node in test_installed_product.py (``helm test``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.deploy import gateway_problem
from openledger.local.processes import stop_pid
from openledger.local.toolchain import KUBERNETES_VERSION, helm_binary
from tests.integration.gateway.conftest import GatewayProcess, redis_server

CHART = Path(__file__).resolve().parents[3] / "charts" / "openledger"
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


def _render(*sets: str) -> list[dict[str, Any]]:
    args = [
        str(helm_binary()),
        "template",
        "ol",
        str(CHART),
        "-n",
        "ol-sys",
        f"--kube-version={KUBERNETES_VERSION.lstrip('v')}",
    ]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _named(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]
    if obj["kind"] in ("Deployment", "Job"):
        spec = spec["template"]["spec"]
    return spec


@pytest.mark.parametrize(
    ("readyz", "lookup", "problem"),
    [
        (200, 401, ""),
        (200, 503, "cannot read its Redis"),
        (200, 200, "got 200, not 401"),
        (503, 401, "/readyz answered 503"),
    ],
)
def test_the_gateway_check_wants_ready_and_a_401_for_an_unknown_key(readyz: int, lookup: int, problem: str) -> None:
    verdict = gateway_problem(readyz, lookup)
    assert (problem in verdict and bool(verdict)) if problem else verdict == ""


def test_the_gateway_check_passes_on_a_working_gateway_and_fails_once_its_redis_is_gone(tmp_path: Path) -> None:
    redis_process, port = redis_server("check-redis", tmp_path)
    gateway = GatewayProcess({"REDIS_URL": f"redis://127.0.0.1:{port}/0", "OPENLEDGER_LOG_LEVEL": "WARNING"}, tmp_path)
    gateway.start()
    try:
        ok = _check_gateway(gateway.url)
        assert ok.returncode == 0 and "an unknown key got 401" in ok.stdout, ok.stderr
        stop_pid(redis_process.pid)
        # /readyz still says 200 (the process serves HTTP): only the key lookup shows Redis is gone.
        failed = _check_gateway(gateway.url)
        assert failed.returncode == 1, failed.stdout
        assert "got 503: the gateway cannot read its Redis" in failed.stderr, failed.stderr
    finally:
        gateway.stop()
        stop_pid(redis_process.pid)
    unreachable = _check_gateway(gateway.url)  # nothing listens: fails too, naming the URL
    assert unreachable.returncode == 1 and f"gateway {gateway.url}" in unreachable.stderr


def _check_gateway(url: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "openledger.cli", "check", "gateway", url, "--timeout", "5"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_helm_test_pods_run_under_their_own_account_that_may_only_get_the_lease() -> None:
    objs = _render()
    pods = {n: o for n, o in _named(objs, "Pod").items() if "-test-" in n}
    assert set(pods) == {f"ol-openledger-test-{c}" for c in ("gateway", "leader", "database", "redis")}
    account = "ol-openledger-test"
    assert _named(objs, "ServiceAccount")[account]["automountServiceAccountToken"] is False
    for name, pod in pods.items():
        assert pod["spec"]["serviceAccountName"] == account, name
        # Only the leader check holds a token (it reads the Lease); the others need none.
        assert pod["spec"]["automountServiceAccountToken"] is name.endswith("-leader"), name
    role = _named(objs, "Role")[account]
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["ol-openledger-operator"],
            "verbs": ["get"],
        }
    ]
    binding = _named(objs, "RoleBinding")[account]
    assert binding["roleRef"]["name"] == account
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ol-sys"}]
    operator_role = _named(objs, "Role")["ol-openledger-operator-leader-election"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": "ol-sys"} not in _named(objs, "RoleBinding")[
        operator_role["metadata"]["name"]
    ]["subjects"]


def test_no_rbac_for_the_test_account_when_rbac_is_off_and_no_test_objects_when_tests_are_off() -> None:
    assert "ol-openledger-test" not in _named(_render("rbac.create=false"), "Role")
    objs = _render("tests.enabled=false")
    assert not [o for o in objs if o["metadata"]["name"].startswith("ol-openledger-test")]


def test_every_pod_of_the_chart_gets_the_one_security_context() -> None:
    objs = _render()
    workloads = [o for o in objs if o["kind"] in ("Deployment", "Job", "Pod")]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in workloads}
    assert {("Deployment", "ol-openledger-gateway"), ("Deployment", "ol-openledger-operator")} <= kinds, kinds
    for obj in workloads:
        spec = _pod_spec(obj)
        assert spec["securityContext"] == POD_SECURITY, obj["metadata"]["name"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert container["securityContext"] == CONTAINER_SECURITY, (obj["metadata"]["name"], container["name"])
    templates = "\n".join(p.read_text() for p in (CHART / "templates").rglob("*.yaml"))
    assert "runAsUser" not in templates and "drop:" not in templates  # only in _helpers.tpl


@pytest.mark.parametrize("autoscaling", [False, True])
def test_the_ledger_worker_leaves_replicas_to_its_autoscaler(autoscaling: bool) -> None:
    objs = _render(f"ledgerWorker.autoscaling.enabled={str(autoscaling).lower()}", "ledgerWorker.replicas=3")
    spec = _named(objs, "Deployment")["ol-openledger-ledger-worker"]["spec"]
    assert ("replicas" in spec) is not autoscaling
    if not autoscaling:
        assert spec["replicas"] == 3
