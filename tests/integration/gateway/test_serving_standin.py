"""The LOCAL STAND-IN for KServe serves InferenceServices and writes their status as KServe would."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from openledger.local.processes import spawn
from tests.integration.gateway.conftest import IRIS_ROW, post, wait_for

ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def _isvc(name: str, fmt: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "predictor": {
                "model": {"modelFormat": {"name": fmt}, "storageUri": f"hf://org/{name}", "protocolVersion": "v1"}
            }
        },
    }


def test_standin_serves_inference_services_and_reports_ready(kubeconfig: Path, tmp_path: Path) -> None:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    core, objects = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    ns = f"ol-sti-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": ns}})
    objects.create_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], _isvc("iris", "sklearn"))
    objects.create_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], _isvc("llm", "huggingface"))
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "OPENLEDGER_NAMESPACES": json.dumps([ns]),
        "OPENLEDGER_LOCAL_DIR": str(tmp_path),
    }
    standin = spawn(
        "standin",
        [sys.executable, "-m", "openledger.cli", "standin", "run"],
        tmp_path / "standin.log",
        detached=False,
        env=env,
    )
    try:

        def ready(name: str) -> dict[str, Any] | None:
            isvc = objects.get_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], name)
            conds = {c["type"]: c for c in (isvc.get("status") or {}).get("conditions") or []}
            return isvc if conds.get("Ready", {}).get("status") == "True" else None

        iris = wait_for(lambda: ready("iris"), 90, "iris Ready")
        llm = wait_for(lambda: ready("llm"), 90, "llm Ready")
        status = iris["status"]
        assert status["url"].startswith("http://127.0.0.1:") and status["modelStatus"]["copies"]["totalCopies"] == 1
        assert {c["type"] for c in status["conditions"]} == {"IngressReady", "PredictorReady", "Ready"}
        assert status["observedGeneration"] == iris["metadata"]["generation"]
        code, _, body = post(f"{status['url']}/v1/models/iris:predict", {"instances": [IRIS_ROW]})
        assert (code, body) == (200, {"predictions": [0]})
        chat = {"model": "llm", "messages": [{"role": "user", "content": "the model"}], "max_tokens": 5}
        code, _, body = post(f"{llm['status']['url']}/openai/v1/chat/completions", chat)
        assert code == 200 and body["usage"]["completion_tokens"] <= 5

        objects.delete_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], "iris")
        url = status["url"]

        def gone() -> bool:
            try:
                post(f"{url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, timeout_s=1)
            except OSError:
                return True
            return False

        wait_for(gone, 20, "the iris server to stop")
    finally:
        standin.stop(10)
