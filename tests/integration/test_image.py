"""The product image as `make image` builds it, loaded into a private containerd and run.

The image is cached by the hash of its inputs (``~/.cache/openledger/images``), so
this test builds it only when the Containerfile or the code changed. The
containerd here is a throwaway one (its own root, state and socket in a temp
folder), stopped at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from openledger.local import image
from openledger.local.processes import spawn
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
NAMESPACE = "openledger-image-test"


@pytest.fixture(scope="module")
def built() -> image.BuiltImage:
    return image.build()


@pytest.fixture(scope="module")
def containerd() -> Iterator[str]:
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (make system-deps)")
    folder = Path(tempfile.mkdtemp(prefix="ol-ctrd-"))
    socket = folder / "containerd.sock"
    (folder / "config.toml").write_text(
        "version = 2\n"
        f'root = "{folder / "root"}"\nstate = "{folder / "state"}"\n'
        f'[grpc]\n  address = "{socket}"\n[ttrpc]\n  address = "{socket}.ttrpc"\n'
        '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
    )
    process = spawn(
        "containerd", ["containerd", "--config", str(folder / "config.toml")], folder / "log", detached=False
    )
    try:
        wait_for(lambda: _ctr(str(socket), "version").returncode == 0, timeout_s=30, what="the private containerd")
        yield str(socket)
    finally:
        process.stop()
        subprocess.run(["umount", "--recursive", "--lazy", str(folder / "state")], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _ctr(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["ctr", "--address", address, "-n", NAMESPACE, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def _run(address: str, reference: str, name: str, *command: str) -> subprocess.CompletedProcess[str]:
    # As the chart runs it: read-only root, the image's user, only /tmp writable.
    mount = ["--mount", "type=tmpfs,destination=/tmp,options=rw"]
    return _ctr(address, "run", "--rm", "--read-only", *mount, reference, name, *command)


def _config(archive: Path) -> dict[str, object]:
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> dict[str, object]:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            assert member is not None
            return dict(json.load(member))

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        [manifest_ref] = json.load(index_file)["manifests"]
        manifest = blob(manifest_ref["digest"])
        return blob(manifest["config"]["digest"])  # type: ignore[index]


def test_the_image_runs_the_product_read_only_as_uid_65532(built: image.BuiltImage, containerd: str) -> None:
    assert built.archive.exists() and 0 < built.size_bytes < 500e6
    config = _config(built.archive)["config"]
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["openledger"]  # type: ignore[index]
    labels = config["Labels"]  # type: ignore[index]
    assert labels["org.opencontainers.image.version"] == image.project_version()
    assert labels["org.opencontainers.image.source"]

    imported = _ctr(containerd, "images", "import", str(built.archive))
    assert imported.returncode == 0, imported.stderr
    assert built.keyed_reference in _ctr(containerd, "images", "ls", "-q").stdout

    version = _run(containerd, built.keyed_reference, "ol-version", "openledger", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"openledger {image.project_version()}"
    probe = (
        "import os, importlib.util as u; "
        "import openledger.controllers.runner, openledger.gateway.app, openledger.settlement.ledger.worker; "
        # The native extensions (their debug symbols were stripped in the build) still load.
        "import uvloop, hiredis, psycopg, pydantic_core, yaml, regex, cytoolz, sqlalchemy, aiohttp, ckzg; "
        "psycopg.connect; uvloop.new_event_loop().close(); "
        "print(os.getuid(), [m for m in ('kserve', 'sklearn', 'llama_cpp') if u.find_spec(m)], "
        "os.access('/opt/openledger', os.W_OK), os.access('/tmp', os.W_OK))"
    )
    checked = _run(containerd, built.keyed_reference, "ol-probe", "python", "-c", probe)
    assert checked.returncode == 0, checked.stderr
    # Non-root; no model serving; the root filesystem read-only, /tmp writable.
    assert checked.stdout.split() == ["65532", "[]", "False", "True"]
    compilers = _run(containerd, built.keyed_reference, "ol-cc", "sh", "-c", "command -v gcc cc || echo none")
    assert compilers.stdout.strip() == "none"
