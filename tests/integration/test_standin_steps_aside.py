"""The serving stand-in serves nothing while KServe's controller Deployment exists (KServe on the node).

On the node (``tests/integration/cluster/test_kserve.py``) KServe serves every InferenceService; a
stand-in that also wrote their status would fight it. Here, on the plain platform, the Deployment
``kserve/kserve-controller-manager`` only exists (no kubelet runs it): the stand-in leaves the
InferenceService alone while it is there and serves it once it is deleted.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from openledger.local.processes import spawn
from openledger.local.standin import ISVC, KSERVE_CONTROLLER
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]


def _controller(name: str) -> dict[str, Any]:
    labels = {"control-plane": name}
    container = {"name": "manager", "image": "openledger.local/kserve-controller:0.17.0"}
    return {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def _isvc(name: str) -> dict[str, Any]:
    model = {"modelFormat": {"name": "sklearn"}, "storageUri": "pvc://models/iris", "protocolVersion": "v1"}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": {"model": model}},
    }


def test_the_standin_leaves_inference_services_to_kserve_while_its_controller_exists(
    kubeconfig: Path, tmp_path: Path
) -> None:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    objects = kubernetes.client.CustomObjectsApi(api)
    name, kserve_ns = KSERVE_CONTROLLER
    ns = f"ol-aside-{secrets.token_hex(4)}"
    for namespace in (ns, kserve_ns):
        if namespace not in {n.metadata.name for n in core.list_namespace().items}:
            core.create_namespace({"metadata": {"name": namespace}})
    apps.create_namespaced_deployment(kserve_ns, _controller(name))
    objects.create_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], _isvc("iris"))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "OPENLEDGER_NAMESPACES": json.dumps([ns]),
           "OPENLEDGER_LOCAL_DIR": str(tmp_path)}  # fmt: skip
    log = tmp_path / "standin.log"
    standin = spawn("standin", [sys.executable, "-m", "openledger.cli", "standin", "run"], log, detached=False, env=env)
    try:
        wait_for(lambda: "stand-in started" in log.read_text(), 60, "the stand-in to start", 0.2)
        time.sleep(5)  # ten passes
        isvc = objects.get_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], "iris")
        assert not isvc.get("status"), isvc.get("status")
        assert "started model server" not in log.read_text()

        apps.delete_namespaced_deployment(name, kserve_ns)
        url = wait_for(
            lambda: (objects.get_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], "iris").get("status") or {}).get(
                "url"
            ),
            90,
            "the stand-in to serve iris once KServe's controller is gone",
            0.5,
        )
        assert url.startswith("http://127.0.0.1:"), url
    finally:
        standin.stop(10)
        if name in {d.metadata.name for d in apps.list_namespaced_deployment(kserve_ns).items}:
            apps.delete_namespaced_deployment(name, kserve_ns)
        objects.delete_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], "iris")
