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
from tests.integration.test_no_leftover_processes import processes_mentioning
from tests.waiting import wait_for


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

        # Exactly what the README tells a user to type after `make up`.
        user = subprocess.run(
            ["bash", "-c", f"source {base / 'env'} && kubectl get --raw /readyz && echo && "
             "psql \"$DATABASE_URL\" -tAc 'select 1' && redis-cli -u \"$REDIS_URL\" ping && openledger --help"],
            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert user.returncode == 0, user.stderr
        assert user.stdout.split()[:3] == ["ok", "1", "PONG"], user.stdout
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
    wait_for(lambda: not processes_mentioning(str(base)), what="no process left")
    assert cli("local", "status", "--dir", str(base)).returncode == 1
