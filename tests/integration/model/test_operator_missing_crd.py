"""Without KServe's CRD the Model says so (condition + Event) and the operator keeps
running; once KServe is installed, the Model deploys without a restart.

This needs an API server without the KServe CRD, so it starts its own small one
(etcd + kube-apiserver with only the project's CRDs) instead of touching the shared one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from openledger.local.platform import LocalPlatform, shared_crd_dir

from .conftest import Kube, Launcher, model_manifest, wait_for


@pytest.fixture
def bare_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalPlatform, Path | None]]:
    real_crds = shared_crd_dir()
    base = Path(tempfile.mkdtemp(prefix="openledger-bare-"))
    empty = base / "no-third-party-crds"
    empty.mkdir()
    monkeypatch.setenv("OPENLEDGER_THIRD_PARTY_CRDS", str(empty))
    platform = LocalPlatform(base, detached=False, durable=False, components=["etcd", "kube-apiserver"])
    platform.start()
    try:
        yield platform, real_crds
    finally:
        platform.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_missing_inference_service_crd_is_a_condition_and_an_event_not_a_crash_loop(
    bare_platform: tuple[LocalPlatform, Path | None], platform_env: dict[str, str], tmp_path: Path
) -> None:
    platform, crd_dir = bare_platform
    assert crd_dir is not None, "the KServe CRD is needed to finish this test"
    kubeconfig = platform.endpoints.kubeconfig
    assert kubeconfig is not None
    kube = Kube(kubernetes.config.new_client_from_config(config_file=str(kubeconfig)))
    assert "inferenceservices.serving.kserve.io" not in platform.kubectl("get", "crd", "-o", "name").stdout

    launcher = Launcher({**platform_env, "KUBECONFIG": str(kubeconfig)}, tmp_path)
    try:
        op = launcher(namespaces=["default"], operator_crd_retry_s=1)
        kube.create_model(model_manifest("early", "default"))

        model = wait_for(
            lambda: (m := kube.model("default", "early")) and (m.get("status") or {}).get("conditions") and m,
            what="a status on the Model",
        )
        ready = next(c for c in model["status"]["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InferenceServiceCRDMissing")
        assert "install KServe" in ready["message"]
        assert model["status"]["phase"] == "Pending"
        warnings = wait_for(
            lambda: [e for e in kube.events("default", "early") if e.reason == "InferenceServiceCRDMissing"],
            what="the Warning event",
        )
        assert warnings[0].type == "Warning"
        assert op.process.alive() and op.readyz()["controllers"]

        platform.kubectl(
            "apply", "--server-side", "-f", str(crd_dir / "kserve" / "serving.kserve.io_inferenceservices.yaml")
        )
        wait_for(lambda: kube.isvc("default", "early"), 60, "the InferenceService once KServe is installed")
        wait_for(lambda: kube.phase("default", "early") == "Deploying", 30, "the Model to deploy")
        assert op.process.alive()
    finally:
        launcher.stop_all()
