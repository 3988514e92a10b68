"""A private KEDA (operator + metrics adapter) for the local platform.

KEDA v2.21.0 is built from its Go module (:func:`openledger.local.toolchain.keda_binaries`)
and runs as two more host processes of a :class:`~openledger.local.platform.LocalPlatform`,
as in KEDA's own manifests (``config/manager``, ``config/metrics-server``) but without pods:

- ``keda-operator`` watches ScaledObjects through the platform's admin kubeconfig, makes their
  HPAs and serves the scalers' metrics over gRPC (mTLS) on a loopback port;
- ``keda-adapter`` is the external metrics API server (``external.metrics.k8s.io/v1beta1``): the
  API server's aggregation layer proxies to it (front-proxy client certificate, see
  ``platform._aggregation_flags``), it asks the operator over gRPC.

One certificate (``ca.crt``, ``tls.crt``, ``tls.key`` in one folder, KEDA's ``--cert-dir``
layout) serves the operator's gRPC, the adapter's gRPC client and its HTTPS; the APIService
trusts its CA (``caBundle``). The adapter is reached through an ExternalName Service whose name
is ``127.0.0.1``. :func:`stop_keda` removes the APIService first: an APIService whose server is
gone makes discovery fail (helm refuses to install, kubectl warns).

KEDA's operator watches six kinds and cannot start a controller whose CRD is missing: the ones
the API server lacks (``../shared/third_party/crds`` has three) come from its Go module's ``config/crd``.

Nothing here is started by ``make up`` (a start takes about 3 s): tests start it through a fixture.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from openledger.local import toolchain
from openledger.local.platform import CA_EXTENSIONS, LocalPlatform, openssl_certificate
from openledger.local.processes import ComponentError, ManagedProcess, wait_ready

NAMESPACE = "keda"
API_SERVICE = "v1beta1.external.metrics.k8s.io"
ADAPTER_SERVICE = "keda-metrics-apiserver"
OPERATOR_SERVICE = "keda-operator"
FIELD_MANAGER = "openledger-local-keda"
# The HPA controller asks for external metrics as this service account (kube-controller-manager
# runs with --use-service-account-credentials), as KEDA's hpa-controller-external-metrics binding.
HPA_SERVICE_ACCOUNT = ("kube-system", "horizontal-pod-autoscaler")


@dataclass(frozen=True)
class KedaServer:
    operator: ManagedProcess
    adapter: ManagedProcess
    cert_dir: Path
    namespace: str
    adapter_port: int
    grpc_port: int


# ------------------------------------------------------------------ pure parts


def certificate_names(namespace: str) -> list[str]:
    """The SANs of KEDA's one certificate (as KEDA's cert rotation issues it), plus loopback."""
    names = ["localhost"]
    for service in (OPERATOR_SERVICE, ADAPTER_SERVICE):
        names += [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    return [f"DNS:{n}" for n in names] + ["IP:127.0.0.1"]


def keda_env(kubeconfig: Path, namespace: str) -> dict[str, str]:
    """What KEDA reads from a pod's environment (pkg/util/env_resolver.go, watch.go)."""
    return {
        "KUBECONFIG": str(kubeconfig),
        "WATCH_NAMESPACE": "",  # every namespace; KEDA refuses to start when it is unset
        "POD_NAMESPACE": namespace,
        # Otherwise read from the pod's service account folder, which a host process has not.
        "KEDA_CLUSTER_OBJECT_NAMESPACE": namespace,
    }


def operator_argv(binary: Path, cert_dir: Path, ca_dir: Path, ports: dict[str, int]) -> list[str]:
    return [
        str(binary),
        f"--metrics-bind-address=127.0.0.1:{ports['metrics']}",
        f"--health-probe-bind-address=127.0.0.1:{ports['probe']}",
        f"--metrics-service-bind-address=127.0.0.1:{ports['grpc']}",
        f"--cert-dir={cert_dir}",
        # Scalers' extra CAs (Redis TLS...): this folder, not the pod path /custom/ca.
        f"--ca-dir={ca_dir}",
        "--enable-cert-rotation=false",  # certificates are issued here, not by KEDA into a Secret
        "--leader-elect=false",
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]


def adapter_argv(binary: Path, cert_dir: Path, kubeconfig: Path, ports: dict[str, int]) -> list[str]:
    return [
        str(binary),
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['https']}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={cert_dir / 'tls.crt'}",
        f"--tls-private-key-file={cert_dir / 'tls.key'}",
        # As KEDA's manifest: client certificates of KEDA's CA; the API server's proxied requests are
        # trusted through the request-header CA it publishes (kube-system/extension-apiserver-authentication).
        f"--client-ca-file={cert_dir / 'ca.crt'}",
        # Delegated authentication/authorization and listing through the platform's API server.
        f"--lister-kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--metrics-service-address=127.0.0.1:{ports['grpc']}",
        f"--port={ports['metrics']}",  # its own /metrics; KEDA binds it on every interface
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]


