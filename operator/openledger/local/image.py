"""``make image``: the product image, built here without any container registry.

No registry is reachable from these machines, so the base images are made from
Debian packages: ``mmdebstrap`` writes a bookworm root filesystem (its python3
is 3.11) from the mirror apt is configured with, ``buildah`` imports it as an
image, and the repository's ``Containerfile`` is built on it with
``--build-arg BASE=...``. A user with Docker builds the same Containerfile on
its default base (``python:3.11-slim-bookworm``).

Every image is cached by the hash of its inputs under
``~/.cache/openledger/images/``: a base by its package list, suite and mirror;
the product image by the Containerfile, the build context and the bases. The
product image leaves as an OCI archive that ``ctr images import`` loads into
containerd (``make cluster``) and that ``buildah``/``podman`` can push anywhere.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("OPENLEDGER_CACHE", Path.home() / ".cache" / "openledger")) / "images"
REPOSITORY = "ghcr.io/openledger/openledger"
KEEP_BUILDS = 3  # product builds kept in the cache (a rollback target and the one before)
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What the Containerfile copies; only these files make the product image's key.
CONTEXT = (
    "Containerfile",
    ".containerignore",
    "pyproject.toml",
    "constraints/image.txt",
    "README.md",
    "operator",
    "controllers",
    "gateway",
    "settlement",
)
# Docs, man pages and translations never reach an image.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")
BASES: dict[str, tuple[str, ...]] = {
    # The runtime: python3 and the CA bundle, nothing that compiles.
    "runtime": ("python3", "ca-certificates"),
    # The build stage also needs venv (ensurepip) to install the wheels, and strip (binutils)
    # to drop the debug symbols some wheels ship (uvloop's alone are 10 MB).
    "builder": ("python3", "python3-venv", "ca-certificates", "binutils"),
}


# The exact versions the image installs: pyproject's dependencies and all they need, as the tested venv has them.
CONSTRAINTS = Path("constraints") / "image.txt"
CONSTRAINTS_HEADER = (
    "# The image's Python packages, pinned to the versions of the tested virtualenv: pyproject.toml's\n"
    "# [project] dependencies and everything they require. Regenerate after a dependency change:\n"
    "#   .venv/bin/python -m openledger.local.image --constraints > constraints/image.txt\n"
)
# The image's interpreter (Debian 12's python3), for the dependencies' environment markers.
IMAGE_PYTHON = "3.11.2"
# Needed by the image's Python only, so absent from a newer venv: redis wants async-timeout
# below 3.11.3. The version pip resolved for the image when it was first built unpinned.
IMAGE_ONLY_PINS: dict[str, tuple[str, list[str]]] = {"async-timeout": ("5.0.1", [])}


class ImageError(RuntimeError):
    """A build step failed; the message names the step and its output."""


@dataclass(frozen=True)
class BuiltImage:
    reference: str  # the versioned tag; the same image is also tagged <version>-<key>
    keyed_reference: str
    archive: Path  # OCI archive for `ctr images import` (cached by key)
    size_bytes: int  # the unpacked size of the image's layers


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses (deb822 or one-line sources), else deb.debian.org."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return str(uri).rstrip("/")
    return DEFAULT_MIRROR


def base_key(packages: tuple[str, ...], mirror: str) -> str:
    spec = {"suite": SUITE, "mirror": mirror, "packages": sorted(packages), "excludes": DPKG_EXCLUDES, "v": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def context_files(root: Path = ROOT) -> list[Path]:
    """The build context as git sees it: tracked and untracked files, ignored ones left out."""
    out = _run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard", "--", *CONTEXT], "list context")
    names = sorted({name for name in out.split("\0") if name and "__pycache__" not in name})
    return [root / name for name in names if (root / name).is_file() or (root / name).is_symlink()]


def image_key(files: list[Path], bases: dict[str, str], root: Path = ROOT) -> str:
    digest = hashlib.sha256(json.dumps(bases, sort_keys=True).encode())
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def project_version(root: Path = ROOT) -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.M)
    if not match:
        raise ImageError("pyproject.toml has no [project] version")
    return match.group(1)


def base_reference(name: str, mirror: str) -> str:
    return f"localhost/openledger-base-{name}:{base_key(BASES[name], mirror)}"


def ensure_base(name: str, mirror: str) -> str:
    """The base image's reference in buildah's store, made from Debian packages on first use."""
    return ensure_packages_base(name, BASES[name], mirror)


def ensure_packages_base(name: str, packages: tuple[str, ...], mirror: str) -> str:
    """A base of ``packages`` named ``localhost/openledger-base-<name>:<key>`` (other images' bases too)."""
    reference = f"localhost/openledger-base-{name}:{base_key(packages, mirror)}"
    if _exists(reference):
        return reference
    tarball = CACHE / f"base-{name}-{base_key(packages, mirror)}.tar"
    if not tarball.exists():
        _need("mmdebstrap")
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        partial.unlink(missing_ok=True)  # left by an interrupted run
        argv = ["mmdebstrap", "--variant=essential", "--format=tar", "--include=" + ",".join(packages)]
        argv += ['--aptopt=Acquire::Languages "none"']
        argv += [f"--dpkgopt=path-exclude={glob}" for glob in DPKG_EXCLUDES]
        argv += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
        _log(f"making base image {name} from Debian packages ({', '.join(packages)})")
        _run([*argv, SUITE, str(partial), mirror], f"mmdebstrap {name}")
        partial.rename(tarball)
    _need("buildah")
    container = _run(["buildah", "from", "scratch"], "buildah from scratch").strip()
    try:
        _run(["buildah", "add", "--quiet", container, str(tarball), "/"], "import base")
        _run(["buildah", "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--env", "LANG=C.UTF-8", "--cmd", "/bin/sh", container], "configure base")  # fmt: skip
        _run(["buildah", "commit", "--quiet", "--rm", container, reference], "commit base")
    except BaseException:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
        raise
    return reference


@contextmanager
def build_lock() -> Iterator[None]:
    """One image build at a time per machine: make cluster, tests and make image may ask at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(root: Path = ROOT, *, force: bool = False) -> BuiltImage:
    """The product image for this checkout: from the cache, else built."""
    with build_lock():
        return _build(root, force=force)


def _build(root: Path, *, force: bool) -> BuiltImage:
    mirror = apt_mirror()
    bases = {name: base_reference(name, mirror) for name in BASES}
    version = project_version(root)
    key = image_key(context_files(root), bases, root)
    reference = f"{REPOSITORY}:{version}"
    keyed = f"{REPOSITORY}:{version}-{key}"
    archive = CACHE / f"openledger-{version}-{key}.oci.tar"
    meta = archive.with_suffix(".json")
    if archive.exists() and meta.exists() and not force:
        return BuiltImage(reference, keyed, archive, int(json.loads(meta.read_text())["size_bytes"]))
    for name in BASES:
        ensure_base(name, mirror)
    revision = _run(["git", "-C", str(root), "rev-parse", "HEAD"], "git revision").strip()
    _log(f"building {keyed}")
    argv = ["buildah", "bud", "--layers", "--file", str(root / "Containerfile"), "--tag", keyed, "--tag", reference]
    # RUN steps share the host's network: no CNI bridge, veth or iptables rule is left behind.
    argv += ["--network", "host"]
    argv += ["--build-arg", f"BASE={bases['runtime']}", "--build-arg", f"BUILDER_BASE={bases['builder']}"]
    argv += ["--build-arg", f"VERSION={version}", "--build-arg", f"REVISION={revision}"]
    bundle = _ca_bundle()
    if bundle is not None:  # PyPI through a TLS-inspecting proxy: its CA, for pip only, never in a layer
        argv += ["--secret", f"id=pip-ca,src={bundle}"]
    argv.append(str(root))
    _run(argv, "buildah bud", stream=True)
    size = _image_size(keyed)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        partial = Path(tmp) / archive.name
        # The archive names the keyed tag (`ctr images import` creates it); the chart's values name it.
        _run(["buildah", "push", "--quiet", keyed, f"oci-archive:{partial}:{keyed}"], "export OCI archive")
        partial.rename(archive)
    meta.write_text(json.dumps({"reference": reference, "keyed_reference": keyed, "size_bytes": size}))
    _prune(keep=KEEP_BUILDS)
    return BuiltImage(reference, keyed, archive, size)


def _prune(keep: int) -> None:
    """Only the newest ``keep`` product builds stay: their archives and buildah tags. The bases and
    the build stage's untagged layers stay (the dependency layer is what makes a rebuild fast)."""
    archives = sorted(CACHE.glob("openledger-*.oci.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[keep:]:
        keyed = f"{REPOSITORY}:{old.name.removeprefix('openledger-').removesuffix('.oci.tar')}"
        subprocess.run(["buildah", "rmi", keyed], capture_output=True, check=False)
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


def _ca_bundle() -> Path | None:
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    return system if system.is_file() else None


def _image_size(reference: str) -> int:
    """Bytes of the image's unpacked filesystem (what a node stores)."""
    container = _run(["buildah", "from", "--pull-never", reference], "size: buildah from").strip()
    try:
        root = _run(["buildah", "mount", container], "size: buildah mount").strip()
        return int(_run(["du", "-sb", root], "size: du").split()[0])
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def _exists(reference: str) -> bool:
    if shutil.which("buildah") is None:
        return False
    done = subprocess.run(["buildah", "inspect", "--type", "image", reference], capture_output=True, check=False)
    return done.returncode == 0


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"{tool} is not installed (make system-deps installs it: scripts/system-deps.sh)")


def _run(argv: list[str], step: str, *, stream: bool = False) -> str:
    """Run a build step; its output (or, with ``stream``, nothing: it went to stderr) or ImageError."""
    if stream:
        streamed = subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if streamed.returncode != 0:
            raise ImageError(f"{step} failed (exit {streamed.returncode}): {' '.join(argv)}")
        return ""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"{step} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def runtime_requirements(root: Path = ROOT) -> list[str]:
    """pyproject.toml's [project] dependencies (the image's; no extras, no dev or serving tools)."""
    import tomllib

    with (root / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def pinned_closure(requirements: list[str], installed: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """``{name: version}`` of ``requirements`` and all they require (extras followed), from ``installed``.

    ``installed`` maps a canonical name to its version and its ``Requires-Dist`` lines, as
    :func:`installed_distributions` reads them; markers are evaluated for the image's Python.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    python = {"python_version": IMAGE_PYTHON.rsplit(".", 1)[0], "python_full_version": IMAGE_PYTHON}
    pins: dict[str, str] = {}
    todo = [(Requirement(r), frozenset[str]()) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name not in installed:
            raise ImageError(f"{req.name} is required but not installed in this virtualenv")
        version, requires = installed[name]
        pins[name] = version
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**python, "extra": e}) for e in req.extras or {""}):
                todo.append((dep, frozenset()))
    return dict(sorted(pins.items()))


def installed_distributions() -> dict[str, tuple[str, list[str]]]:
    from importlib import metadata

    from packaging.utils import canonicalize_name

    found = {
        str(canonicalize_name(d.metadata["Name"])): (d.version, list(d.requires or []))
        for d in metadata.distributions()
    }
    return {**IMAGE_ONLY_PINS, **found}


def constraints_text(root: Path = ROOT) -> str:
    pins = pinned_closure(runtime_requirements(root), installed_distributions())
    return CONSTRAINTS_HEADER + "".join(f"{name}=={version}\n" for name, version in pins.items())


def _log(message: str) -> None:
    print(f"[openledger] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openledger.local.image", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds this key")
    parser.add_argument("--constraints", action="store_true", help=f"print {CONSTRAINTS} from this virtualenv")
    args = parser.parse_args(argv)
    if args.constraints:
        print(constraints_text(), end="")
        return 0
    try:
        image = build(force=args.force)
    except ImageError as exc:
        print(f"[openledger] image: {exc}", file=sys.stderr)
        return 1
    print(f"IMAGE={image.reference}")
    print(f"IMAGE_KEYED={image.keyed_reference}")
    print(f"IMAGE_ARCHIVE={image.archive}")
    print(f"IMAGE_SIZE_MB={image.size_bytes / 1e6:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
