"""RewardPool bindings and chain identity through the controller (real API server, Redis, PostgreSQL, anvil).

* A Model belongs to at most one pool: the younger pool selecting it is refused
  (condition ModelsBound + Event), and repeated reconciles never flip the binding.
* A Model priced in other decimals than the pool's token is refused at binding
  time, so its usage never reaches the ledger as an unsettleable event.
* A pool deleted and re-created with the same name over a fresh contract does not
  republish its cumulative history there: no account can claim twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient

from openledger.controllers.kube import new_api_client
from openledger.controllers.rewardpool import GROUP, PLURAL, VERSION, RewardPools
from openledger.settings import Settings
from openledger.settlement import epochs as ep
from openledger.settlement.chain.deploy import Deployment, deploy
from openledger.settlement.chain.distributor import Distributor, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.wire import PoolBinding, model_pool_key

from .conftest import Signer, mine, new_signer
from .test_rewardpool_controller import model
from .test_settler_anvil import claim
from .usage import ingest, usage_event

OWNER = "0x" + "e1" * 20


@pytest.fixture
async def api(kubeconfig: object) -> AsyncIterator[ApiClient]:
    api = await new_api_client(Settings(kubeconfig=str(kubeconfig)))
    yield api
    await api.close()


def pool_manifest(name: str, d: Deployment, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "RewardPool",
        "metadata": {"name": name},
        "spec": {
            "modelSelector": {"matchLabels": selector},
            "protocolFeeBps": 500,
            "epochSeconds": 1,
            "chain": {
                "chainId": d.chain_id,
                "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                "tokenAddress": d.token,
                "distributorAddress": d.distributor,
                "confirmations": 1,
            },
            **spec,
        },
    }


async def reasons_of(core: client.CoreV1Api, ns: str, reason: str) -> list[str]:
    events = await core.list_namespaced_event(ns)
    return [f"{e.involved_object.kind}/{e.involved_object.name}" for e in events.items if e.reason == reason]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


async def test_a_model_belongs_to_one_pool_and_a_wrongly_priced_model_is_refused_up_front(
    api: ApiClient, redis_url: str, settle_db: str, deployment: Deployment, chain: Chain, signer: Signer
) -> None:
    ns = f"rwb-{uuid.uuid4().hex[:8]}"
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    await core.create_namespace({"metadata": {"name": ns}})
    redis = aioredis.from_url(redis_url)
    pools = RewardPools(api, redis, settle_db)
    other = deploy(chain.w3, signer.key, token=deployment.token)
    try:
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, "models", model("shared", {"team": "a"}))
        six = model("six", {"team": "a"})
        six["spec"]["pricing"] = {"token": "USDC", "decimals": 6, "perRequest": "0.01"}  # type: ignore[index]
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, "models", six)
        await custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, pool_manifest("old", deployment, {"team": "a"})
        )
        await asyncio.sleep(1.1)  # creationTimestamp has a resolution of one second
        await custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, pool_manifest("young", other, {"team": "a"}, protocolFeeBps=100)
        )

        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "young")
        await pools.reconcile(body, settle=False)
        assert await redis.get(model_pool_key(ns, "shared")) is None  # the older pool holds it, even unsynced
        for name in ("old", "young", "young", "old", "young"):  # any order, any number: the binding never flips
            body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            await pools.reconcile(body, settle=False)
            raw = await redis.get(model_pool_key(ns, "shared"))
            assert raw is not None and PoolBinding.from_json(raw) == PoolBinding(pool=f"{ns}/old", fee_bps=500)
        assert await redis.get(model_pool_key(ns, "six")) is None  # decimals 6 vs the pool token's 18

        old = (await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "old"))["status"]
        young = (await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "young"))["status"]
        assert old["models"] == 1 and condition(old, "ModelsBound")["reason"] == "DecimalsMismatch"
        assert "spec.pricing.decimals 6" in condition(old, "ModelsBound")["message"]
        assert young["models"] == 0 and condition(young, "ModelsBound")["status"] == "False"
        assert f"{ns}/old" in condition(young, "ModelsBound")["message"]
        refused = await reasons_of(core, ns, "ModelRefused")
        assert {"RewardPool/young", "RewardPool/old", "Model/shared", "Model/six"} <= set(refused)
        assert refused.count("Model/shared") == 1  # once per change, not once per reconcile

        # The older pool goes away: the Model passes to the younger one.
        await custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "old")
        await pools.drop_all_bindings(ns, "old")
        await pools.models_changed(ns)
        raw = await redis.get(model_pool_key(ns, "shared"))
        assert raw is not None and PoolBinding.from_json(raw).pool == f"{ns}/young"
    finally:
        for name in ("old", "young"):
            await pools.drop_all_bindings(ns, name)
        pools.close()
        await redis.aclose()
        await core.delete_namespace(ns)


async def settle_pool(pools: RewardPools, custom: client.CustomObjectsApi, ns: str, chain: Chain) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for _ in range(12):
        body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        status = await pools.reconcile(body, settle=True)
        if status.get("lastTxHash") and condition(status, "Settled")["status"] == "True":
            return status
        mine(chain)
    raise AssertionError(f"not settled: {status}")


async def test_a_pool_recreated_over_a_fresh_contract_does_not_republish_its_paid_history(
    api: ApiClient,
    redis_url: str,
    settle_db: str,
    deployment: Deployment,
    chain: Chain,
    signer: Signer,
    eth_rpc_url: str,
    db_conn: Any,
) -> None:
    ns = f"rwr-{uuid.uuid4().hex[:8]}"
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    await core.create_namespace({"metadata": {"name": ns}})
    pools = RewardPools(api, None, settle_db)
    try:
        await core.create_namespaced_secret(
            ns, {"metadata": {"name": "chain"}, "stringData": {"rpcUrl": eth_rpc_url, "signerKey": signer.key}}
        )
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pool_manifest("pool", deployment, {}))
        ingest(settle_db, [usage_event(f"{ns}/pool", OWNER) for _ in range(3)])
        await asyncio.sleep(2.1)
        await settle_pool(pools, custom, ns, chain)
        epoch = ep.latest_epoch(db_conn, f"{ns}/pool", (ep.SETTLED,))
        assert epoch is not None
        amount, proof = ep.proof_of(db_conn, f"{ns}/pool", epoch.epoch, OWNER)  # type: ignore[misc]
        assert claim(chain, deployment, new_signer(chain), OWNER, amount, proof) == 1

        # Deleted and re-created with the same name over a fresh contract (as the delete handler would).
        await custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
        pools.settlers.pop(f"{ns}/pool").settler.close()
        fresh = deploy(chain.w3, signer.key, token=deployment.token)
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pool_manifest("pool", fresh, {}))
        ingest(settle_db, [usage_event(f"{ns}/pool", OWNER)])
        await asyncio.sleep(1.1)
        for _ in range(3):
            body = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pool")
            status = await pools.reconcile(body, settle=True)
            mine(chain)
        settled = condition(status, "Settled")
        assert status["phase"] == "Failed" and settled["status"] == "False" and settled["reason"] == "IdentityChanged"
        assert "new RewardPool" in settled["message"]
        state = Distributor(chain, fresh.distributor).state()
        assert state.epoch == 0 and state.cumulative_total == 0  # nothing to claim a second time
        assert token_balance(chain, deployment.token, fresh.distributor) == 0
        assert token_balance(chain, deployment.token, OWNER) == amount
        assert len(await reasons_of(core, ns, "IdentityChanged")) == 1  # one Event, not one per pass
    finally:
        pools.close()
        await core.delete_namespace(ns)
