"""Pure parts of ``openledger.local.keda``: quantities, the API objects, the processes' arguments."""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path

import pytest

from openledger.local import keda


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("20", 20), ("2k", 2000), ("1500m", Decimal("1.5")), ("3M", 3 * 10**6), ("1Ki", 1024), ("1e3", 1000)],
)
def test_quantities_as_the_metrics_api_prints_them(text: str, value: Decimal | int) -> None:
    assert keda.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "k", "2kb", "1.2.3", "twenty"])
def test_a_value_that_is_not_a_quantity_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        keda.parse_quantity(text)


def test_the_adapter_is_reached_on_loopback_through_an_external_name_service() -> None:
    objs = {o["kind"]: o for o in keda.api_objects("keda", 40123, b"PEM")}
    service, api = objs["Service"], objs["APIService"]
    assert service["spec"]["type"] == "ExternalName" and service["spec"]["externalName"] == "127.0.0.1"
    assert [p["port"] for p in service["spec"]["ports"]] == [40123]
    assert api["metadata"]["name"] == "v1beta1.external.metrics.k8s.io"
    assert api["spec"]["service"] == {"name": "keda-metrics-apiserver", "namespace": "keda", "port": 40123}
    assert base64.b64decode(api["spec"]["caBundle"]) == b"PEM"  # verified, not insecureSkipTLSVerify
    assert "insecureSkipTLSVerify" not in api["spec"]
    binding = objs["ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "namespace": "kube-system", "name": "horizontal-pod-autoscaler"}
    ]


def test_the_certificate_names_the_services_the_aggregator_and_the_adapter_dial() -> None:
    names = keda.certificate_names("keda")
    assert "DNS:keda-metrics-apiserver.keda.svc" in names  # the aggregator's TLS server name
    assert "IP:127.0.0.1" in names  # the adapter dials the operator's gRPC by address


def test_every_listener_is_on_loopback() -> None:
    ports = {"metrics": 1, "probe": 2, "grpc": 3, "https": 4}
    operator = keda.operator_argv(Path("/bin/keda-operator"), Path("/c"), Path("/ca"), ports)
    assert {a.split("=", 1)[1] for a in operator if "-address=" in a} == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    adapter = keda.adapter_argv(Path("/bin/keda-adapter"), Path("/c"), Path("/k"), ports)
    assert "--bind-address=127.0.0.1" in adapter and "--metrics-service-address=127.0.0.1:3" in adapter


def test_keda_env_watches_every_namespace_and_names_its_own() -> None:
    env = keda.keda_env(Path("/k"), "keda")
    assert env["WATCH_NAMESPACE"] == "" and env["POD_NAMESPACE"] == env["KEDA_CLUSTER_OBJECT_NAMESPACE"] == "keda"


def test_the_metric_path_selects_the_scaled_object() -> None:
    assert keda.metric_path("ns", "s0-redis-streams-x", "w") == (
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/ns/s0-redis-streams-x"
        "?labelSelector=scaledobject.keda.sh%2Fname%3Dw"
    )
