"""Tiny OCI images made on this machine, for a node that cannot reach a registry.

An image here is one uncompressed layer of a few files (a static binary and the
links to it), written as an OCI image layout archive that ``ctr images import``
loads into containerd. Layers are built byte-for-byte reproducibly (fixed
mtimes, owners and order), so an archive is cached by the hash of its inputs
under ``~/.cache/openledger/images/`` and rebuilt only when an input changes.

- ``pause``: the sandbox image, ``pause.c`` from the Kubernetes module compiled
  with ``gcc -static`` (what ``registry.k8s.io/pause`` ships).
- ``busybox``: Debian's ``busybox-static`` with its applet links, for test pods.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from openledger.local import toolchain

PAUSE_IMAGE = "openledger.local/pause:3.10"
BUSYBOX_IMAGE = "openledger.local/busybox:1.35"
_BUSYBOX_APPLETS = (
    *("sh", "sleep", "cat", "echo", "printf", "head", "grep", "mkdir", "readlink", "ls", "env", "true", "hostname"),
    *("wget", "nc", "nslookup", "httpd"),
)


@dataclass(frozen=True)
class ImageFile:
    """One regular file or symlink in the layer (``link`` set: a symlink to it)."""

    path: str
    data: bytes = b""
    mode: int = 0o755
    link: str = ""


@dataclass(frozen=True)
class ImageSpec:
    name: str  # the full reference, e.g. openledger.local/pause:3.10
    files: tuple[ImageFile, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def layer_tar(files: tuple[ImageFile, ...]) -> bytes:
    """A reproducible tar of ``files`` and their parent folders."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = sorted({str(p) for f in files for p in Path(f.path.lstrip("/")).parents if str(p) != "."})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for item in sorted(files, key=lambda f: f.path):
            info = tarfile.TarInfo(item.path.lstrip("/"))
            info.mtime, info.mode = 0, item.mode
            if item.link:
                info.type, info.linkname = tarfile.SYMTYPE, item.link
                tar.addfile(info)
            else:
                info.size = len(item.data)
                tar.addfile(info, io.BytesIO(item.data))
    return buffer.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def oci_archive(spec: ImageSpec) -> bytes:
    """The OCI image layout (as a tar) of a one-layer linux/amd64 image."""
    blobs: dict[str, bytes] = {}
    layer = layer_tar(spec.files)
    layer_digest = _blob(blobs, layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": list(spec.entrypoint),
            "Cmd": list(spec.cmd) or None,
            "User": spec.user,
            "Labels": spec.labels,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "openledger.local.images"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = _blob(blobs, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = _blob(blobs, manifest_bytes)
    tag = spec.name.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": spec.name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    members = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in sorted(blobs.items())},
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def cached_archive(spec: ImageSpec) -> Path:
    """The archive of ``spec`` under the cache, written once per distinct content."""
    data = oci_archive(spec)
    key = hashlib.sha256(data).hexdigest()[:16]
    safe = spec.name.replace("/", "_").replace(":", "_")
    path = toolchain.cache_root() / "images" / f"{safe}-{key}.tar"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(path)
    return path


# ------------------------------------------------------------------ the images


def _pause_binary() -> Path:
    """``pause`` compiled once from the Kubernetes module's ``build/pause/linux/pause.c``."""

    def build(dest: Path) -> None:
        source = _kubernetes_module_dir() / "build" / "pause" / "linux" / "pause.c"
        gcc = shutil.which("gcc")
        if gcc is None:
            raise toolchain.ToolchainError("`gcc` is not on PATH: apt-get install gcc libc6-dev")
        proc = subprocess.run(
            [gcc, "-static", "-Os", "-DVERSION=3.10", "-o", str(dest / "pause"), str(source)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise toolchain.ToolchainError(f"compiling {source} failed:\n{proc.stderr[-2000:]}")
        subprocess.run(["strip", str(dest / "pause")], check=False, capture_output=True)

    return toolchain._cached("pause", toolchain.KUBERNETES_VERSION, ["pause"], build) / "pause"


def _kubernetes_module_dir() -> Path:
    with tempfile.TemporaryDirectory(prefix="ol-kmod-") as tmp:
        out = toolchain._run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{toolchain.KUBERNETES_VERSION}"],
            cwd=Path(tmp),
            env={"GOFLAGS": "-mod=mod", "GOWORK": "off"},
        )
    return Path(json.loads(out)["Dir"])


def pause_spec() -> ImageSpec:
    binary = _pause_binary().read_bytes()
    return ImageSpec(name=PAUSE_IMAGE, files=(ImageFile("/pause", binary),), entrypoint=("/pause",), user="65535")


def busybox_spec() -> ImageSpec:
    source = Path("/bin/busybox")
    if not source.exists() or b"linux-vdso" in source.read_bytes()[:4096]:
        raise toolchain.ToolchainError("/bin/busybox not found: apt-get install busybox-static")
    files = [ImageFile("/bin/busybox", source.read_bytes())]
    files += [ImageFile(f"/bin/{applet}", link="busybox") for applet in _BUSYBOX_APPLETS]
    return ImageSpec(name=BUSYBOX_IMAGE, files=tuple(files), entrypoint=(), cmd=("/bin/sh",))


COREDNS_IMAGE = f"openledger.local/coredns:{toolchain.COREDNS_VERSION.lstrip('v')}"


def coredns_spec() -> ImageSpec:
    binary = toolchain.coredns_binary().read_bytes()
    return ImageSpec(name=COREDNS_IMAGE, files=(ImageFile("/coredns", binary),), entrypoint=("/coredns",))
