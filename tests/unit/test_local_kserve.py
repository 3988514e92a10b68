"""The pure parts of openledger.local.kserve (KServe on the local node) and the stand-in's model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from openledger.cli import cli
from openledger.local import kserve
from openledger.local.standin import gguf_file

UPSTREAM = {
    "_example": "ignored",
    "ingress": json.dumps(
        {"ingressGateway": "knative-serving/knative-ingress-gateway", "ingressDomain": "example.com"}
    ),
    "storageInitializer": json.dumps({"image": "kserve/storage-initializer:latest", "enableModelcar": True}),
    "deploy": json.dumps({"defaultDeploymentMode": "Serverless"}),
    "logger": "{}",
}

MANIFESTS = """
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  creationTimestamp: null
  name: servingruntime.serving.kserve.io
webhooks:
  - clientConfig:
      service:
        name: $(webhookServiceName)
        namespace: $(kserveNamespace)
        path: /validate-serving-kserve-io-v1alpha1-servingruntime
    name: servingruntime.kserve-webhook-server.validator
"""


def test_config_is_standard_mode_without_ingress_and_with_small_model_servers() -> None:
    data = kserve.config_data(UPSTREAM)
    assert "_example" not in data and data["logger"] == "{}"
    assert json.loads(data["deploy"]) == {"defaultDeploymentMode": "Standard"}
    ingress = json.loads(data["ingress"])
    assert ingress["ingressDomain"] == "svc.cluster.local" and ingress["disableIngressCreation"] is True
    assert ingress["ingressGateway"]  # KServe refuses an ingress config without it
    assert ingress["domainTemplate"] == "{{ .Name }}-predictor.{{ .Namespace }}.{{ .IngressDomain }}"
    assert json.loads(data["storageInitializer"])["enableModelcar"] is False
    assert json.loads(data["inferenceService"])["resource"]["cpuRequest"] == "100m"


def test_webhooks_point_at_the_service_and_trust_the_ca() -> None:
    [hook_config] = kserve.webhook_configurations(MANIFESTS, b"PEM")
    assert "creationTimestamp" not in hook_config["metadata"]
    [hook] = hook_config["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": kserve.WEBHOOK_SERVICE,
        "namespace": kserve.NAMESPACE,
        "path": "/validate-serving-kserve-io-v1alpha1-servingruntime",
    }
    assert hook["clientConfig"]["caBundle"] == "UEVN"  # base64 of PEM


def test_runtimes_serve_the_mounted_model_on_every_interface_of_the_pod() -> None:
    sklearn, gguf = kserve.runtimes("openledger.local/openledger-serving:abc")
    assert [f["name"] for f in sklearn["spec"]["supportedModelFormats"]] == ["sklearn"]
    assert [f["name"] for f in gguf["spec"]["supportedModelFormats"]] == ["gguf"]
    assert gguf["spec"]["protocolVersions"] == ["v1"]  # the operator's protocol openai is KServe's v1
    [container] = gguf["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["imagePullPolicy"] == "Never"
    assert {"--host=0.0.0.0", "--port=8080", "--model-dir=/mnt/models", "--kind=openai"} <= set(container["args"])


def test_the_models_volume_is_bound_to_the_claim_of_its_namespace() -> None:
    volume, claim = kserve.model_volume("ns1", Path("/srv/models"))
    assert volume["spec"]["claimRef"] == {"namespace": "ns1", "name": kserve.MODELS_CLAIM}
    assert volume["spec"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["metadata"] == {"name": kserve.MODELS_CLAIM, "namespace": "ns1"}


def test_controller_deployment_mounts_the_webhook_certificate_and_runs_as_non_root() -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}}
    objects = kserve.controller_objects(role, {"deploy": "{}"}, b"crt", b"key")
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Deployment") == 1 and "ClusterRoleBinding" in kinds
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["volumeMounts"][0]["mountPath"] == kserve.CERT_MOUNT
    [secret] = [o for o in objects if o["kind"] == "Secret"]
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key"}


def test_gguf_file_of_a_folder_or_the_file_itself(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert gguf_file(tmp_path) == tmp_path / "m.gguf"
    assert gguf_file(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.gguf file in .*empty"):
        gguf_file(tmp_path / "empty")


def test_models_volume_prints_the_claim_for_a_namespace_over_the_platforms_models_folder(tmp_path: Path) -> None:
    folder = kserve.models_folder(tmp_path)
    folder.mkdir(parents=True)
    result = CliRunner().invoke(cli, ["local", "models-volume", "team-a", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    volume, claim = yaml.safe_load_all(result.output)
    assert volume["spec"]["hostPath"]["path"] == str(folder.resolve())
    assert volume["spec"]["claimRef"] == {"namespace": "team-a", "name": kserve.MODELS_CLAIM}
    assert (claim["kind"], claim["metadata"]) == ("PersistentVolumeClaim", {"name": "models", "namespace": "team-a"})


def test_models_volume_without_a_cluster_says_what_prepares_the_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["local", "models-volume", "team-a", "--dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "make cluster" in result.output and str(kserve.models_folder(tmp_path.resolve())) in result.output
