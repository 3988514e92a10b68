"""The local node is a real one: pods in their own network namespaces, Services through
kube-proxy, cluster DNS, real garbage collection, the admission plugins a strict cluster
runs, and a teardown that leaves nothing on the machine (the last test, on purpose).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import urllib.request
from typing import Any

from openledger.local import images, node
from openledger.local.cluster import PLATFORM_NAMESPACE
from openledger.local.platform import LocalPlatform
from tests.waiting import wait_for

NS = "node-test"


def _apply(cluster: LocalPlatform, *objects: dict[str, Any]) -> None:
    node.apply(cluster.kubectl, list(objects))


def _get(cluster: LocalPlatform, *args: str) -> dict[str, Any]:
    result = cluster.kubectl("-n", NS, "get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _pod(name: str, command: list[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": images.BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": command}
            ],
        },
    }


def _wait_phase(cluster: LocalPlatform, name: str, phase: str, timeout_s: float = 90) -> dict[str, Any]:
    pod: dict[str, Any] = wait_for(
        lambda: (found := _get(cluster, "pod", name)).get("status", {}).get("phase") == phase and found,
        timeout_s,
        f"pod {name} {phase}",
        0.5,
    )
    return pod


def _logs(cluster: LocalPlatform, name: str) -> str:
    return cluster.kubectl("-n", NS, "logs", name, check=False).stdout


def test_a_pod_runs_in_its_own_network_namespace_on_the_bridge(cluster: LocalPlatform) -> None:
    _apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    _apply(cluster, _pod("netns", ["/bin/sh", "-c", "readlink /proc/self/ns/net; sleep 3600"]))
    pod = _wait_phase(cluster, "netns", "Running")

    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(node.POD_SUBNET)
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    pod_netns = wait_for(lambda: _logs(cluster, "netns").strip(), 30, "the pod's log", 0.5)
    assert pod_netns.startswith("net:[")
    assert pod_netns != os.readlink("/proc/self/ns/net")


def test_services_answer_from_the_host_and_by_name_from_another_pod(cluster: LocalPlatform) -> None:
    _apply(
        cluster,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        _pod(
            "web",
            ["/bin/sh", "-c", "mkdir -p /www && echo served-by-web > /www/index.html && httpd -f -p 8080 -h /www"],
            {"app": "web"},
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    _wait_phase(cluster, "web", "Running")
    cluster_ip = _get(cluster, "service", "web")["spec"]["clusterIP"]

    def from_host() -> str:
        try:
            with urllib.request.urlopen(f"http://{cluster_ip}/", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    assert wait_for(from_host, 60, "the Service from the host", 0.5).strip() == "served-by-web"

    _apply(cluster, _pod("client", ["/bin/sh", "-c", f"wget -qO- http://web.{NS}.svc.{node.CLUSTER_DOMAIN}/"]))
    _wait_phase(cluster, "client", "Succeeded")
    assert _logs(cluster, "client").strip() == "served-by-web"


def test_pods_reach_the_platform_redis_and_postgres_by_their_service_names(cluster: LocalPlatform) -> None:
    def host(name: str) -> str:
        return f"{name}.{PLATFORM_NAMESPACE}.svc.{node.CLUSTER_DOMAIN}"

    redis, postgres = cluster.ports["redis"], cluster.ports["postgres"]
    script = (
        f"printf 'PING\\r\\n' | nc -w 3 {host('redis')} {redis} | head -c 5; echo;"
        f" nc -w 3 {host('postgres')} {postgres} </dev/null && echo postgres-accepts"
    )
    _apply(
        cluster,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        _pod("platform-probe", ["/bin/sh", "-c", script]),
    )
    _wait_phase(cluster, "platform-probe", "Succeeded")
    assert _logs(cluster, "platform-probe").split() == ["+PONG", "postgres-accepts"]


def test_garbage_collection_deletes_dependents_of_a_deleted_owner(cluster: LocalPlatform) -> None:
    _apply(
        cluster,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": NS}},
    )
    owner_uid = _get(cluster, "configmap", "owner")["metadata"]["uid"]
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    _apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dependent", "namespace": NS, "ownerReferences": [reference]},
        },
    )
    assert _get(cluster, "configmap", "dependent")

    cluster.kubectl("-n", NS, "delete", "configmap", "owner")
    wait_for(lambda: not _get(cluster, "configmap", "dependent"), 60, "the garbage collector", 0.5)


def test_block_owner_deletion_needs_update_on_the_owners_finalizers(cluster: LocalPlatform) -> None:
    """OwnerReferencesPermissionEnforcement is on: RBAC that a laxer cluster accepts is refused here."""
    _apply(
        cluster,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "guarded", "namespace": NS}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "writer", "namespace": NS}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "writer", "namespace": NS},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "delete"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "writer", "namespace": NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "writer"},
            "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": NS}],
        },
    )
    owner_uid = _get(cluster, "configmap", "guarded")["metadata"]["uid"]
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "guarded",
        "uid": owner_uid,
        "blockOwnerDeletion": True,
    }
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "child", "namespace": NS, "ownerReferences": [reference]},
    }
    refused = cluster.kubectl(
        f"--as=system:serviceaccount:{NS}:writer", "create", "-f", "-", stdin=json.dumps(child), check=False
    )
    assert refused.returncode != 0
    assert "blockOwnerDeletion" in refused.stderr

    _apply(
        cluster,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "writer", "namespace": NS},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "delete"]},
                {"apiGroups": [""], "resources": ["configmaps/finalizers"], "verbs": ["update"]},
            ],
        },
    )
    allowed = cluster.kubectl(
        f"--as=system:serviceaccount:{NS}:writer", "create", "-f", "-", stdin=json.dumps(child), check=False
    )
    assert allowed.returncode == 0, allowed.stderr


def test_zz_teardown_leaves_nothing_on_the_machine(cluster: LocalPlatform) -> None:
    """Runs last: stops the node with pods still running and looks for anything left behind."""
    base = cluster.base_dir
    assert node.leftovers(base), "the node should have made something to remove"
    cluster.stop()

    assert node.leftovers(base) == []
    ours = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout.split()
    assert ours == []