def api_objects(namespace: str, https_port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """The namespace, the ExternalName Service to the adapter, its APIService and the HPA's RBAC."""
    labels = {"app.kubernetes.io/part-of": "keda-operator", "app.kubernetes.io/managed-by": FIELD_MANAGER}
    reader = "openledger-local:keda-external-metrics-reader"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ADAPTER_SERVICE, "namespace": namespace, "labels": labels},
            "spec": {
                "type": "ExternalName",
                "externalName": "127.0.0.1",
                "ports": [{"name": "https", "port": https_port, "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": API_SERVICE, "labels": labels},
            "spec": {
                "service": {"name": ADAPTER_SERVICE, "namespace": namespace, "port": https_port},
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "caBundle": base64.b64encode(ca_pem).decode(),
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": reader, "labels": labels},
            "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["*"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": reader, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": reader},
            "subjects": [
                {"kind": "ServiceAccount", "namespace": HPA_SERVICE_ACCOUNT[0], "name": HPA_SERVICE_ACCOUNT[1]}
            ],
        },
    ]


_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"),
    **{s: Decimal(10) ** (3 * (n + 1)) for n, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    **{s: Decimal(2) ** (10 * (n + 1)) for n, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)$")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource.Quantity (``20``, ``2k``, ``1500m``) as an exact Decimal."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from exc
    return number * _SUFFIXES[match.group(2)]


def metric_path(namespace: str, metric: str, scaled_object: str) -> str:
    selector = urllib.parse.quote(f"scaledobject.keda.sh/name={scaled_object}", safe="")
    return f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}?labelSelector={selector}"


# --------------------------------------------------------------------- I/O


class ExternalMetricError(RuntimeError):
    """The external metrics API did not answer a value; the message is the API server's."""


def issue_certificates(folder: Path, namespace: str) -> Path:
    """KEDA's ``--cert-dir`` (ca.crt, tls.crt, tls.key), issued once per folder."""
    ca, crt, key = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    if ca.exists() and crt.exists() and key.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    openssl_certificate(ca, folder / "ca.key", "openledger-local-keda-ca", extensions=CA_EXTENSIONS)
    leaf = (
        "basicConstraints=critical,CA:FALSE",
        "extendedKeyUsage=serverAuth,clientAuth",
        "subjectAltName=" + ",".join(certificate_names(namespace)),
    )
    openssl_certificate(crt, key, f"{OPERATOR_SERVICE}.{namespace}.svc", ca=(ca, folder / "ca.key"), extensions=leaf)
    return folder


def crd_files() -> list[Path]:
    """The CRDs of the KEDA that runs: from its Go module (the build downloaded it)."""
    found = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=False)
    module = Path(found.stdout.strip()) / f"github.com/kedacore/keda/v2@{toolchain.KEDA_VERSION}"
    files = sorted((module / "config" / "crd" / "bases").glob("*.yaml"))
    if found.returncode != 0 or not files:
        raise ComponentError(f"KEDA's CRDs not found under {module}/config/crd/bases: is its Go module downloaded?")
    return files


def install_missing_crds(platform: LocalPlatform) -> list[str]:
    """KEDA's CRDs the API server lacks (its operator cannot watch an unknown kind); the ones
    already there (../shared/third_party/crds) stay as they are. Returns the names installed."""
    known = set(platform.kubectl("get", "crd", "-o", "name").stdout.split())
    missing = [f for f in crd_files() if f"customresourcedefinition.apiextensions.k8s.io/{_crd_name(f)}" not in known]
    if not missing:
        return []
    args = ["apply", "--server-side", f"--field-manager={FIELD_MANAGER}"]
    for path in missing:
        args += ["-f", str(path)]
    result = platform.kubectl(*args, check=False)
    if result.returncode != 0:
        raise ComponentError(f"installing KEDA's CRDs failed:\n{result.stderr[-2000:]}")
    names = [_crd_name(f) for f in missing]
    platform.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names


def _crd_name(path: Path) -> str:
    """``keda.sh_scaledjobs.yaml`` → ``scaledjobs.keda.sh`` (controller-gen's file names)."""
    group, plural = path.stem.split("_", 1)
    return f"{plural}.{group}"


