"""The local platform: real etcd, kube-apiserver, PostgreSQL, Redis and anvil.

The one place that starts local components. ``make up`` uses it detached (the
processes outlive the CLI, ``make down`` stops them); the pytest fixtures use it
attached (the processes die with pytest). Every component binds to 127.0.0.1 on
a free port, keeps its data under ``base_dir`` and is checked for readiness by a
real request, never by a sleep.

Start order: etcd → kube-apiserver → CRDs is one chain; PostgreSQL, Redis and
anvil start beside it, in parallel threads.

Two modes of the one platform: ``make up`` (above; the product runs as host
processes) and ``make cluster`` (``cluster=True``): the same components, plus a
real node (:mod:`openledger.local.node`). In cluster mode the API server,
PostgreSQL, Redis and anvil also listen on the node bridge's host address, so
pods reach them, and the API server runs the admission plugins and the Node
authorizer a real cluster has.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from openledger.local import node, toolchain
from openledger.local.processes import (
    ComponentError,
    ManagedProcess,
    free_port,
    pid_alive,
    spawn,
    stop_pid,
    tail,
    wait_ready,
)
from openledger.settings import Settings

log = logging.getLogger(__name__)

COMPONENTS = ("etcd", "kube-apiserver", "postgres", "redis", "anvil")
ANVIL_CHAIN_ID = 31337
# The first of anvil's well-known development accounts (mnemonic "test test … junk").
ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
PROJECT_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Endpoints:
    """What a client needs to reach each component; serialised into ``.local/env``."""

    kubeconfig: Path | None = None
    kube_url: str = ""
    kube_token: str = ""
    etcd_url: str = ""
    database_url: str = ""
    redis_url: str = ""
    eth_rpc_url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def as_env(self) -> dict[str, str]:
        env = {
            "KUBECONFIG": str(self.kubeconfig) if self.kubeconfig else "",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "ETH_RPC_URL": self.eth_rpc_url,
            **self.extra,
        }
        return {k: v for k, v in env.items() if v}


def _http_get(url: str, headers: dict[str, str] | None = None, timeout_s: float = 1.0) -> str:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as resp:
        return str(resp.read().decode())


def eth_rpc(url: str, method: str, params: list[object] | None = None, timeout_s: float = 2.0) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise ComponentError(f"{method}: {reply['error']}")
    return reply["result"]


def shared_crd_dir() -> Path | None:
    """``../shared/third_party/crds`` beside the project, when it exists."""
    # A fresh Settings, not the cached one: tests point this at another folder per platform.
    configured = Settings().third_party_crds
    candidates = [configured] if configured else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "third_party" / "crds")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


class LocalPlatform:
    """Start, stop and describe the local components under ``base_dir``."""

    def __init__(
        self,
        base_dir: Path,
        *,
        detached: bool,
        components: Iterable[str] = COMPONENTS,
        durable: bool = True,
        cluster: bool = False,
    ) -> None:
        self.base_dir = base_dir.resolve()
        self.detached = detached
        self.cluster = cluster
        self.components = [c for c in COMPONENTS if c in set(components)]
        if "kube-apiserver" in self.components and "etcd" not in self.components:
            self.components.insert(0, "etcd")
        self.durable = durable
        self.processes: dict[str, ManagedProcess] = {}
        self.ports: dict[str, int] = {}
        self.endpoints = Endpoints()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Endpoints:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        if self.cluster:
            node.require_root()
            node.prepare_network(self.base_dir)
        chains: list[Callable[[], None]] = []
        if "etcd" in self.components:
            chains.append(self._start_kubernetes_chain)
        for name in ("postgres", "redis", "anvil"):
            if name in self.components:
                chains.append(getattr(self, "_start_" + name))
        try:
            with ThreadPoolExecutor(max_workers=len(chains) or 1) as pool:
                for future in [pool.submit(chain) for chain in chains]:
                    future.result()
            if self.cluster:
                self._start_node()
        except BaseException:
            self.stop()
            raise
        self.write_state()
        return self.endpoints

    def stop(self) -> None:
        if self.cluster:
            stopped = node.teardown(self.base_dir, self.pids())
            for name in stopped:
                self.processes.pop(name, None)
        for name in reversed(list(self.processes)):
            self.stop_component(name)

    def stop_component(self, name: str, sig: int | None = None) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            stop_pid(process.pid, sig or process.stop_signal)

    def restart_component(self, name: str) -> None:
        """Stop and start one component on the same port and data (failure tests)."""
        self.stop_component(name)
        getattr(self, "_start_" + name.replace("-", "_"))()

    def add_process(self, process: ManagedProcess) -> None:
        with self._lock:
            self.processes[process.name] = process

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    # ------------------------------------------------------------------- state

    @property
    def state_path(self) -> Path:
        return self.base_dir / "state.json"

    def write_state(self) -> None:
        state = {
            "processes": {
                n: {"pid": p.pid, "log": str(p.log_path), "signal": p.stop_signal} for n, p in self.processes.items()
            },
            "env": self.endpoints.as_env(),
            "ports": self.ports,
            "mode": "cluster" if self.cluster else "up",
        }
        self.state_path.write_text(json.dumps(state, indent=2))
        lines = [f"export {k}={_shell_quote(v)}" for k, v in self.endpoints.as_env().items()]
        lines.append(f'export PATH={_shell_quote(":".join(self._tool_dirs()))}:"$PATH"')
        (self.base_dir / "env").write_text("\n".join(lines) + "\n")

    def _tool_dirs(self) -> list[str]:
        """``openledger`` (this virtualenv) and the cached kubectl/helm, for ``source .local/env``."""
        dirs = [str(Path(sys.executable).parent)]
        if "kube-apiserver" in self.components:
            dirs.append(str(toolchain.kubernetes_binaries()[1].parent))
        helm = toolchain.cache_root() / f"helm-{toolchain.HELM_VERSION}"
        if helm.is_dir():
            dirs.append(str(helm))
        return dirs

    def spawn(self, name: str, argv: list[str], **kwargs: object) -> ManagedProcess:
        """Start a process owned by this platform (log under ``logs/``, stopped by ``stop``)."""
        process = spawn(name, argv, self.base_dir / "logs" / f"{name}.log", detached=self.detached, **kwargs)  # type: ignore[arg-type]
        self.add_process(process)
        return process

    def port(self, name: str) -> int:
        """A free loopback port for ``name``, the same one on every call (restarts keep it)."""
        with self._lock:
            if name not in self.ports:
                self.ports[name] = free_port()
            return self.ports[name]

    # -------------------------------------------------------------- kubernetes

    def _start_kubernetes_chain(self) -> None:
        self._start_etcd()
        if "kube-apiserver" in self.components:
            self._start_kube_apiserver()
            self.install_crds()

    def _start_etcd(self) -> None:
        binary = toolchain.etcd_binary()
        client, peer = self.port("etcd"), self.port("etcd-peer")
        data = self.base_dir / "etcd"
        argv = [
            str(binary),
            "--name=openledger",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=openledger=http://127.0.0.1:{peer}",
            "--log-level=warn",
            "--quota-backend-bytes=4294967296",
        ]
        if not self.durable:
            argv.append("--unsafe-no-fsync")
        process = self.spawn("etcd", argv)
        url = f"http://127.0.0.1:{client}"
        wait_ready(process, lambda: '"health":"true"' in _http_get(url + "/health"), 60)
        self.endpoints.etcd_url = url

    def _start_kube_apiserver(self) -> None:
        apiserver, _ = toolchain.kubernetes_binaries()
        port = self.port("kube-apiserver")
        conf = self.base_dir / "kube"
        conf.mkdir(parents=True, exist_ok=True)
        token = self._admin_token(conf)
        self._service_account_keys(conf)
        host = node.HOST_IP if self.cluster else "127.0.0.1"
        argv = [
            str(apiserver),
            f"--etcd-servers={self.endpoints.etcd_url}",
            f"--cert-dir={conf / 'certs'}",
            f"--bind-address={host}",
            f"--advertise-address={host}",
            f"--secure-port={port}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            f"--token-auth-file={conf / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={conf / 'sa.pub'}",
            f"--service-account-signing-key-file={conf / 'sa.key'}",
            "--v=0",
            *_aggregation_flags(conf / "front-proxy"),
        ]
        if self.cluster:
            self._component_tokens(conf)
            # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs `update` on the owner's
            # finalizers, as on OpenShift, so the chart's RBAC is checked for it.
            argv += [
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
                # logs/exec/port-forward: the node's name resolves nowhere, its address does.
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # No controller-manager runs in this mode, so nothing would mint SA tokens.
            argv += ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
        process = self.spawn("kube-apiserver", argv)
        url = f"https://{host}:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        wait_ready(process, lambda: _http_get(url + "/readyz", headers) == "ok", 120)
        self.endpoints.kube_url = url
        self.endpoints.kube_token = token
        self.endpoints.kubeconfig = self._write_kubeconfig(conf, url, token)

    def _admin_token(self, conf: Path) -> str:
        tokens = conf / "tokens.csv"
        if tokens.exists():
            return tokens.read_text().split(",", 1)[0]
        token = secrets.token_hex(24)
        tokens.write_text(f'{token},openledger-admin,openledger-admin,"system:masters"\n')
        tokens.chmod(0o600)
        return token

    def _component_tokens(self, conf: Path) -> dict[str, str]:
        """A token per node component in ``tokens.csv`` (added once, kept across restarts)."""
        tokens = conf / "tokens.csv"
        lines = tokens.read_text().splitlines()
        known = {line.split(",")[1]: line.split(",")[0] for line in lines if line.count(",") >= 2}
        result = {}
        for component, (user, group) in node.COMPONENT_USERS.items():
            if user not in known:
                known[user] = secrets.token_hex(24)
                groups = f',"{group}"' if group else ""
                lines.append(f"{known[user]},{user},{user}{groups}")
            result[component] = known[user]
        tokens.write_text("\n".join(lines) + "\n")
        return result

    def _start_node(self) -> None:
        conf = self.base_dir / "kube"
        config = node.NodeConfig(
            base_dir=self.base_dir,
            api_url=self.endpoints.kube_url,
            tokens=self._component_tokens(conf),
            sa_key=conf / "sa.key",
            root_ca=conf / "certs" / "apiserver.crt",
        )
        node.start_node(config, self.spawn, self.port)
        self.write_state()
        node.refresh_apiserver_endpoints(self.kubectl, node.HOST_IP, self.ports["kube-apiserver"])
        node.wait_node_ready(self.kubectl, 180)
        node.install_dns(self.base_dir, self.kubectl)

    def _service_account_keys(self, conf: Path) -> None:
        key, pub = conf / "sa.key", conf / "sa.pub"
        if key.exists() and pub.exists():
            return
        if not shutil.which("openssl"):
            raise ComponentError("`openssl` is not on PATH: install it (apt-get install openssl)")
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True
        )

    def _write_kubeconfig(self, conf: Path, url: str, token: str) -> Path:
        path = conf / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: openledger-local\n  cluster:\n"
            f"    server: {url}\n    insecure-skip-tls-verify: true\n"
            "users:\n- name: openledger-admin\n  user:\n"
            f"    token: {token}\n"
            "contexts:\n- name: openledger-local\n  context:\n"
            "    cluster: openledger-local\n    user: openledger-admin\n    namespace: default\n"
            "current-context: openledger-local\n"
        )
        path.chmod(0o600)
        return path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        _, kubectl = toolchain.kubernetes_binaries()
        return subprocess.run(
            [str(kubectl), f"--kubeconfig={self.endpoints.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def install_crds(self) -> None:
        """Third-party CRDs first (so the server validates what we write), then ours."""
        files: list[Path] = []
        third_party = shared_crd_dir()
        if third_party is not None:
            files += sorted(third_party.rglob("*.yaml"))
        else:
            log.warning("third-party CRDs not found; KServe objects will not be validated")
        files += sorted((PROJECT_ROOT / "crds").glob("*.yaml"))
        if not files:
            return
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=openledger-local"]
        for path in files:
            args += ["-f", str(path)]
        result = self.kubectl(*args, check=False)
        if result.returncode != 0:
            raise ComponentError(f"installing CRDs failed:\n{result.stderr[-3000:]}")
        wait_until(self._crds_established, 120, "CRDs to become Established")

    def _crds_established(self) -> bool:
        listing = json.loads(self.kubectl("get", "crd", "-o", "json").stdout)
        for crd in listing["items"]:
            conditions = crd.get("status", {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    # ---------------------------------------------------------------- postgres

    def _start_postgres(self) -> None:
        bindir = _postgres_bindir()
        port = self.port("postgres")
        data = self.base_dir / "postgres" / "data"
        sockets = self.base_dir / "postgres" / "run"
        run_as = _postgres_user()
        if not (data / "PG_VERSION").exists():
            data.mkdir(parents=True, exist_ok=True)
            sockets.mkdir(parents=True, exist_ok=True)
            if run_as:
                for path in (data.parent, data, sockets):
                    shutil.chown(path, run_as, run_as)
            init = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                user=run_as,
                group=run_as,
            )
            if init.returncode != 0:
                raise ComponentError(f"initdb failed:\n{init.stderr[-2000:]}")
        if self.cluster:
            _pg_allow(data / "pg_hba.conf", node.POD_SUBNET)
        settings = {
            "listen_addresses": f"127.0.0.1,{node.HOST_IP}" if self.cluster else "127.0.0.1",
            "unix_socket_directories": str(sockets),
            "max_connections": "200",
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
            "log_min_messages": "warning",
        }
        if not self.durable:
            settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        # SIGINT is PostgreSQL's "fast shutdown": roll back and exit cleanly.
        process = self.spawn("postgres", argv, user=run_as, stop_signal=signal.SIGINT)
        admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        wait_ready(process, lambda: _pg_ready(admin_url), 60)
        _pg_create_database(admin_url, "openledger")
        self.endpoints.database_url = f"postgresql://postgres@127.0.0.1:{port}/openledger"

    # ------------------------------------------------------------------- redis

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise ComponentError(
                "`redis-server` is not installed: apt-get install redis-server (make test does it as root)"
            )
        port = self.port("redis")
        data = self.base_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            f"127.0.0.1 {node.HOST_IP}" if self.cluster else "127.0.0.1",
            # Pods connect from the node's bridge, which protected mode would refuse (no password here);
            # the bridge is private to this machine (nothing is forwarded in or out of it).
            "--protected-mode",
            "no" if self.cluster else "yes",
            # The usage stream is the only record of served usage until the ledger ingests it:
            # every write is on disk before Redis replies (gateway_durability "aof"), and a full
            # Redis refuses writes rather than evicting budgets, reservations or the stream.
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            str(data),
            "--daemonize",
            "no",
        ]
        process = self.spawn("redis", argv)
        url = f"redis://127.0.0.1:{port}/0"
        wait_ready(process, lambda: _redis_ping(port), 30)
        self.endpoints.redis_url = url

    # ------------------------------------------------------------------- anvil

    def _start_anvil(self) -> None:
        binary = toolchain.anvil_binary()
        port = self.port("anvil")
        hosts = ["127.0.0.1", node.HOST_IP] if self.cluster else ["127.0.0.1"]
        argv = [
            str(binary),
            "--host",
            ",".join(hosts),
            "--port",
            str(port),
            "--chain-id",
            str(ANVIL_CHAIN_ID),
            "--silent",
        ]
        process = self.spawn("anvil", argv)
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, lambda: eth_rpc(url, "eth_chainId") == hex(ANVIL_CHAIN_ID), 30)
        # The chain URL goes into RewardPool Secrets that the settler reads in a pod: in cluster mode
        # it is the bridge's host address, which the host and the pods both reach.
        self.endpoints.eth_rpc_url = f"http://{node.HOST_IP}:{port}" if self.cluster else url


# ----------------------------------------------------------------- helpers


def openssl_certificate(
    crt: Path, key: Path, common_name: str, *, ca: tuple[Path, Path] | None = None, extensions: Iterable[str] = ()
) -> None:
    """An EC P-256 key and a 10-year certificate: self-signed when ``ca`` is None, else signed by (crt, key).

    EC rather than RSA: a key takes milliseconds, and every test session starts an API server.
    ``extensions`` are openssl ``-addext`` values (``subjectAltName=DNS:a,IP:127.0.0.1``).
    """
    if not shutil.which("openssl"):
        raise ComponentError("`openssl` is not on PATH: install it (apt-get install openssl)")
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    argv += ["-keyout", str(key), "-out", str(crt), "-days", "3650", "-subj", f"/CN={common_name}"]
    if ca is not None:
        argv += ["-CA", str(ca[0]), "-CAkey", str(ca[1])]
    for extension in extensions:
        argv += ["-addext", extension]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ComponentError(f"openssl could not issue {crt}:\n{result.stderr[-2000:]}")
    key.chmod(0o600)


FRONT_PROXY_CLIENT = "front-proxy-client"
CA_EXTENSIONS = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign")


def _aggregation_flags(folder: Path) -> list[str]:
    """The aggregation layer: the API server proxies an APIService's requests (KEDA's external
    metrics) with this client certificate and the caller in X-Remote-* headers; the extension
    server trusts them through the CA the API server publishes in
    kube-system/extension-apiserver-authentication. Issued once per platform folder.

    No --enable-aggregator-routing: with it the API server dials an EndpointSlice address, which
    may not be a loopback one; without it an ExternalName Service's name is dialled, which is how
    a host process of this platform (KEDA's adapter on 127.0.0.1) is reached.
    """
    ca, cert, key = folder / "ca.crt", folder / "client.crt", folder / "client.key"
    if not (ca.exists() and cert.exists() and key.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        openssl_certificate(ca, folder / "ca.key", "openledger-front-proxy-ca", extensions=CA_EXTENSIONS)
        leaf = ("basicConstraints=critical,CA:FALSE", "extendedKeyUsage=clientAuth")
        openssl_certificate(cert, key, FRONT_PROXY_CLIENT, ca=(ca, folder / "ca.key"), extensions=leaf)
    return [
        f"--requestheader-client-ca-file={ca}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={cert}",
        f"--proxy-client-key-file={key}",
    ]


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _postgres_bindir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ComponentError("PostgreSQL server binaries not found: apt-get install postgresql (make test does it as root)")


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root; run it as the distribution's postgres user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ComponentError("running as root needs a `postgres` user: apt-get install postgresql") from exc
    return "postgres"


def _pg_allow(hba: Path, subnet: str) -> None:
    """Let pods on the node's subnet in (trust, like loopback: the platform is private to this machine)."""
    line = f"host all all {subnet} trust"
    text = hba.read_text()
    if line not in text:
        hba.write_text(text.rstrip("\n") + "\n" + line + "\n")


def _pg_ready(url: str) -> bool:
    import psycopg

    with psycopg.connect(url, connect_timeout=1) as conn:
        conn.execute("select 1")
    return True


def _pg_create_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'create database "{name}"')


