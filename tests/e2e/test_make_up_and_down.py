"""`make up` as a user runs it (`openledger local up`), then `make down`: nothing left behind."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openledger.local.platform import eth_rpc
from openledger.local.toolchain import kubernetes_binaries

from ..integration.test_no_leftover_processes import processes_mentioning, wait_for


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openledger.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def sourced(env_file: Path) -> dict[str, str]:
    env = {}
    for line in env_file.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def test_up_serves_every_component_and_down_stops_them_all() -> None:
    base = Path(tempfile.mkdtemp(prefix="openledger-up-"))
    started = time.monotonic()
    up = cli("local", "up", "--dir", str(base))
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert time.monotonic() - started < 120
        env = sourced(base / "env")
        assert {"KUBECONFIG", "DATABASE_URL", "REDIS_URL", "ETH_RPC_URL"} <= env.keys()

        _, kubectl = kubernetes_binaries()
        readyz = subprocess.run(
            [str(kubectl), "get", "--raw", "/readyz"], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert readyz.stdout.strip() == "ok", readyz.stderr
        psql = subprocess.run(["psql", env["DATABASE_URL"], "-tAc", "select 1"], capture_output=True, text=True)
        assert psql.stdout.strip() == "1", psql.stderr
        ping = subprocess.run(["redis-cli", "-u", env["REDIS_URL"], "ping"], capture_output=True, text=True)
        assert ping.stdout.strip() == "PONG"
        assert eth_rpc(env["ETH_RPC_URL"], "eth_chainId") == "0x7a69"

        status = cli("local", "status", "--dir", str(base))
        assert status.returncode == 0 and "running" in status.stdout
        again = cli("local", "up", "--dir", str(base))
        assert "already up" in again.stdout
        state = json.loads((base / "state.json").read_text())
        assert {"etcd", "kube-apiserver", "postgres", "redis", "anvil"} <= state["processes"].keys()
    finally:
        down = cli("local", "down", "--dir", str(base))
    assert down.returncode == 0, down.stderr
    assert wait_for(lambda: not processes_mentioning(str(base))), processes_mentioning(str(base))
    assert cli("local", "status", "--dir", str(base)).returncode == 1
