"""The product in pods: the checkout's chart and image installed on the node as ``make cluster`` does.

The install (the package's ``product`` fixture, conftest.py) is ``make cluster``'s: real KServe
(:func:`openledger.local.cluster.install_serving`), then
:func:`openledger.local.product_cluster.install_product` (the image
built from this checkout, imported into containerd, ``helm upgrade --install``).
Then, as a platform team would check it: every Deployment Ready under the chart's
ServiceAccount and RBAC, ``helm test``, the README walkthrough's serving flow through the
in-cluster gateway with the usage event ingested by the in-cluster ledger worker, garbage
collection of the Model's InferenceService (blockOwnerDeletion under
OwnerReferencesPermissionEnforcement), and a rollout of the gateway.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from openledger.local import node
from openledger.local.cluster import PRODUCT_NAMESPACE, RELEASE
from openledger.local.platform import LocalPlatform
from openledger.local.product_cluster import helm
from tests.waiting import wait_for

WALKTHROUGH = Path(__file__).resolve().parents[3] / "examples" / "walkthrough"
MODEL, AGENT = "demo-llm", "demo-agent"
FRANCE: list[Any] = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PARIS = "The capital of France is Paris."  # SmolLM2 at temperature 0, served by KServe

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def walkthrough(product: LocalPlatform) -> dict[str, str]:
    """The walkthrough's Model for the CPU node and its Agent (03-model-cpu.yaml, 04-agent.yaml as they
    are) in a namespace of their own, with the models claim as ``openledger local models-volume`` offers it."""
    ns = f"ol-walk-{secrets.token_hex(3)}"
    node.apply(product.kubectl, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    volume = subprocess.run(
        [sys.executable, "-m", "openledger.cli", "local", "models-volume", ns, "--dir", str(product.base_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    product.kubectl("apply", "-f", "-", stdin=volume.stdout)
    for manifest in ("03-model-cpu.yaml", "04-agent.yaml"):
        product.kubectl("apply", "-n", ns, "-f", str(WALKTHROUGH / manifest))
    return {"ns": ns}


def _json(platform: LocalPlatform, *args: str) -> dict[str, Any]:
    result = platform.kubectl(*args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _chat(gateway_url: str, api_key: str) -> str:
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=20, temperature=0)
    return str(chat.choices[0].message.content)


def _usage_events(database_url: str, agent: str) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM usage_events WHERE agent = %s", (agent,)).fetchone()
    return int(row[0]) if row else 0


def test_every_deployment_is_ready_under_the_charts_service_account(product: LocalPlatform) -> None:
    selector = f"app.kubernetes.io/instance={RELEASE}"
    deployments = _json(product, "-n", PRODUCT_NAMESPACE, "get", "deployments", "-l", selector)["items"]
    names = {d["metadata"]["name"] for d in deployments}
    assert {f"{RELEASE}-operator", f"{RELEASE}-gateway", f"{RELEASE}-ledger-worker"} <= names, names
    for deployment in deployments:
        status = deployment.get("status", {})
        assert status.get("readyReplicas") == deployment["spec"]["replicas"], (deployment["metadata"]["name"], status)
    accounts = {
        s["metadata"]["name"] for s in _json(product, "-n", PRODUCT_NAMESPACE, "get", "serviceaccounts")["items"]
    }
    pods = [  # the Deployments' pods (hook Jobs have their own accounts)
        p
        for p in _json(product, "-n", PRODUCT_NAMESPACE, "get", "pods", "-l", selector)["items"]
        if [o["kind"] for o in p["metadata"].get("ownerReferences", [])] == ["ReplicaSet"]
    ]
    operator_pods = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    assert operator_pods, [p["metadata"]["name"] for p in pods]
    for pod in operator_pods:  # the one process that talks to the API server, with the chart's RBAC
        account = pod["spec"]["serviceAccountName"]
        assert account != "default" and account in accounts, account
        assert pod["spec"].get("automountServiceAccountToken") is True
    for pod in pods:  # everything else runs without a token
        if pod not in operator_pods:
            assert pod["spec"].get("automountServiceAccountToken") is False, pod["metadata"]["name"]


def test_local_images_names_the_cached_archives_the_node_runs(product: LocalPlatform) -> None:
    """``openledger local images`` (what ``make test`` runs first) answers from the cache the install filled,
    and its product archive is the image the operator pods run."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "openledger.cli", "local", "images"],
                            capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    took_s = time.monotonic() - started
    archives = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert set(archives) == {"product", "kserve-controller", "serving"}, result.stdout
    assert all(Path(archive).is_file() for archive in archives.values()), archives
    assert took_s < 30, f"cached images took {took_s:.1f} s"  # a rebuild takes minutes
    operator = _json(product, "-n", PRODUCT_NAMESPACE, "get", "deployment", f"{RELEASE}-operator")
    tag = operator["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
    assert tag in Path(archives["product"]).name, (tag, archives["product"])


def test_helm_test_passes_from_inside_the_cluster(product: LocalPlatform) -> None:
    result = helm(product, "test", RELEASE, "--namespace", PRODUCT_NAMESPACE, "--timeout", "3m", timeout_s=240)
    phases = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("Phase:")]
    assert phases and set(phases) == {"Succeeded"}, result.stdout