def _redis_ping(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


# ------------------------------------------------------- detached management


def read_state(base_dir: Path) -> dict[str, object]:
    path = base_dir / "state.json"
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()))


def stop_detached(base_dir: Path) -> list[str]:
    """Stop everything a previous ``make up`` recorded; returns the names stopped."""
    state = read_state(base_dir)
    processes: dict[str, dict[str, object]] = state.get("processes", {})  # type: ignore[assignment]
    stopped = []
    if state.get("mode") == "cluster" or node.node_dir(base_dir).exists():
        pids = {name: int(info["pid"]) for name, info in processes.items()}  # type: ignore[call-overload]
        stopped += node.teardown(base_dir, pids)
    # Product processes first (they were recorded last), then the platform.
    for name, info in reversed(list(processes.items())):
        pid = int(info["pid"])  # type: ignore[call-overload]
        if pid_alive(pid):
            stop_pid(pid, int(info.get("signal", signal.SIGTERM)))  # type: ignore[call-overload]
            stopped.append(name)
    if state:
        (base_dir / "state.json").unlink(missing_ok=True)
    return stopped


def describe(base_dir: Path) -> list[tuple[str, int, bool, str]]:
    state = read_state(base_dir)
    processes: dict[str, dict[str, object]] = state.get("processes", {})  # type: ignore[assignment]
    rows = []
    for name, info in processes.items():
        pid = int(info["pid"])  # type: ignore[call-overload]
        rows.append((name, pid, pid_alive(pid), str(info["log"])))
    return rows


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


__all__ = [
    "ANVIL_CHAIN_ID",
    "ANVIL_DEV_KEY",
    "COMPONENTS",
    "ComponentError",
    "Endpoints",
    "LocalPlatform",
    "describe",
    "eth_rpc",
    "openssl_certificate",
    "read_state",
    "stop_detached",
    "tail",
    "wait_until",
]
