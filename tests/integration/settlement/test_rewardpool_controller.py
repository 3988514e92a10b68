"""The RewardPool controller's reconcile against a real API server, Redis, PostgreSQL and anvil."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient

from openledger.controllers.kube import new_api_client
from openledger.controllers.rewardpool import GROUP, PLURAL, VERSION, RewardPools
from openledger.local.platform import LocalPlatform
from openledger.settings import Settings
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.rpc import Chain
from openledger.wire import PoolBinding, model_pool_key

from .conftest import Signer, mine
from .usage import ingest, usage_event

OWNER = "0x" + "e1" * 20


@pytest.fixture
async def api(kubeconfig: object) -> AsyncIterator[ApiClient]:
    api = await new_api_client(Settings(kubeconfig=str(kubeconfig)))
    yield api
    await api.close()


def model(name: str, labels: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "format": {"name": "sklearn"},
            "storageUri": "pvc://models/m",
            "owner": OWNER,
            "pricing": {"token": "OPEN", "decimals": 18, "perRequest": "0.001"},
        },
    }


async def test_pool_binds_selected_models_settles_and_reports_status_without_secrets(
    api: ApiClient,
    redis_url: str,
    settle_db: str,
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    eth_rpc_url: str,
    local_platform: LocalPlatform,
) -> None:
    ns = f"rwp-{uuid.uuid4().hex[:8]}"
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    await core.create_namespace({"metadata": {"name": ns}})
    redis = aioredis.from_url(redis_url)
    pools = RewardPools(api, redis, settle_db)
    try:
        await core.create_namespaced_secret(
            ns, {"metadata": {"name": "chain"}, "stringData": {"rpcUrl": eth_rpc_url, "signerKey": signer.key}}
        )
        for name, labels in (("selected", {"team": "a"}), ("other", {"team": "b"})):
            await custom.create_namespaced_custom_object(GROUP, VERSION, ns, "models", model(name, labels))
        pool = {
            "apiVersion": "openledger.io/v1alpha1",
            "kind": "RewardPool",
            "metadata": {"name": "pool"},
            "spec": {
                "modelSelector": {"matchLabels": {"team": "a"}},
                "protocolFeeBps": 500,
                "epochSeconds": 1,
                "minPayout": "0",
                "chain": {
                    "chainId": deployment.chain_id,
                    "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                    "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                    "tokenAddress": deployment.token,
                    "distributorAddress": deployment.distributor,
                    "confirmations": 1,
                },
            },
        }
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pool)
        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        status = await pools.reconcile(body, settle=False)
        assert status["models"] == 1 and status["phase"] == "Pending"
        raw = await redis.get(model_pool_key(ns, "selected"))
        assert raw is not None and PoolBinding.from_json(raw) == PoolBinding(pool=f"{ns}/pool", fee_bps=500)
        assert await redis.get(model_pool_key(ns, "other")) is None

        ingest(settle_db, [usage_event(f"{ns}/pool", OWNER, model=f"{ns}/selected") for _ in range(3)])
        await asyncio.sleep(2.1)  # let epoch (now // 1) - 1 include the events
        for _ in range(10):
            body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
            status = await pools.reconcile(body, settle=True)
            settled = {c["type"]: c["status"] for c in status["conditions"]}.get("Settled")
            if status.get("lastTxHash") and settled == "True":
                break
            mine(chain)
        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        got = body["status"]
        assert got["lastSettledEpoch"] > 0 and got["lastTxHash"].startswith("0x") and got["settledTotal"] != "0"
        conditions = {c["type"]: c["status"] for c in got["conditions"]}
        assert conditions == {"ChainReachable": "True", "Settled": "True", "Ready": "True", "ModelsBound": "True"}

        events = await core.list_namespaced_event(ns)
        reasons = {e.reason for e in events.items}
        assert {"EpochClosed", "RootPublished", "EpochSettled"} <= reasons
        dumped = json.dumps(got) + " ".join(e.message or "" for e in events.items)
        assert signer.key[2:] not in dumped and eth_rpc_url not in dumped

        # Unselect the model: its binding goes away.
        await custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            "models",
            "selected",
            {"metadata": {"labels": {"team": "c"}}},
            _content_type="application/merge-patch+json",
        )
        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        await pools.reconcile(body, settle=False)
        assert await redis.get(model_pool_key(ns, "selected")) is None
    finally:
        await pools.drop_all_bindings(ns, "pool")
        pools.close()
        await redis.aclose()
        await core.delete_namespace(ns)


async def test_missing_secret_is_reported_naming_the_field(
    api: ApiClient,
    redis_url: str,
    settle_db: str,
    deployment: Deployment,
    local_platform: LocalPlatform,
) -> None:
    ns = f"rwp-{uuid.uuid4().hex[:8]}"
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    await core.create_namespace({"metadata": {"name": ns}})
    pools = RewardPools(api, None, settle_db)
    try:
        pool = {
            "apiVersion": "openledger.io/v1alpha1",
            "kind": "RewardPool",
            "metadata": {"name": "pool"},
            "spec": {
                "modelSelector": {},
                "chain": {
                    "chainId": 31337,
                    "rpcUrlSecretRef": {"name": "nope", "key": "rpcUrl"},
                    "signerKeySecretRef": {"name": "nope", "key": "signerKey"},
                    "tokenAddress": deployment.token,
                    "distributorAddress": deployment.distributor,
                },
            },
        }
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pool)
        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        status = await pools.reconcile(body, settle=True)
        assert status["phase"] == "Failed"
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert "spec.chain.rpcUrlSecretRef" in ready["message"] and "not found" in ready["message"]
    finally:
        pools.close()
        await core.delete_namespace(ns)
