"""Real KServe on the node serves the product's Models (issue 13 item 4).

The package's ``product`` fixture installs what ``make cluster`` does: KServe v0.17.0
(:mod:`openledger.local.kserve`: the controller built from its Go module, in Standard mode, its
webhooks with certificates issued here, the project's ClusterServingRuntimes on the locally built
``openledger-serving`` image, the ``models`` claim on a folder the platform prepares), then the
product. No serving stand-in runs on the node, so these Models are served by KServe's own
Deployments and Services only. The module's namespace gets the ``models`` claim from
:func:`openledger.local.kserve.add_models_volume` (what ``openledger local models-volume`` prints);
at the end the namespace is deleted with KServe still running, so its finalizers complete.

Models: ``iris`` (format sklearn, ``pvc://models/iris``) and ``smol`` (format gguf,
``pvc://models/smollm2``, protocol openai), both Standard. The chain checked: Model → the
operator's InferenceService → KServe's Deployment and Service (``<name>-predictor``) → pod Ready →
InferenceService Ready with KServe's in-cluster URL → Model Ready with that URL; then requests
through the in-cluster gateway, each metered exactly once by the in-cluster ledger worker.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import psycopg
import pytest

from openledger.local import kserve, node
from openledger.local.platform import LocalPlatform
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(900)

IRIS, LLM, AGENT = "iris", "smol", "kserve-agent"
FRANCE: list[Any] = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PARIS = "The capital of France is Paris."
OWNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def model(name: str, fmt: str, path: str, protocol: str) -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {
            "format": {"name": fmt},
            "storageUri": f"pvc://{kserve.MODELS_CLAIM}/{path}",
            "protocol": protocol,
            "deploymentMode": "Standard",
            "scaling": {"minReplicas": 1, "maxReplicas": 1},
            "pricing": {"perRequest": "0.001", "perInputToken": "0.00001", "perOutputToken": "0.00002"},
            "owner": OWNER,
        },
    }


AGENT_SPEC = {
    "apiVersion": "openledger.io/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": AGENT},
    "spec": {
        "account": "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
        "models": [IRIS, LLM],
        "limits": {"requestsPerSecond": 10, "burst": 20, "tokensPerMinute": 100000, "maxConcurrency": 4},
        "budget": {"amount": "10", "period": "Day", "enforcement": "Hard"},
    },
}


@pytest.fixture(scope="module")
def served(product: LocalPlatform) -> Iterator[dict[str, Any]]:
    ns = f"ol-kserve-{secrets.token_hex(3)}"
    node.apply(product.kubectl, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    started = time.monotonic()
    try:
        kserve.add_models_volume(product, ns)
        objects = [model(IRIS, "sklearn", kserve.IRIS_PATH, "v1"), model(LLM, "gguf", kserve.LLM_PATH, "openai")]
        node.apply(product.kubectl, [{**o, "metadata": {**o["metadata"], "namespace": ns}} for o in objects])
        node.apply(product.kubectl, [{**AGENT_SPEC, "metadata": {"name": AGENT, "namespace": ns}}])
        yield {"ns": ns, "started": started}
    finally:
        # KServe still runs: its finalizers and the garbage collector clear the namespace.
        product.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=180s", check=False)
        product.kubectl("delete", "pv", f"openledger-models-{ns}", "--ignore-not-found", check=False)


def _json(platform: LocalPlatform, *args: str) -> dict[str, Any]:
    result = platform.kubectl(*args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _usage_events(database_url: str, agent: str, model_name: str) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM usage_events WHERE agent = %s AND model = %s", (agent, model_name)
        ).fetchone()
    return int(row[0]) if row else 0


def _api_key(platform: LocalPlatform, ns: str) -> str:
    agent = wait_for(lambda: (a := _json(platform, "-n", ns, "get", "agent", AGENT)) and _ready(a) and a, 60,
                     f"Agent {AGENT} Ready", 0.5)  # fmt: skip
    secret = agent["status"].get("secretName") or f"{AGENT}-credentials"
    return base64.b64decode(_json(platform, "-n", ns, "get", "secret", secret)["data"]["apiKey"]).decode()


def _metered_once(platform: LocalPlatform, ns: str, model_name: str, before: int) -> None:
    database_url, who = platform.endpoints.database_url, f"{ns}/{AGENT}"
    wait_for(lambda: _usage_events(database_url, who, f"{ns}/{model_name}") > before, 60,
             f"the ledger worker to ingest the {model_name} event", 0.5)  # fmt: skip
    time.sleep(2)  # a duplicate would follow within the worker's next reads
    assert _usage_events(database_url, who, f"{ns}/{model_name}") == before + 1


def test_kserve_runs_in_standard_mode_with_its_webhooks_and_the_projects_runtimes(
    product: LocalPlatform, served: dict[str, Any]
) -> None:
    deployment = _json(product, "-n", kserve.NAMESPACE, "get", "deployment", kserve.CONTROLLER)
    assert deployment["status"].get("readyReplicas") == 1, deployment["status"]
    config = _json(product, "-n", kserve.NAMESPACE, "get", "configmap", kserve.CONFIG_MAP)["data"]
    assert json.loads(config["deploy"]) == {"defaultDeploymentMode": "Standard"}
    hooks = _json(product, "get", "mutatingwebhookconfiguration", "inferenceservice.serving.kserve.io")["webhooks"]
    assert all(h["clientConfig"].get("caBundle") for h in hooks)
    # The ClusterServingRuntime validator answers over TLS (the API server trusts our CA): a runtime
    # that repeats a format at the same priority as ours is refused by KServe's webhook itself.
    clash = kserve.serving_runtime("clash", "sklearn", ["v1"], "v1", "unused")
    result = product.kubectl("apply", "-f", "-", stdin=json.dumps(clash), check=False)
    assert result.returncode != 0 and "admission webhook" in result.stderr, result.stdout + result.stderr
    names = {r["metadata"]["name"] for r in _json(product, "get", "clusterservingruntimes")["items"]}
    assert {kserve.SKLEARN_RUNTIME, kserve.GGUF_RUNTIME} <= names


@pytest.mark.parametrize("name", [IRIS, LLM])
def test_a_model_becomes_kserves_own_deployment_and_service_and_is_ready_with_kserves_url(
    product: LocalPlatform, served: dict[str, Any], name: str
) -> None:
    ns = served["ns"]
    found = wait_for(lambda: (m := _json(product, "-n", ns, "get", "model", name)) and _ready(m) and m, 300,
                     f"Model {name} Ready (served by KServe)", 1)  # fmt: skip
    print(f"{name} Ready {time.monotonic() - served['started']:.0f} s after the install began")
    isvc = _json(product, "-n", ns, "get", "inferenceservice", name)
    url = f"http://{name}-predictor.{ns}.svc.cluster.local"
    assert isvc["status"]["url"] == url, isvc["status"]
    assert found["status"]["url"] == url
    runtime = kserve.SKLEARN_RUNTIME if name == IRIS else kserve.GGUF_RUNTIME
    assert isvc["status"].get("clusterServingRuntimeName") == runtime, isvc["status"]
    assert isvc["status"]["modelStatus"]["states"]["activeModelState"] == "Loaded"
    deployment = _json(product, "-n", ns, "get", "deployment", f"{name}-predictor")
    owners = [(o["kind"], o["name"]) for o in deployment["metadata"]["ownerReferences"]]
    assert owners == [("InferenceService", name)], owners
    assert deployment["status"]["readyReplicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith(kserve.SERVING_REPOSITORY), container["image"]
    # KServe's pod mutator (a webhook) mounts pvc://models/<path> straight at /mnt/models: no storage initializer.
    [pod] = _json(product, "-n", ns, "get", "pods", "-l", f"serving.kserve.io/inferenceservice={name}")["items"]
    assert not pod["spec"].get("initContainers"), pod["spec"].get("initContainers")
    [served_by] = [c for c in pod["spec"]["containers"] if c["name"] == "kserve-container"]
    mounts = {m["mountPath"]: m for m in served_by.get("volumeMounts", [])}
    assert mounts["/mnt/models"]["subPath"] == (kserve.IRIS_PATH if name == IRIS else kserve.LLM_PATH), mounts
    claims = [(v.get("persistentVolumeClaim") or {}).get("claimName") for v in pod["spec"]["volumes"]]
    assert kserve.MODELS_CLAIM in claims, pod["spec"]["volumes"]
    service = _json(product, "-n", ns, "get", "service", f"{name}-predictor")
    assert [(o["kind"], o["name"]) for o in service["metadata"]["ownerReferences"]] == [("InferenceService", name)]
    # The Model's scaling (Standard: HPA on cpu, 1..1) as KServe's own autoscaler.
    hpa = _json(product, "-n", ns, "get", "hpa", f"{name}-predictor")
    assert [(o["kind"], o["name"]) for o in hpa["metadata"]["ownerReferences"]] == [("InferenceService", name)]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 1)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # Nothing of the stand-in: no model server on the bridge's host address.
    assert node.HOST_IP not in json.dumps(isvc["status"])


def test_chat_completions_plain_and_streamed_come_from_the_real_llm_and_are_metered_once(
    product: LocalPlatform, served: dict[str, Any]
) -> None:
    ns = served["ns"]
    wait_for(lambda: _ready(_json(product, "-n", ns, "get", "model", LLM)), 300, f"Model {LLM} Ready", 1)
    client = openai.OpenAI(base_url=f"{product.endpoints.extra['GATEWAY_URL']}/v1", api_key=_api_key(product, ns),
                           max_retries=0, timeout=120)  # fmt: skip
    chat = client.chat.completions.create(model=LLM, messages=FRANCE, max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == PARIS
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    _metered_once(product, ns, LLM, 0)

    stream = client.chat.completions.create(model=LLM, messages=FRANCE, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PARIS
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # one chunk per token
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    _metered_once(product, ns, LLM, 1)


def test_v1_predict_on_iris_through_the_gateway_is_metered_once(product: LocalPlatform, served: dict[str, Any]) -> None:
    ns = served["ns"]
    wait_for(lambda: _ready(_json(product, "-n", ns, "get", "model", IRIS)), 300, f"Model {IRIS} Ready", 1)
    request = urllib.request.Request(
        f"{product.endpoints.extra['GATEWAY_URL']}/v1/models/{IRIS}:predict",
        data=json.dumps({"instances": [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]}).encode(),
        headers={"Authorization": f"Bearer {_api_key(product, ns)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"predictions": [1, 0]}
    _metered_once(product, ns, IRIS, 0)
