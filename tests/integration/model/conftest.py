"""Fixtures for the Model controller and operator tests: a real operator process
against the real API server (with the real KServe CRD), a namespace per test,
and a stand-in for the KServe controller that patches InferenceService status.

Each operator here watches only ``ol-mdl-*`` namespaces (or the ones a test
names) and elects a leader on its own Lease, so it never meets the operators
that other tests start on the same shared API server.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from openledger.local.processes import ManagedProcess, free_port, spawn, stop_pid, tail, wait_ready
from tests.waiting import wait_for

GROUP, VERSION = "openledger.io", "v1alpha1"
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
OWNER = "0x" + "11" * 20
CONTRIBUTOR = "0x" + "22" * 20


def model_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": {"name": "huggingface", "version": "1"},
        "storageUri": f"hf://org/{name}",
        "owner": OWNER,
        "pricing": {"perInputToken": "0.000001", "perOutputToken": "0.000002"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Model",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


@dataclass
class Kube:
    """Thin synchronous helpers over the official client (assertions only)."""

    api: kubernetes.client.ApiClient
    objects: kubernetes.client.CustomObjectsApi = field(init=False)
    core: kubernetes.client.CoreV1Api = field(init=False)

    def __post_init__(self) -> None:
        self.objects = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)

    def create_model(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        ns = manifest["metadata"]["namespace"]
        kwargs = {"dry_run": "All"} if dry_run else {}
        return dict(self.objects.create_namespaced_custom_object(GROUP, VERSION, ns, "models", manifest, **kwargs))

    def model(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.objects.get_namespaced_custom_object(GROUP, VERSION, ns, "models", name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_model(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(self.objects.patch_namespaced_custom_object(GROUP, VERSION, ns, "models", name, patch))

    def delete_model(self, ns: str, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, ns, "models", name)

    def isvc(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.objects.get_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def isvcs(self, ns: str) -> list[dict[str, Any]]:
        return list(self.objects.list_namespaced_custom_object(*ISVC[:2], ns, ISVC[2])["items"])

    def patch_isvc(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(self.objects.patch_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], name, patch))

    def delete_isvc(self, ns: str, name: str) -> None:
        self.objects.delete_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], name)

    def kserve_status(self, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Play the KServe controller: write the InferenceService's status subresource."""
        return dict(
            self.objects.patch_namespaced_custom_object_status(*ISVC[:2], ns, ISVC[2], name, {"status": status})
        )

    def kserve_ready(self, ns: str, name: str, url: str | None = None, copies: int = 1) -> dict[str, Any]:
        isvc = self.isvc(ns, name)
        assert isvc is not None, f"no InferenceService {ns}/{name}"
        return self.kserve_status(ns, name, ready_status(isvc, url or f"http://{name}.{ns}.example.com", copies))

    def events(self, ns: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(ns).items if e.involved_object.name == name]

    def phase(self, ns: str, name: str) -> str | None:
        model = self.model(ns, name)
        return ((model or {}).get("status") or {}).get("phase")


def ready_status(isvc: dict[str, Any], url: str, copies: int = 1) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "url": url,
        "observedGeneration": isvc["metadata"]["generation"],
        "conditions": [
            {"type": "IngressReady", "status": "True", "lastTransitionTime": now},
            {"type": "PredictorReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
        "modelStatus": {"transitionStatus": "UpToDate", "copies": {"failedCopies": 0, "totalCopies": copies}},
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The local API server's certificate is self-signed (kubeconfig: insecure-skip-tls-verify).
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"))


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Kube:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    return Kube(api)


@pytest.fixture
def namespace(kube: Kube) -> str:
    """A fresh namespace per test (left behind: nothing deletes namespaces locally)."""
    name = f"ol-mdl-{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name}})
    return name


@dataclass
class Operator:
    process: ManagedProcess
    health_port: int
    metrics_port: int
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def readyz(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/readyz")[1]))

    def metrics(self) -> str:
        return self.get("/metrics", self.metrics_port)[1]

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not self.process.alive(), 10, "the operator to die")

    def stop(self) -> None:
        stop_pid(self.pid, signal.SIGTERM, 15)

    def log(self) -> str:
        return tail(self.process.log_path, 60)


OperatorFactory = Callable[..., Operator]


class Launcher:
    """Starts operators with one Lease name (so they elect among themselves) and stops them all."""

    def __init__(self, platform_env: dict[str, str], log_dir: Path) -> None:
        self.platform_env = platform_env
        self.log_dir = log_dir
        self.lease = f"ol-test-{secrets.token_hex(4)}"
        self.started: list[Operator] = []

    def __call__(
        self, namespaces: list[str] | None = None, wait_leader: bool = True, **settings: str | float
    ) -> Operator:
        health, metrics = free_port(), free_port()
        env = {
            **self.platform_env,
            "OPENLEDGER_HEALTH_PORT": str(health),
            "OPENLEDGER_METRICS_PORT": str(metrics),
            "OPENLEDGER_NAMESPACES": json.dumps(namespaces or ["ol-mdl-*"]),
            "OPENLEDGER_LEADER_LEASE_NAME": self.lease,
            "OPENLEDGER_LEADER_LEASE_DURATION_S": "4",
            "OPENLEDGER_LEADER_RENEW_PERIOD_S": "1",
            "OPENLEDGER_LOG_LEVEL": "INFO",
        }
        env.update({f"OPENLEDGER_{k.upper()}": str(v) for k, v in settings.items()})
        n = len(self.started)
        process = spawn(
            f"operator-{n}",
            [sys.executable, "-m", "openledger.cli", "operator"],
            self.log_dir / f"operator-{self.lease}-{n}.log",
            detached=False,
            env=env,
        )
        op = Operator(process, health, metrics, env)
        self.started.append(op)

        def ready() -> bool:
            body = op.readyz()
            return bool(body["controllers"]) if wait_leader else bool(body["ready"])

        wait_ready(process, ready, 60, "operator")
        return op

    def stop_all(self) -> None:
        for op in self.started:
            op.stop()


@pytest.fixture
def start_operator(platform_env: dict[str, str], tmp_path: Path) -> Iterator[OperatorFactory]:
    """Start ``openledger operator`` as a real process; all are stopped after the test."""
    launcher = Launcher(platform_env, tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def shared_operator(platform_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """One operator for a whole test module (watching every ol-mdl-* namespace)."""
    launcher = Launcher(platform_env, tmp_path_factory.mktemp("operator"))
    yield launcher()
    launcher.stop_all()
