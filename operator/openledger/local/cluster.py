"""``make cluster``: the local platform in cluster mode, with the product installed by Helm.

The platform (etcd, kube-apiserver, PostgreSQL, Redis, anvil) starts as for
``make up``; then a real node (:mod:`openledger.local.node`); then the product:
the image ``make image`` built is imported into containerd and
``helm install openledger charts/openledger -n openledger-system`` runs from
the checkout. ``.local/env`` carries the same variables as after ``make up``;
the in-cluster gateway is reached from the host through its Service's
cluster IP (kube-proxy's rules apply to the host's own traffic too).

Pods reach the platform's PostgreSQL, Redis and anvil on the bridge's host
address (``10.213.0.1``), through selector-less Services in the namespace
``openledger-platform`` (``postgres``, ``redis``, ``anvil``), so the chart
sees ordinary in-cluster DNS names and never needs host networking.

Model serving: real KServe (:mod:`openledger.local.kserve`, Standard mode) is installed
before the product, so the operator's first InferenceService is already KServe's. The
models a CPU node can serve live on the ``models`` claim of namespace ``default``
(``pvc://models/smollm2``: the LLM, format gguf; ``pvc://models/iris``: sklearn);
``openledger local models-volume <namespace> | kubectl apply -f -`` offers them to
another namespace. The serving stand-in is for plain ``make up`` only.
"""

from __future__ import annotations

import time
from pathlib import Path

from openledger.local import kserve, node
from openledger.local.platform import LocalPlatform, describe, read_state, stop_detached
from openledger.local.processes import ComponentError
from openledger.local.toolchain import ToolchainError

PLATFORM_NAMESPACE = "openledger-platform"
PRODUCT_NAMESPACE = "openledger-system"
RELEASE = "openledger"
MODELS_NAMESPACE = "default"  # where `make cluster` offers the models claim


class ClusterError(RuntimeError):
    """The cluster could not come up; the message says which step and why."""


def up(base: Path, *, product: bool = True) -> str:
    """Start (or keep) the cluster-mode platform under ``base``; returns a report for the terminal."""
    rows = describe(base)
    if rows and all(alive for _, _, alive, _ in rows) and read_state(base).get("mode") == "cluster":
        return f"already up in cluster mode; `source {base / 'env'}` (make down to stop)"
    previous_ports = dict(read_state(base).get("ports") or {})  # type: ignore[call-overload]
    stop_detached(base)
    started = time.monotonic()
    platform = LocalPlatform(base, detached=True, cluster=True)
    # The same ports as last time: the cluster's objects (Service endpoints, the API server's own
    # `kubernetes` endpoints) keep pointing at the right place across make down / make cluster.
    platform.ports.update({name: port for name, port in previous_ports.items() if _port_free(int(port))})
    try:
        platform.start()
        apply_platform_services(platform)
        timings = {"platform and node": time.monotonic() - started}
        timings.update(install_serving(platform))
        if product:
            from openledger.local.product_cluster import install_product

            timings.update(install_product(platform))
    except (ComponentError, ToolchainError) as exc:
        platform.stop()
        raise ClusterError(str(exc)) from None
    except BaseException:
        platform.stop()
        raise
    platform.write_state()
    lines = [f"local cluster up in {time.monotonic() - started:.1f} s (state in {base})"]
    lines += [f"  {step}: {seconds:.1f} s" for step, seconds in timings.items()]
    lines += [f"  {name:<24} pid {pid:<8} log {log}" for name, pid, _, log in describe(base)]
    lines += [f"  {key}={value}" for key, value in platform.endpoints.as_env().items()]
    lines.append(f"source {base / 'env'} to use it; `make down` stops everything")
    return "\n".join(lines)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def platform_services(platform: LocalPlatform) -> list[dict[str, object]]:
    """Selector-less Services (and their EndpointSlices) for the host's PostgreSQL, Redis and anvil."""
    objects: list[dict[str, object]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLATFORM_NAMESPACE}}
    ]
    for name in ("postgres", "redis", "anvil"):
        port = platform.ports[name]
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": PLATFORM_NAMESPACE},
                "spec": {"ports": [{"name": "main", "port": port, "targetPort": port, "protocol": "TCP"}]},
            }
        )
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-host",
                    "namespace": PLATFORM_NAMESPACE,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [node.HOST_IP], "conditions": {"ready": True}}],
            }
        )
    return objects


def apply_platform_services(platform: LocalPlatform) -> None:
    node.apply(platform.kubectl, platform_services(platform))


def install_serving(platform: LocalPlatform) -> dict[str, float]:
    """Real KServe on the node, with the models claim in ``default``; returns step timings."""
    timings = kserve.install_kserve(platform, (MODELS_NAMESPACE,))
    return {f"kserve: {step}": seconds for step, seconds in timings.items()}


def build_images() -> dict[str, str]:
    """Every image ``make cluster`` loads that takes minutes cold: the product's, KServe's controller and
    the serving image, each from the cache when its inputs did not change; returns name -> archive.

    ``make test`` runs it first (as it builds the toolchain), so no test's timeout pays for a cold build.
    """
    from openledger.local import image

    _, serving = kserve.serving_image()
    return {
        "product": str(image.build().archive),
        "kserve-controller": str(kserve.controller_archive()),
        "serving": str(serving),
    }


def in_cluster_url(platform: LocalPlatform, name: str) -> str:
    """The URL a pod uses for the platform component ``name`` (a Service DNS name)."""
    host = f"{name}.{PLATFORM_NAMESPACE}.svc.{node.CLUSTER_DOMAIN}"
    port = platform.ports[name]
    if name == "postgres":
        return f"postgresql://postgres@{host}:{port}/openledger"
    if name == "redis":
        return f"redis://{host}:{port}/0"
    return f"http://{host}:{port}"