def start_keda(platform: LocalPlatform, *, namespace: str = NAMESPACE, timeout_s: float = 120.0) -> KedaServer:
    """Start KEDA's operator and adapter as processes of ``platform``; returns once the external
    metrics API is Available through the API server (a real aggregated request). On failure
    nothing is left behind: no process, no APIService."""
    kubeconfig = platform.endpoints.kubeconfig
    if kubeconfig is None:
        raise ComponentError("KEDA needs the platform's kube-apiserver: start the platform with it")
    binaries = toolchain.keda_binaries()
    home = platform.base_dir / "keda"
    cert_dir = issue_certificates(home / "certs", namespace)
    ca_dir = home / "custom-ca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    env = keda_env(kubeconfig, namespace)
    ports = {k: platform.port(f"keda-operator-{k}") for k in ("metrics", "probe", "grpc")}
    adapter_ports = {"https": platform.port("keda-adapter"), "metrics": platform.port("keda-adapter-metrics")}
    adapter_ports["grpc"] = ports["grpc"]
    install_missing_crds(platform)
    try:
        operator = platform.spawn(
            "keda-operator", operator_argv(binaries["keda-operator"], cert_dir, ca_dir, ports), env=env
        )
        probe = f"http://127.0.0.1:{ports['probe']}/readyz"
        wait_ready(operator, lambda: _get(probe) == "ok", timeout_s)
        argv = adapter_argv(binaries["keda-adapter"], cert_dir, kubeconfig, adapter_ports)
        adapter = platform.spawn("keda-adapter", argv, env=env)
        apply(platform, api_objects(namespace, adapter_ports["https"], (cert_dir / "ca.crt").read_bytes()))
        _wait_available(platform, adapter, timeout_s)
    except BaseException:
        stop_keda(platform)
        raise
    return KedaServer(operator, adapter, cert_dir, namespace, adapter_ports["https"], ports["grpc"])


def stop_keda(platform: LocalPlatform) -> None:
    """Remove the APIService (so discovery stays whole), then stop the adapter and the operator."""
    if platform.endpoints.kubeconfig is not None and "kube-apiserver" in platform.processes:
        platform.kubectl("delete", "apiservice", API_SERVICE, "--ignore-not-found", "--wait=false", check=False)
    platform.stop_component("keda-adapter")
    platform.stop_component("keda-operator")


def apply(platform: LocalPlatform, objects: list[dict[str, Any]]) -> None:
    document = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    args = ["apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}", "-f", "-"]
    result = platform.kubectl(*args, stdin=document, check=False)
    if result.returncode != 0:
        raise ComponentError(f"applying KEDA's API objects failed:\n{result.stderr[-2000:]}")


def api_service_condition(platform: LocalPlatform) -> dict[str, Any]:
    """The APIService's ``Available`` condition ({} when there is none yet)."""
    result = platform.kubectl("get", "apiservice", API_SERVICE, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    conditions = json.loads(result.stdout).get("status", {}).get("conditions") or []
    return next((dict(c) for c in conditions if c.get("type") == "Available"), {})


def _wait_available(platform: LocalPlatform, adapter: ManagedProcess, timeout_s: float) -> None:
    try:
        wait_ready(adapter, lambda: api_service_condition(platform).get("status") == "True", timeout_s)
    except ComponentError as exc:
        condition = api_service_condition(platform)
        reason = f"{condition.get('reason')}: {condition.get('message')}" if condition else "no condition"
        raise ComponentError(f"{exc}\nAPIService {API_SERVICE} is not Available ({reason})") from None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=1.0) as resp:
        return str(resp.read().decode())


def external_metric(platform: LocalPlatform, namespace: str, metric: str, scaled_object: str) -> Decimal:
    """The value the HPA gets for ``metric`` of ``scaled_object``, through the API server."""
    result = platform.kubectl("get", "--raw", metric_path(namespace, metric, scaled_object), check=False)
    if result.returncode != 0:
        raise ExternalMetricError(result.stderr.strip()[-2000:])
    items = json.loads(result.stdout).get("items") or []
    if len(items) != 1:
        raise ExternalMetricError(f"{metric}: expected one value, got {len(items)}: {result.stdout[:500]}")
    return parse_quantity(str(items[0]["value"]))


__all__ = [
    "API_SERVICE",
    "NAMESPACE",
    "ExternalMetricError",
    "KedaServer",
    "adapter_argv",
    "api_objects",
    "api_service_condition",
    "certificate_names",
    "crd_files",
    "external_metric",
    "install_missing_crds",
    "issue_certificates",
    "keda_env",
    "metric_path",
    "operator_argv",
    "parse_quantity",
    "start_keda",
    "stop_keda",
]
