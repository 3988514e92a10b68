"""The Helm chart: lints, renders objects the real API server accepts, is hardened,
and its least-privilege RBAC is enough for the operator to do its work."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.local.platform import LocalPlatform
from openledger.local.toolchain import KUBERNETES_VERSION, helm_binary

from .conftest import Kube, Launcher, model_manifest, wait_for

CHART = Path(__file__).resolve().parents[3] / "charts" / "openledger"
KUBE_VERSION = KUBERNETES_VERSION.lstrip("v")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*sets: str, namespace: str = "openledger", crds: bool = False) -> str:
    args = ["template", "ol", str(CHART), "-n", namespace, f"--kube-version={KUBE_VERSION}"]
    if crds:
        args.append("--include-crds")
    for item in sets:
        args += ["--set", item]
    return helm(*args).stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_helm_lint_is_clean() -> None:
    result = helm("lint", str(CHART), "--strict", f"--kube-version={KUBE_VERSION}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_rejects_typos_and_bad_values() -> None:
    for bad in ("operator.replica=2", "operator.logLevel=LOUD", "metrics.port=0"):
        result = helm("template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--set", bad, check=False)
        assert result.returncode != 0, bad
        assert "schema" in result.stderr, result.stderr
    # The gateway section is optional and free-form (its templates own it).
    render("gateway.replicas=2")


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("operator.watchNamespaces={ol-chart-a,ol-chart-b}", "metrics.serviceMonitor.enabled=true"),
        ("redis.existingSecret.name=redis", "operator.replicas=1", "serviceAccount.name=custom"),
    ],
    ids=["defaults", "namespaced-with-servicemonitor", "secret-redis"],
)
def test_rendered_chart_is_accepted_by_the_api_server(local_platform: LocalPlatform, sets: tuple[str, ...]) -> None:
    namespace = f"ol-chart-{secrets.token_hex(3)}"
    for ns in (namespace, "ol-chart-a", "ol-chart-b"):
        local_platform.kubectl("create", "namespace", ns, check=False)
    text = render(*sets, namespace=namespace, crds=True)
    result = local_platform.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/ol-openledger-operator created (server dry run)" in result.stdout


def test_chart_ships_the_generated_crds() -> None:
    crds = {d["metadata"]["name"] for d in objects(render(crds=True)) if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"models.openledger.io", "agents.openledger.io", "rewardpools.openledger.io"}


def test_operator_deployment_is_hardened() -> None:
    [deployment] = [
        d for d in objects(render()) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    ]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["replicas"] == 2
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENLEDGER_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert json.loads(env["OPENLEDGER_NAMESPACES"]["value"]) == []
    [service] = [
        d for d in objects(render()) if d["kind"] == "Service" and d["metadata"]["name"].endswith("-operator-metrics")
    ]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("sets", [(), ("operator.watchNamespaces={team-a}",)], ids=["cluster", "namespaced"])
def test_rbac_names_every_group_resource_and_verb(sets: tuple[str, ...]) -> None:
    for obj in objects(render(*sets)):
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in obj["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (obj["metadata"]["name"], rule)
            if "secrets" in rule["resources"]:
                assert "delete" not in rule["verbs"]


def _token_kubeconfig(local_platform: LocalPlatform, namespace: str, sa: str, path: Path) -> Path:
    token = json.loads(
        local_platform.kubectl(
            "create",
            "--raw",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
        ).stdout
    )["status"]["token"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": local_platform.endpoints.kube_url, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_charts_rbac_is_enough_for_the_operator(
    local_platform: LocalPlatform, kube: Kube, platform_env: dict[str, str], tmp_path: Path
) -> None:
    release_ns = f"ol-chart-{secrets.token_hex(3)}"
    watched = f"ol-chart-{secrets.token_hex(3)}"
    for ns in (release_ns, watched):
        local_platform.kubectl("create", "namespace", ns)
    text = render(f"operator.watchNamespaces={{{watched}}}", namespace=release_ns)
    rbac = [
        d
        for d in objects(text)
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    local_platform.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    sa = f"system:serviceaccount:{release_ns}:ol-openledger-operator"

    def can(verb: str, resource: str, ns: str) -> bool:
        return (
            local_platform.kubectl("auth", "can-i", verb, resource, "-n", ns, f"--as={sa}", check=False).stdout.strip()
            == "yes"
        )

    assert can("create", "inferenceservices.serving.kserve.io", watched)
    assert can("patch", "models.openledger.io/status", watched)
    assert not can("create", "inferenceservices.serving.kserve.io", "default"), "only the watched namespace"
    assert not can("delete", "secrets", watched)
    assert not can("create", "pods", watched)

    kubeconfig = _token_kubeconfig(local_platform, release_ns, "ol-openledger-operator", tmp_path / "sa-kubeconfig")
    launcher = Launcher({**platform_env, "KUBECONFIG": str(kubeconfig)}, tmp_path)
    try:
        launcher(namespaces=[watched], operator_namespace=release_ns, leader_lease_name="ol-openledger-operator")
        kube.create_model(model_manifest("rbac", watched))
        wait_for(lambda: kube.isvc(watched, "rbac"), 30, "the InferenceService under the chart's RBAC")
        wait_for(lambda: kube.phase(watched, "rbac") == "Deploying", 30, "the status under the chart's RBAC")
        wait_for(lambda: any(e.reason == "InferenceServiceCreated" for e in kube.events(watched, "rbac")))
        kube.delete_model(watched, "rbac")
        wait_for(lambda: kube.model(watched, "rbac") is None, 30, "the finalizer under the chart's RBAC")
    finally:
        launcher.stop_all()
