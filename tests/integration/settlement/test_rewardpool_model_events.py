"""A Model created (or relabelled) after its RewardPool is bound (unbound) at once, not at the next settle tick.

Without this the gateway serves the new Model with no PoolBinding for up to
``OPENLEDGER_SETTLE_INTERVAL_S`` and its usage carries pool="" (never settled).
The settle interval here is 300 s, so only the Model watch can make the binding appear.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from openledger.controllers.model import REDIS_SENTINEL_KEY
from openledger.controllers.rewardpool import pool_models_key
from openledger.local.platform import LocalPlatform
from openledger.local.processes import ManagedProcess, free_port, spawn, tail, wait_ready
from openledger.wire import PoolBinding, model_pool_key

OWNER = "0x" + "0b" * 20
DISTRIBUTOR = "0x" + "d2" * 20
BIND_WITHIN_S = 2.0
RESTORE_WITHIN_S = 5.0  # the Model controller checks Redis every 2 s (OPENLEDGER_OPERATOR_REDIS_CHECK_S)


def apply(platform: LocalPlatform, doc: dict[str, Any]) -> None:
    platform.kubectl("apply", "-f", "-", stdin=json.dumps(doc))


def model(ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "format": {"name": "sklearn"},
            "storageUri": "pvc://models/m",
            "owner": OWNER,
            "pricing": {"token": "OPEN", "decimals": 18, "perRequest": "0.001"},
        },
    }


def wait_for(check: Callable[[], bool], within_s: float) -> float:
    """Seconds until ``check()`` held, or -1.0 when it did not within ``within_s``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return -1.0


def test_a_model_created_after_its_pool_is_bound_at_once_restored_with_the_routes_and_unbound_when_relabelled(
    local_platform: LocalPlatform,
    platform_env: dict[str, str],
    settle_db: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    ns = f"ol-rwm-{secrets.token_hex(4)}"
    apply(local_platform, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    health = free_port()
    env = {
        **platform_env,
        "DATABASE_URL": settle_db,
        "OPENLEDGER_HEALTH_PORT": str(health),
        "OPENLEDGER_METRICS_PORT": str(free_port()),
        "OPENLEDGER_CLAIMS_PORT": "0",
        "OPENLEDGER_NAMESPACES": json.dumps([ns]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-rwm-{ns}",
        "OPENLEDGER_SETTLE_INTERVAL_S": "300",  # the timer cannot be what binds the Model
    }
    process: ManagedProcess = spawn(
        "operator-rwm",
        [sys.executable, "-m", "openledger.cli", "operator"],
        tmp_path / "operator.log",
        detached=False,
        env=env,
    )
    r = redis.Redis.from_url(redis_url)
    key = model_pool_key(ns, "late")
    try:

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as resp:
                return bool(json.loads(resp.read())["controllers"])

        wait_ready(process, ready, 60, "operator")
        apply(
            local_platform,
            {
                "apiVersion": "openledger.io/v1alpha1",
                "kind": "RewardPool",
                "metadata": {"name": "pool", "namespace": ns},
                "spec": {
                    "modelSelector": {"matchLabels": {"team": "a"}},
                    "protocolFeeBps": 250,
                    "chain": {
                        "chainId": 31337,
                        "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                        "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                        "tokenAddress": "0x" + "01" * 20,
                        "distributorAddress": DISTRIBUTOR,
                    },
                },
            },
        )

        def pool_handled() -> bool:
            out = local_platform.kubectl("get", "rewardpool", "pool", "-n", ns, "-o", "json", check=False)
            return out.returncode == 0 and bool((json.loads(out.stdout).get("status") or {}).get("phase"))

        assert wait_for(pool_handled, 30) >= 0, tail(process.log_path, 40)
        time.sleep(2.0)  # past the timer's first tick (initial delay 1 s); the next one is 300 s away
        assert r.get(key) is None

        apply(local_platform, model(ns, "late", {"team": "a"}))
        took = wait_for(lambda: r.get(key) is not None, BIND_WITHIN_S)
        assert took >= 0, f"no binding within {BIND_WITHIN_S}s\n{tail(process.log_path, 40)}"
        raw = r.get(key)
        assert raw is not None and PoolBinding.from_json(raw) == PoolBinding(pool=f"{ns}/pool", fee_bps=250)

        # Redis restarted empty (the sentinel, the routes and the bindings gone): the binding comes back with
        # the routes, in the Model controller's restore pass, not at the pool's next settle tick (300 s away).
        r.delete(REDIS_SENTINEL_KEY, key, pool_models_key(ns, "pool"))
        took = wait_for(lambda: r.get(key) is not None, RESTORE_WITHIN_S)
        assert took >= 0, f"no binding {RESTORE_WITHIN_S}s after Redis lost it\n{tail(process.log_path, 40)}"
        raw = r.get(key)
        assert raw is not None and PoolBinding.from_json(raw) == PoolBinding(pool=f"{ns}/pool", fee_bps=250)

        local_platform.kubectl("label", "model", "late", "-n", ns, "team=b", "--overwrite")
        took = wait_for(lambda: r.get(key) is None, BIND_WITHIN_S)
        assert took >= 0, f"stale binding kept after relabelling\n{tail(process.log_path, 40)}"

        # Relabelled back, then deleted: bound again, then unbound.
        local_platform.kubectl("label", "model", "late", "-n", ns, "team=a", "--overwrite")
        assert wait_for(lambda: r.get(key) is not None, BIND_WITHIN_S) >= 0, tail(process.log_path, 40)
        local_platform.kubectl("delete", "model", "late", "-n", ns, "--wait=false")
        assert wait_for(lambda: r.get(key) is None, 10) >= 0, tail(process.log_path, 40)
    finally:
        process.stop()
        r.delete(key)
        r.close()
        local_platform.kubectl("delete", "namespace", ns, "--wait=false", check=False)
