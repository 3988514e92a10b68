"""Pure parts of the cluster mode: image archives, platform Services, values, crash detection.

No node needed (these tests use no fixture); they sit beside the node tests they support.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from openledger.local import image, node
from openledger.local.cluster import PLATFORM_NAMESPACE, platform_services
from openledger.local.images import ImageFile, ImageSpec, layer_tar, oci_archive
from openledger.local.platform import LocalPlatform
from openledger.local.product_cluster import DATABASE_SECRET, REDIS_SECRET, chart_values, crash_looping

SPEC = ImageSpec(
    name="openledger.local/test:1",
    files=(ImageFile("/bin/tool", b"\x7fELF-not-really"), ImageFile("/bin/sh", link="tool")),
    entrypoint=("/bin/tool",),
)


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_an_image_archive_is_byte_for_byte_reproducible() -> None:
    """The cache key is the archive's hash: the same inputs must give the same bytes."""
    assert oci_archive(SPEC) == oci_archive(SPEC)
    changed = ImageSpec(name=SPEC.name, files=(ImageFile("/bin/tool", b"other"),), entrypoint=SPEC.entrypoint)
    assert oci_archive(changed) != oci_archive(SPEC)


def test_the_archive_names_the_image_for_ctr_import_and_holds_the_layer() -> None:
    members = _members(oci_archive(SPEC))
    index = json.loads(members["index.json"])
    annotations = index["manifests"][0]["annotations"]
    assert annotations["io.containerd.image.name"] == "openledger.local/test:1"
    manifest = json.loads(members["blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]])
    layer = members["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert entries["bin/sh"].issym() and entries["bin/sh"].linkname == "tool"
    assert entries["bin/tool"].mode == 0o755 and entries["bin"].isdir()
    assert layer == layer_tar(SPEC.files)


def test_platform_services_point_pods_at_the_host_address_of_each_component(tmp_path: Path) -> None:
    platform = LocalPlatform(tmp_path, detached=False, cluster=True)
    platform.ports.update({"postgres": 5433, "redis": 6380, "anvil": 8546})
    objects: list[dict[str, Any]] = platform_services(platform)
    slices = {o["metadata"]["name"]: o for o in objects if o["kind"] == "EndpointSlice"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert set(services) == {"postgres", "redis", "anvil"}
    redis: dict[str, Any] = slices["redis-host"]
    assert redis["metadata"]["namespace"] == PLATFORM_NAMESPACE
    assert redis["metadata"]["labels"] == {"kubernetes.io/service-name": "redis"}
    assert redis["endpoints"][0]["addresses"] == [node.HOST_IP]
    assert redis["ports"][0]["port"] == 6380
    assert "selector" not in services["redis"]["spec"]


def test_values_use_the_built_image_never_pull_and_urls_only_through_secrets() -> None:
    values = chart_values("ghcr.io/openledger/openledger", "0.1.0-abc", {"database": True, "redis": True})
    assert values["image"] == {"repository": "ghcr.io/openledger/openledger", "tag": "0.1.0-abc", "pullPolicy": "Never"}
    assert values["database"] == {"existingSecret": {"name": DATABASE_SECRET, "key": "database-url"}}
    assert values["redis"] == {"url": "", "existingSecret": {"name": REDIS_SECRET, "key": "redis-url"}}
    assert "postgresql://" not in json.dumps(values) and "redis://" not in json.dumps(values)
    # A chart without a database section gets no key its schema would refuse.
    assert "database" not in chart_values("r", "t", {"database": False, "redis": True})


def _pod(name: str, created: str, restarts: int, reason: str, init: bool = False) -> dict[str, Any]:
    status = {"restartCount": restarts, "name": "main", "state": {"waiting": {"reason": reason}}}
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": {key: [status]}}


def test_crash_loops_of_this_install_are_reported_and_old_revisions_ignored() -> None:
    pods = {
        "items": [
            _pod("old", "2026-01-01T00:00:00Z", 9, "CrashLoopBackOff"),
            _pod("new-init", "2026-01-01T00:10:00Z", 2, "CrashLoopBackOff", init=True),
            _pod("new-starting", "2026-01-01T00:10:00Z", 5, "ContainerCreating"),
            _pod("new-once", "2026-01-01T00:10:00Z", 1, "CrashLoopBackOff"),
        ]
    }
    assert crash_looping(pods, since="2026-01-01T00:05:00Z") == [("new-init", "main")]
    assert ("old", "main") in crash_looping(pods)


def test_the_image_constraints_pin_every_dependency_of_pyproject_within_its_range() -> None:
    """constraints/image.txt is not stale: each pyproject dependency, and all it needs, pinned inside its range."""
    pins = _pins(image.ROOT / image.CONSTRAINTS)
    for line in image.runtime_requirements():
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not pinned in {image.CONSTRAINTS}: regenerate it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(requirement))
    # The closure from this venv's metadata (names: versions may move between venvs of the same ranges).
    needed = set(image.pinned_closure(image.runtime_requirements(), image.installed_distributions()))
    assert needed <= set(pins), f"not pinned in {image.CONSTRAINTS}: {sorted(needed - set(pins))}"


def test_the_constraints_follow_extras_and_markers_and_name_what_is_missing() -> None:
    installed = {
        "a": ("1.0", ["b[fast]>=1", "c; extra == 'dev'", "d; python_version < '3'", "f; python_version >= '3.12'"]),
        "b": ("2.0", ["e; extra == 'fast'", "g; python_full_version < '3.11.3'"]),  # the image's 3.11.2: needed
        "c": ("3.0", []),
        "e": ("4.0", []),
        "g": ("5.0", []),
    }
    base = {"a": "1.0", "b": "2.0", "e": "4.0", "g": "5.0"}
    assert image.pinned_closure(["a>=1"], installed) == base
    assert image.pinned_closure(["a[dev]"], installed) == {**base, "c": "3.0"}
    with pytest.raises(image.ImageError, match="zz is required but not installed"):
        image.pinned_closure(["zz"], installed)


def test_the_constraints_file_is_part_of_the_image_key_and_the_build() -> None:
    assert str(image.CONSTRAINTS) in image.CONTEXT
    containerfile = (image.ROOT / "Containerfile").read_text()
    assert f"COPY {image.CONSTRAINTS} " in containerfile and "--constraint /src/constraints.txt" in containerfile
    for ignore in (".containerignore", ".dockerignore"):  # buildah's and docker's build context
        assert f"!{image.CONSTRAINTS}" in (image.ROOT / ignore).read_text().splitlines(), ignore


def _pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins
