"""A real Kubernetes node beside the local platform (``make cluster``).

What it adds to ``make up``'s etcd and kube-apiserver: containerd (Debian's
1.6) with runc and the bridge CNI plugin, kube-controller-manager,
kube-scheduler, a kubelet, kube-proxy (iptables mode) and CoreDNS as a
Deployment. Every pod lives in a network namespace containerd creates, on the
bridge ``olbr0`` (``10.213.0.0/24``, the host is ``10.213.0.1``); nothing is
routed off the machine: forwarding out of the bridge is dropped.

Why this combination works on these machines (cgroup v1, Debian 12):
- the kubelet is v1.36 like the API server; 1.35+ refuses cgroup v1 unless
  ``failCgroupV1: false``, which its config sets, with the cgroupfs driver;
- containerd 1.6 does not answer the CRI ``RuntimeConfig`` call; a v1.36
  kubelet then falls back to its own ``cgroupDriver`` (it logs that 1.37 drops
  the fallback, so the next Kubernetes bump needs containerd 2.x);
- no registry is reachable: the pause (sandbox) and test images are built here
  (:mod:`openledger.local.images`) and imported into containerd's ``k8s.io``
  namespace; pods use ``imagePullPolicy: Never`` or ``IfNotPresent``.

Everything the node makes is recorded or findable under ``<base>/node`` and
:func:`teardown` removes it: pods and containerd-shims, mounts below the node
folder, the bridge and leftover veths, the ``KUBE-*``/``CNI-*``/``OPENLEDGER-*``
iptables chains and the rules that jump to them, the cgroups under
``/openledger`` and the sysctls it changed (restored to their old values).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openledger.local import images, toolchain
from openledger.local.processes import ComponentError, ManagedProcess, pid_alive, stop_pid, wait_ready

log = logging.getLogger(__name__)

NODE_NAME = "openledger-node"
BRIDGE = "olbr0"
POD_SUBNET = "10.213.0.0/24"
HOST_IP = "10.213.0.1"
SERVICE_CIDR = "10.0.0.0/24"
DNS_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "openledger"
# Started in this order, stopped in the reverse one; kubelet and kube-proxy go first at teardown.
NODE_COMPONENTS = ("containerd", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
# (user, group) of the token each component authenticates with; the API server's bootstrap RBAC knows them.
COMPONENT_USERS = {
    "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
    "kube-controller-manager": ("system:kube-controller-manager", ""),
    "kube-scheduler": ("system:kube-scheduler", ""),
    "kube-proxy": ("system:kube-proxy", "system:node-proxier"),
}
_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/ipv4/conf/all/route_localnet",
)
_CHAIN_PREFIXES = ("KUBE-", "CNI-", "OPENLEDGER-")
# Paths the kubelet and libcni use whatever their config says; removed at teardown when the node made them.
_FIXED_PATHS = ("/var/lib/kubelet/device-plugins", "/var/lib/kubelet", "/var/log/containers", "/var/lib/cni/results")


def node_dir(base_dir: Path) -> Path:
    return base_dir / "node"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ComponentError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise ComponentError("make cluster runs a kubelet and containerd: run it as root")
    missing = [b for b in ("containerd", "ctr", "runc", "iptables", "ip", "conntrack") if not shutil.which(b)]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("containernetworking-plugins")
    if missing:
        raise ComponentError(f"missing for make cluster: {', '.join(missing)} (scripts/system-deps.sh installs them)")


# --------------------------------------------------------------------- network


# The bridge, its subnet and the cgroup root are the machine's: one node at a time, and this file says whose.
OWNER_FILE = Path("/run/openledger-node.owner")


def _socket_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(str(path)) == 0


# A node whose owner was just killed takes a moment to go (its containerd dies with the owner).
OWNER_GONE_WAIT_S = 15.0


def _still_answers(path: Path, wait_s: float) -> bool:
    """True when the socket keeps answering for ``wait_s`` (a live node), False once it stops."""
    deadline = time.monotonic() + wait_s
    while _socket_answers(path):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.5)
    return False


def claim_machine(base_dir: Path) -> None:
    """Refuse to start beside another live node; clean up after a dead one (e.g. a killed test run)."""
    if OWNER_FILE.exists():
        owner = Path(OWNER_FILE.read_text().strip())
        if owner != base_dir:
            if _still_answers(containerd_socket(owner), OWNER_GONE_WAIT_S):
                raise ComponentError(f"another local node runs from {owner}: stop it first (make down there)")
            teardown(owner, {})
    OWNER_FILE.write_text(str(base_dir))


def prepare_network(base_dir: Path) -> None:
    """The bridge (so host services can bind its address first), sysctls and the isolation rule."""
    folder = node_dir(base_dir)
    folder.mkdir(parents=True, exist_ok=True)
    claim_machine(base_dir)
    saved = folder / "sysctl.json"
    if not Path("/proc/sys/net/bridge").exists() and shutil.which("modprobe"):
        _sh("modprobe", "br_netfilter", check=False)
    if not saved.exists():
        old = {key: _read_sysctl(key) for key in _SYSCTLS}
        saved.write_text(json.dumps({k: v for k, v in old.items() if v is not None}))
    existing = folder / "preexisting-paths.json"
    if not existing.exists():
        existing.write_text(json.dumps([p for p in _FIXED_PATHS if Path(p).exists()]))
    for key in _SYSCTLS:
        _write_sysctl(key, "1")
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    if HOST_IP not in _sh("ip", "-4", "addr", "show", BRIDGE).stdout:
        _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    # Pods reach each other and the host; nothing they send is forwarded anywhere else.
    if _sh("iptables", "-n", "-L", "OPENLEDGER-ISOLATE", check=False).returncode != 0:
        _sh("iptables", "-N", "OPENLEDGER-ISOLATE")
        _sh("iptables", "-A", "OPENLEDGER-ISOLATE", "-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN")
        _sh("iptables", "-A", "OPENLEDGER-ISOLATE", "-i", BRIDGE, "-j", "DROP")
        _sh("iptables", "-A", "OPENLEDGER-ISOLATE", "-o", BRIDGE, "-j", "DROP")
        _sh("iptables", "-I", "FORWARD", "1", "-j", "OPENLEDGER-ISOLATE")


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", key).write_text(value)


def _cni_config(base_dir: Path) -> dict[str, object]:
    return {
        "cniVersion": "0.4.0",
        "name": "openledger",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": HOST_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node_dir(base_dir) / "cni" / "ipam"),
                },
            }
        ],
    }


# ----------------------------------------------------------------- containerd


def containerd_socket(base_dir: Path) -> Path:
    return node_dir(base_dir) / "run" / "containerd.sock"


def _containerd_config(base_dir: Path) -> str:
    folder = node_dir(base_dir)
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{folder / "containerd" / "root"}"
state = "{folder / "containerd" / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{containerd_socket(base_dir)}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{folder / "containerd" / "opt"}"
[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # Root here may lack CAP_SYS_RESOURCE (these VMs do): never ask runc to lower a score below containerd's.
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{folder / "runc"}"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{folder / "cni" / "net.d"}"
"""


def ctr(base_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _sh("ctr", "--address", str(containerd_socket(base_dir)), "--namespace", "k8s.io", *args, check=check)


def import_image(base_dir: Path, archive: Path, name: str, *, always: bool = False) -> None:
    """``ctr images import`` unless containerd already holds ``name`` (a tag keyed by content), or ``always``."""
    if not always and name in ctr(base_dir, "images", "ls", "-q").stdout.split():
        return
    ctr(base_dir, "images", "import", "--no-unpack", str(archive))
    if name not in ctr(base_dir, "images", "ls", "-q").stdout.split():
        raise ComponentError(f"importing {archive} did not create the image {name}")


# ---------------------------------------------------------------------- the node


Spawn = Callable[..., ManagedProcess]


@dataclass
class NodeConfig:
    base_dir: Path
    api_url: str  # https://HOST_IP:port
    tokens: dict[str, str]  # component -> bearer token
    sa_key: Path
    root_ca: Path


def component_kubeconfig(folder: Path, name: str, url: str, token: str) -> Path:
    path = folder / f"{name}.kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: local\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n"
        f"users:\n- name: {name}\n  user:\n    token: {token}\n"
        f"contexts:\n- name: local\n  context:\n    cluster: local\n    user: {name}\n"
        "current-context: local\n"
    )
    path.chmod(0o600)
    return path


def start_node(config: NodeConfig, spawn: Spawn, port: Callable[[str], int]) -> None:
    """containerd → images → controller-manager, scheduler → kubelet, kube-proxy; each checked by a request."""
    folder = node_dir(config.base_dir)
    for sub in ("run", "cni/net.d", "cni/ipam", "containerd", "kubelet", "kube"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "cni" / "net.d" / "10-openledger.conflist").write_text(json.dumps(_cni_config(config.base_dir)))
    _start_containerd(config.base_dir, spawn)
    # Small images under fixed tags: imported every time, so a changed input always reaches containerd.
    import_image(config.base_dir, images.cached_archive(images.pause_spec()), images.PAUSE_IMAGE, always=True)
    import_image(config.base_dir, images.cached_archive(images.busybox_spec()), images.BUSYBOX_IMAGE, always=True)
    binaries = toolchain.kubernetes_node_binaries()
    kubeconfigs = {
        name: component_kubeconfig(folder / "kube", name, config.api_url, config.tokens[name])
        for name in COMPONENT_USERS
    }
    _start_controller_manager(config, binaries["kube-controller-manager"], kubeconfigs, spawn, port)
    _start_scheduler(binaries["kube-scheduler"], kubeconfigs, spawn, port)
    _prepare_cgroups()
    _start_kubelet(config, binaries["kubelet"], kubeconfigs, spawn, port)
    _start_kube_proxy(config, binaries["kube-proxy"], kubeconfigs, spawn, port)


def _start_containerd(base_dir: Path, spawn: Spawn) -> None:
    config = node_dir(base_dir) / "containerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    containerd_socket(base_dir).parent.mkdir(parents=True, exist_ok=True)
    config.write_text(_containerd_config(base_dir))
    process = spawn("containerd", ["containerd", "--config", str(config), "--log-level", "warn"])
    wait_ready(process, lambda: ctr(base_dir, "version").returncode == 0, 60)


def _https_ok(url: str) -> bool:
    import ssl
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=1, context=ctx) as response:
        return bool(response.status == 200)


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


def _control_loop_flags(kubeconfig: Path, secure_port: int) -> list[str]:
    """What kube-controller-manager and kube-scheduler share: their identity, and HTTPS on loopback."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={secure_port}",
    ]


def _start_controller_manager(
    config: NodeConfig, binary: Path, kubeconfigs: dict[str, Path], spawn: Spawn, port: Callable[[str], int]
) -> None:
    secure = port("kube-controller-manager")
    argv = [
        str(binary),
        *_control_loop_flags(kubeconfigs["kube-controller-manager"], secure),
        f"--service-account-private-key-file={config.sa_key}",
        f"--root-ca-file={config.root_ca}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--cluster-cidr={POD_SUBNET}",
        "--leader-elect=false",
        "--controllers=*,-csrsigning",
        "--v=0",
    ]
    process = spawn("kube-controller-manager", argv)
    wait_ready(process, lambda: _https_ok(f"https://127.0.0.1:{secure}/healthz"), 120)


def _start_scheduler(binary: Path, kubeconfigs: dict[str, Path], spawn: Spawn, port: Callable[[str], int]) -> None:
    secure = port("kube-scheduler")
    argv = [
        str(binary),
        *_control_loop_flags(kubeconfigs["kube-scheduler"], secure),
        "--leader-elect=false",
    ]
    process = spawn("kube-scheduler", argv)
    wait_ready(process, lambda: _https_ok(f"https://127.0.0.1:{secure}/healthz"), 120)


def _cgroup_controllers() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [p for p in sorted(root.iterdir()) if p.is_dir() and p.name != "unified" and not p.is_symlink()]


def _prepare_cgroups() -> None:
    """The kubelet's ``cgroupRoot`` must exist in every v1 hierarchy (cpuset needs its cpus and mems)."""
    for controller in _cgroup_controllers():
        target = controller / CGROUP_ROOT
        target.mkdir(exist_ok=True)
        if controller.name == "cpuset":
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if not (target / knob).read_text().strip():
                    (target / knob).write_text((controller / knob).read_text())


def _start_kubelet(
    config: NodeConfig, binary: Path, kubeconfigs: dict[str, Path], spawn: Spawn, port: Callable[[str], int]
) -> None:
    folder = node_dir(config.base_dir) / "kubelet"
    healthz = port("kubelet-healthz")
    settings = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "containerRuntimeEndpoint": f"unix://{containerd_socket(config.base_dir)}",
        "address": HOST_IP,
        "port": port("kubelet"),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",
        "failSwapOn": False,
        "staticPodPath": "",
        "serializeImagePulls": False,
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "podLogsDir": str(folder / "pod-logs"),
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(settings, indent=2))
    argv = [
        str(binary),
        f"--config={path}",
        f"--kubeconfig={kubeconfigs['kubelet']}",
        f"--root-dir={folder / 'root'}",
        f"--cert-dir={folder / 'pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={HOST_IP}",
        "--v=0",
    ]
    process = spawn("kubelet", argv)
    wait_ready(process, lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"), 120)


def _start_kube_proxy(
    config: NodeConfig, binary: Path, kubeconfigs: dict[str, Path], spawn: Spawn, port: Callable[[str], int]
) -> None:
    healthz = port("kube-proxy-healthz")
    settings = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfigs["kube-proxy"])},
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "hostnameOverride": NODE_NAME,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{healthz}",
        "metricsBindAddress": f"127.0.0.1:{port('kube-proxy-metrics')}",
        # 0: leave the machine's conntrack table size and timeouts as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "nodePortAddresses": ["127.0.0.0/8", f"{HOST_IP}/32"],
    }
    path = node_dir(config.base_dir) / "kube" / "kube-proxy.yaml"
    path.write_text(json.dumps(settings, indent=2))
    process = spawn("kube-proxy", [str(binary), f"--config={path}", "--v=0"])
    wait_ready(process, lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"), 120)


# ------------------------------------------------------------------- teardown


def teardown(base_dir: Path, processes: dict[str, int]) -> list[str]:
    """Stop the node and remove what it made; ``processes`` maps recorded names to pids.

    Returns the names stopped. Safe to call twice and on a half-started node.
    """
    stopped: list[str] = []
    ids = _container_ids(base_dir, processes.get("containerd"))
    for name in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
        pid = processes.get(name)
        if pid and pid_alive(pid):
            stop_pid(pid)
            stopped.append(name)
    pid = processes.get("containerd")
    if pid and pid_alive(pid):
        _remove_containers(base_dir)
        stop_pid(pid)
        stopped.append("containerd")
    _kill_shims(base_dir)
    _kill_cgroup_members()
    for socket_path in shim_sockets(base_dir, ids):
        socket_path.unlink(missing_ok=True)
    _unmount_below(node_dir(base_dir))
    _remove_network(base_dir)
    _remove_cgroups()
    _remove_empty_runtime_dirs()
    _remove_fixed_paths(base_dir)
    if OWNER_FILE.exists() and OWNER_FILE.read_text().strip() == str(base_dir):
        OWNER_FILE.unlink()
    return stopped


def _our_fixed_files(base_dir: Path) -> list[Path]:
    """Container log links to our pod logs, libcni's cached results of our network, device-plugin sockets."""
    found: list[Path] = []
    logs = str(node_dir(base_dir)) + "/"
    with contextlib.suppress(OSError):
        found += [p for p in Path("/var/log/containers").iterdir() if os.readlink(p).startswith(logs)]
    results = Path("/var/lib/cni/results")
    with contextlib.suppress(OSError):
        ours = [p for p in results.iterdir() if p.name.startswith("openledger-")]
        ids = {p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in ours}
        found += ours + [results / f"cni-loopback-{i}-lo" for i in ids if (results / f"cni-loopback-{i}-lo").exists()]
    with contextlib.suppress(OSError):
        found += [p for p in Path("/var/lib/kubelet/device-plugins").iterdir() if p.name.startswith("kubelet")]
    return found


def _remove_fixed_paths(base_dir: Path) -> None:
    for path in _our_fixed_files(base_dir):
        path.unlink(missing_ok=True)
    record = node_dir(base_dir) / "preexisting-paths.json"
    if not record.exists():
        return
    preexisting = set(json.loads(record.read_text()))
    for folder in _FIXED_PATHS:
        if folder not in preexisting:
            with contextlib.suppress(OSError):
                Path(folder).rmdir()
    record.unlink()


def _remove_empty_runtime_dirs() -> None:
    """containerd 1.6 keeps shim sockets and client fifos under /run/containerd whatever its config says."""
    for folder in ("s", "fifo", "runc/k8s.io", "runc", ""):
        with contextlib.suppress(OSError):
            Path("/run/containerd", folder).rmdir()


def _remove_containers(base_dir: Path) -> None:
    for task in ctr(base_dir, "tasks", "ls", "-q", check=False).stdout.split():
        ctr(base_dir, "tasks", "kill", "-s", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 15
    while ctr(base_dir, "tasks", "ls", "-q", check=False).stdout.split() and time.monotonic() < deadline:
        for task in ctr(base_dir, "tasks", "ls", "-q", check=False).stdout.split():
            ctr(base_dir, "tasks", "rm", "-f", task, check=False)
        time.sleep(0.2)
    for container in ctr(base_dir, "containers", "ls", "-q", check=False).stdout.split():
        ctr(base_dir, "containers", "rm", container, check=False)


def _container_ids(base_dir: Path, containerd_pid: int | None) -> set[str]:
    ids: set[str] = set()
    with contextlib.suppress(OSError):
        tasks = node_dir(base_dir) / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
        ids.update(p.name for p in tasks.iterdir())
    if containerd_pid and pid_alive(containerd_pid):
        ids.update(ctr(base_dir, "containers", "ls", "-q", check=False).stdout.split())
    return ids


def shim_sockets(base_dir: Path, ids: set[str]) -> list[Path]:
    """The sockets containerd 1.6 names ``/run/containerd/s/sha256(address/namespace/id)`` for our shims."""
    import hashlib

    found = []
    for container_id in ids:
        digest = hashlib.sha256(f"{containerd_socket(base_dir)}/k8s.io/{container_id}".encode()).hexdigest()
        path = Path("/run/containerd/s") / digest
        if path.exists():
            found.append(path)
    return found


def _kill_shims(base_dir: Path) -> None:
    """containerd-shims run in their own sessions; find ours by the socket address on their command line."""
    marker = str(containerd_socket(base_dir)).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def mounts_below(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            found.append(point)
    return found


def _unmount_below(folder: Path) -> None:
    for _ in range(5):
        points = mounts_below(folder)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            _sh("umount", "-l", point, check=False)


def _remove_network(base_dir: Path) -> None:
    saved = node_dir(base_dir) / "sysctl.json"
    if not saved.exists():
        # This folder's node never set up the network (or already removed it): the bridge and the
        # KUBE-* chains, if any, belong to someone else.
        return
    links = _sh("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout
    for match in re.finditer(r"^\d+:\s+([^@:\s]+)", links, re.M):
        _sh("ip", "link", "del", match.group(1), check=False)
    _sh("ip", "link", "del", BRIDGE, check=False)
    remove_chains()
    if saved.exists():
        for key, value in json.loads(saved.read_text()).items():
            _write_sysctl(key, value)
        saved.unlink()
    shutil.rmtree(node_dir(base_dir) / "cni" / "ipam", ignore_errors=True)


_IPTABLES = ("iptables", "ip6tables")


def our_chains() -> dict[tuple[str, str], list[str]]:
    """(iptables or ip6tables, table) -> the chains kube-proxy, the kubelet, CNI and this module made."""
    found: dict[tuple[str, str], list[str]] = {}
    for family in _IPTABLES:
        if not shutil.which(f"{family}-save"):
            continue
        for table in ("filter", "nat", "mangle", "raw"):
            dump = _sh(f"{family}-save", "-t", table, check=False).stdout
            chains = [m.group(1) for m in re.finditer(r"^:(\S+)", dump, re.M) if m.group(1).startswith(_CHAIN_PREFIXES)]
            if chains:
                found[(family, table)] = chains
    return found


def remove_chains() -> None:
    """Delete every rule that jumps to one of our chains, then the chains themselves."""
    for (family, table), chains in our_chains().items():
        dump = _sh(f"{family}-save", "-t", table, check=False).stdout
        ours = set(chains)
        for line in dump.splitlines():
            match = re.match(r"^-A (\S+) (.*)$", line)
            if not match or match.group(1) in ours:
                continue
            target = re.search(r"-j (\S+)", match.group(2))
            if target and target.group(1) in ours:
                _sh(family, "-t", table, "-D", match.group(1), *_split_rule(match.group(2)), check=False)
        for chain in chains:
            _sh(family, "-t", table, "-F", chain, check=False)
        for chain in chains:
            _sh(family, "-t", table, "-X", chain, check=False)


def _split_rule(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)


def _kill_cgroup_members() -> None:
    """SIGKILL whatever still runs in the pods' cgroups (containers orphaned by a killed shim)."""
    for _ in range(50):
        pids: set[int] = set()
        for controller in _cgroup_controllers():
            root = controller / CGROUP_ROOT
            if root.is_dir():
                for procs in root.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        pids.update(int(line) for line in procs.read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_cgroups() -> None:
    """Remove ``/openledger`` and everything below it in every hierarchy, deepest first."""
    for controller in _cgroup_controllers():
        root = controller / CGROUP_ROOT
        if not root.is_dir():
            continue
        folders = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for folder in [*folders, root]:
            with contextlib.suppress(OSError):
                folder.rmdir()


def leftovers(base_dir: Path) -> list[str]:
    """What a node left on the machine (empty after a clean teardown): for ``make down`` and the tests."""
    found = []
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"network interface {BRIDGE}")
    for (family, table), chains in our_chains().items():
        found += [f"{family} {table} chain {chain}" for chain in chains]
    if OWNER_FILE.exists() and OWNER_FILE.read_text().strip() == str(base_dir):
        found.append(f"owner file {OWNER_FILE}")
    found += [f"mount {point}" for point in mounts_below(node_dir(base_dir))]
    found += [f"cgroup {c / CGROUP_ROOT}" for c in _cgroup_controllers() if (c / CGROUP_ROOT).exists()]
    found += [f"file {p}" for p in _our_fixed_files(base_dir)]
    marker = str(containerd_socket(base_dir)).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.append(f"process {entry.name}")
    return found


# ----------------------------------------------------------- cluster add-ons

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def refresh_apiserver_endpoints(kubectl: Kubectl, host: str, port: int) -> None:
    """Drop the `kubernetes` endpoints when they name another port (an API server restarted on a new one).

    The API server's lease reconciler keys its endpoints by address only and would keep the old port;
    it writes fresh ones within seconds once the stale objects are gone.
    """
    result = kubectl("-n", "default", "get", "endpointslice", "kubernetes", "-o", "json", check=False)
    if result.returncode != 0:
        return
    ports = [p.get("port") for p in json.loads(result.stdout).get("ports") or []]
    if ports == [port]:
        return
    kubectl("-n", "default", "delete", "endpoints,endpointslice", "kubernetes", "--ignore-not-found", check=False)

    def fresh() -> bool:
        again = kubectl("-n", "default", "get", "endpointslice", "kubernetes", "-o", "json", check=False)
        return again.returncode == 0 and [p.get("port") for p in json.loads(again.stdout).get("ports") or []] == [port]

    deadline = time.monotonic() + 60
    while not fresh():
        if time.monotonic() > deadline:
            raise ComponentError(f"the API server did not publish its endpoints {host}:{port} within 60 s")
        time.sleep(0.5)


def wait_node_ready(kubectl: Kubectl, timeout_s: float) -> None:
    def ready() -> bool:
        result = kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    detail = kubectl("describe", "node", NODE_NAME, check=False).stdout[-3000:]
    raise ComponentError(f"node {NODE_NAME} was not Ready within {timeout_s:.0f} s:\n{detail}")


COREFILE = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    loop
    reload
    loadbalance
}}
"""


def dns_manifest() -> list[dict[str, object]]:
    """CoreDNS as kube-system/coredns behind the kube-dns Service at ``DNS_IP`` (no upstream: nothing leaves)."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": "kube-system"}
    container = {
        "name": "coredns",
        "image": images.COREDNS_IMAGE,
        "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
        ],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": COREFILE}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "containers": [container],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "clusterIP": DNS_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]


def apply(kubectl: Kubectl, objects: list[dict[str, object]]) -> None:
    document = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    result = kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=openledger-local",
        "-f",
        "-",
        stdin=document,
        check=False,
    )
    if result.returncode != 0:
        raise ComponentError(f"kubectl apply failed:\n{result.stderr[-3000:]}")


def wait_rollout(kubectl: Kubectl, namespace: str, deployment: str, timeout_s: int) -> None:
    result = kubectl(
        "-n", namespace, "rollout", "status", f"deployment/{deployment}", f"--timeout={timeout_s}s", check=False
    )
    if result.returncode != 0:
        pods = kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
        raise ComponentError(f"{namespace}/{deployment} did not roll out: {result.stderr}\n{pods}\n{events}")


def install_dns(base_dir: Path, kubectl: Kubectl) -> None:
    import_image(base_dir, images.cached_archive(images.coredns_spec()), images.COREDNS_IMAGE, always=True)
    apply(kubectl, dns_manifest())
    wait_rollout(kubectl, "kube-system", "coredns", 180)
