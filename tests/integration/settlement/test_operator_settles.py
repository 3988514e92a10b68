"""The real operator process settles a RewardPool: Kopf timer, Secrets, status, bindings, proofs, metrics."""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from openledger.local.platform import LocalPlatform
from openledger.local.processes import free_port, spawn, tail, wait_ready
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.rpc import Chain
from openledger.wire import PoolBinding, model_pool_key

from .conftest import Signer
from .usage import ingest, usage_event

OWNER = "0x" + "0a" * 20


def apply(platform: LocalPlatform, doc: dict[str, Any]) -> None:
    platform.kubectl("apply", "-f", "-", stdin=json.dumps(doc))


def pool_status(platform: LocalPlatform, ns: str) -> dict[str, Any]:
    out = platform.kubectl("get", "rewardpool", "pool", "-n", ns, "-o", "json", check=False)
    return dict(json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}


def test_operator_settles_a_pool_and_serves_its_proofs(
    local_platform: LocalPlatform,
    platform_env: dict[str, str],
    settle_db: str,
    redis_url: str,
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    eth_rpc_url: str,
    tmp_path: Path,
) -> None:
    ns = f"ol-rwp-{secrets.token_hex(4)}"
    apply(local_platform, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    apply(
        local_platform,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "chain", "namespace": ns},
            "stringData": {"rpcUrl": eth_rpc_url, "signerKey": signer.key},
        },
    )
    apply(
        local_platform,
        {
            "apiVersion": "openledger.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "m", "namespace": ns, "labels": {"team": "a"}},
            "spec": {
                "format": {"name": "sklearn"},
                "storageUri": "pvc://models/m",
                "owner": OWNER,
                "pricing": {"token": "OPEN", "decimals": 18, "perRequest": "0.001"},
            },
        },
    )
    health, metrics, claims = free_port(), free_port(), free_port()
    env = {
        **platform_env,
        "DATABASE_URL": settle_db,
        "OPENLEDGER_HEALTH_PORT": str(health),
        "OPENLEDGER_METRICS_PORT": str(metrics),
        "OPENLEDGER_CLAIMS_PORT": str(claims),
        "OPENLEDGER_NAMESPACES": json.dumps([ns]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-rwp-{ns}",
        "OPENLEDGER_SETTLE_INTERVAL_S": "0.5",
    }
    process = spawn(
        "operator-rwp",
        [sys.executable, "-m", "openledger.cli", "operator"],
        tmp_path / "operator.log",
        detached=False,
        env=env,
    )
    try:

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as resp:
                return bool(json.loads(resp.read())["controllers"])

        wait_ready(process, ready, 60, "operator")
        ingest(settle_db, [usage_event(f"{ns}/pool", OWNER, model=f"{ns}/m") for _ in range(4)])
        apply(
            local_platform,
            {
                "apiVersion": "openledger.io/v1alpha1",
                "kind": "RewardPool",
                "metadata": {"name": "pool", "namespace": ns},
                "spec": {
                    "modelSelector": {"matchLabels": {"team": "a"}},
                    "protocolFeeBps": 500,
                    "epochSeconds": 1,
                    "chain": {
                        "chainId": deployment.chain_id,
                        "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                        "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                        "tokenAddress": deployment.token,
                        "distributorAddress": deployment.distributor,
                        "confirmations": 1,
                    },
                },
            },
        )
        deadline = time.monotonic() + 60
        status: dict[str, Any] = {}
        while time.monotonic() < deadline and not status.get("lastTxHash"):
            time.sleep(0.5)
            status = pool_status(local_platform, ns)
        assert status.get("lastTxHash"), f"{status}\n{tail(process.log_path, 40)}"
        assert status["lastSettledEpoch"] > 0 and status["models"] == 1 and status["settledTotal"] != "0"
        binding = redis.Redis.from_url(redis_url).get(model_pool_key(ns, "m"))
        assert binding is not None and PoolBinding.from_json(binding).pool == f"{ns}/pool"

        with urllib.request.urlopen(f"http://127.0.0.1:{claims}/v1/pools/{ns}/pool/claims/{OWNER}", timeout=5) as resp:
            claim = json.loads(resp.read())
        assert claim["account"] == OWNER and int(claim["amount"]) > 0
        assert claim["distributor"] == deployment.distributor
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert f'openledger_settlement_epochs_settled_total{{pool="{ns}/pool"}}' in text
        assert 'openledger_operator_reconciles_total{kind="RewardPool",result="ok"}' in text
        log_text = process.log_path.read_text()
        assert signer.key[2:] not in log_text and signer.key[2:] not in json.dumps(status)
    finally:
        process.stop()
