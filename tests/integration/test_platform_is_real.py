"""The local platform's components are the real servers, and they behave like them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from eth_account import Account
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from web3 import Web3

from openledger.local.platform import ANVIL_CHAIN_ID, ANVIL_DEV_KEY, LocalPlatform, shared_crd_dir


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api_client:
        yield api_client


def widget_crd(group: str) -> dict[str, object]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


async def test_a_new_crd_and_object_are_seen_through_a_watch(api: client.ApiClient) -> None:
    group = f"t{uuid.uuid4().hex[:8]}.openledger.io"
    await client.ApiextensionsV1Api(api).create_custom_resource_definition(widget_crd(group))
    custom = client.CustomObjectsApi(api)

    async def create_when_served() -> None:
        for _ in range(100):
            try:
                await custom.create_namespaced_custom_object(
                    group,
                    "v1",
                    "default",
                    "widgets",
                    {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}},
                )
                return
            except ApiException as exc:
                if exc.status != 404:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("CRD never became served")

    await create_when_served()
    seen = []
    async with watch.Watch() as stream:
        async for event in stream.stream(
            custom.list_namespaced_custom_object, group, "v1", "default", "widgets", timeout_seconds=10
        ):
            seen.append((event["type"], event["object"]["metadata"]["name"], event["object"]["spec"]["size"]))
            break
    assert seen == [("ADDED", "w1", 3)]

    with pytest.raises(ApiException) as rejected:
        await custom.create_namespaced_custom_object(
            group,
            "v1",
            "default",
            "widgets",
            {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"size": 0}},
        )
    assert rejected.value.status == 422
    assert "spec.size" in rejected.value.body


@pytest.mark.skipif(
    shared_crd_dir() is None, reason="../shared/third_party/crds is absent: no real KServe schema to validate against"
)
async def test_the_real_kserve_schema_rejects_an_invalid_inference_service(api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "bad-isvc"},
        "spec": {"predictor": {"minReplicas": "many", "model": {"modelFormat": {"name": "sklearn"}}}},
    }
    with pytest.raises(ApiException) as rejected:
        await custom.create_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", "default", "inferenceservices", body
        )
    assert rejected.value.status == 422
    assert "spec.predictor.minReplicas" in rejected.value.body

    body["spec"] = {
        "predictor": {"minReplicas": 0, "model": {"modelFormat": {"name": "sklearn"}, "storageUri": "gs://x"}}
    }
    body["metadata"] = {"name": "good-isvc"}
    created = await custom.create_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", "default", "inferenceservices", body
    )
    assert created["spec"]["predictor"]["model"]["storageUri"] == "gs://x"


def test_postgres_rolls_back_and_commits(database_url: str) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url) as conn:
        conn.execute(f"create table {table} (id int primary key)")
        conn.commit()
        with conn.transaction():
            conn.execute(f"insert into {table} values (1)")
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute(f"insert into {table} values (2)")
            raise RuntimeError("roll back")
        rows = conn.execute(f"select id from {table} order by id").fetchall()
    assert rows == [(1,)]


async def test_redis_stream_consumer_group_round_trip(redis_url: str) -> None:
    stream = f"test:{uuid.uuid4().hex}"
    r = aioredis.from_url(redis_url)
    try:
        await r.xgroup_create(stream, "g", id="0", mkstream=True)
        sent = await r.xadd(stream, {"k": "v"})
        [[_, entries]] = await r.xreadgroup("g", "c1", {stream: ">"}, count=10)
        assert entries == [(sent, {b"k": b"v"})]
        assert (await r.xpending(stream, "g"))["pending"] == 1
        assert await r.xack(stream, "g", sent) == 1
        assert (await r.xpending(stream, "g"))["pending"] == 0
    finally:
        await r.delete(stream)
        await r.aclose()


def test_a_signed_transaction_is_mined_on_anvil(eth_rpc_url: str) -> None:
    w3 = Web3(Web3.HTTPProvider(eth_rpc_url))
    sender = Account.from_key(ANVIL_DEV_KEY)
    receiver = Account.create().address
    tx = {
        "to": receiver,
        "value": 12345,
        "nonce": w3.eth.get_transaction_count(sender.address),
        "gas": 21000,
        "maxFeePerGas": w3.to_wei(10, "gwei"),
        "maxPriorityFeePerGas": 1,
        "chainId": ANVIL_CHAIN_ID,
        "type": 2,
    }
    signed = sender.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)
    assert receipt["status"] == 1
    assert w3.eth.get_balance(receiver) == 12345


def test_postgres_restart_keeps_committed_data(local_platform: LocalPlatform, database_url: str) -> None:
    table = f"r_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"create table {table} (v int)")
        conn.execute(f"insert into {table} values (7)")
    local_platform.restart_component("postgres")
    with psycopg.connect(database_url) as conn:
        assert conn.execute(f"select v from {table}").fetchall() == [(7,)]