def test_walkthrough_answers_through_the_in_cluster_gateway_and_the_ledger_worker_ingests_it(
    product: LocalPlatform, walkthrough: dict[str, str]
) -> None:
    ns = walkthrough["ns"]
    model = wait_for(
        lambda: (m := _json(product, "-n", ns, "get", "model", MODEL)) and _ready(m) and m,
        240,
        f"Model {MODEL} Ready (InferenceService served by KServe)",
        1,
    )
    isvc = _json(product, "-n", ns, "get", "inferenceservice", MODEL)
    url = f"http://{MODEL}-predictor.{ns}.svc.cluster.local"  # KServe's own predictor Service
    assert isvc["status"]["url"] == url and model["status"].get("url") == url, (isvc["status"], model["status"])
    agent = wait_for(lambda: (a := _json(product, "-n", ns, "get", "agent", AGENT)) and _ready(a) and a, 60,
                     f"Agent {AGENT} Ready", 0.5)  # fmt: skip
    secret_name = agent["status"].get("secretName") or f"{AGENT}-credentials"
    api_key = base64.b64decode(_json(product, "-n", ns, "get", "secret", secret_name)["data"]["apiKey"]).decode()

    assert _chat(product.endpoints.extra["GATEWAY_URL"], api_key) == PARIS

    database_url, who = product.endpoints.database_url, f"{ns}/{AGENT}"
    assert wait_for(lambda: _usage_events(database_url, who), 60, "the ledger worker pod to ingest the event", 0.5) == 1
    time.sleep(2)  # a duplicate would follow the first within the worker's next reads
    assert _usage_events(database_url, who) == 1
    walkthrough["api_key"] = api_key


def test_a_gateway_rollout_completes_and_the_gateway_answers_after_it(
    product: LocalPlatform, walkthrough: dict[str, str]
) -> None:
    deployment = f"deployment/{RELEASE}-gateway"
    before = _json(product, "-n", PRODUCT_NAMESPACE, "get", deployment)["metadata"]["generation"]
    product.kubectl("-n", PRODUCT_NAMESPACE, "rollout", "restart", deployment)
    status = product.kubectl("-n", PRODUCT_NAMESPACE, "rollout", "status", deployment, "--timeout=180s", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    after = _json(product, "-n", PRODUCT_NAMESPACE, "get", deployment)
    assert after["metadata"]["generation"] > before
    gateway_url = product.endpoints.extra["GATEWAY_URL"]
    with urllib.request.urlopen(f"{gateway_url}/healthz", timeout=5) as response:
        assert response.status == 200
    if "api_key" in walkthrough:  # the walkthrough's Agent still answers through the new pods
        assert _chat(gateway_url, walkthrough["api_key"]) == PARIS


def test_deleting_the_model_garbage_collects_its_inference_service(
    product: LocalPlatform, walkthrough: dict[str, str]
) -> None:
    ns = walkthrough["ns"]
    isvc = _json(product, "-n", ns, "get", "inferenceservice", MODEL)
    owners = isvc["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o.get("blockOwnerDeletion")) for o in owners] == [("Model", MODEL, True)], owners
    product.kubectl("-n", ns, "delete", "model", MODEL, "--wait=false")
    wait_for(
        lambda: product.kubectl("-n", ns, "get", "inferenceservice", MODEL, check=False).returncode != 0,
        90,
        f"the garbage collector to delete InferenceService {MODEL}",
        0.5,
    )
    wait_for(lambda: product.kubectl("-n", ns, "get", "model", MODEL, check=False).returncode != 0, 60,
             f"Model {MODEL} gone", 0.5)  # fmt: skip
