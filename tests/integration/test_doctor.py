"""``openledger doctor`` as an SRE runs it, against the real API server, PostgreSQL, Redis and anvil.

Each test gets its own database, stream names, Lease name and namespace (the
doctor looks only at the pools of ``OPENLEDGER_NAMESPACES``), so the session's
other objects never change its verdict.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
import yaml
from kubernetes import client, config

from openledger.doctor.decisions import SETTLEMENT_LAG_FAIL_EPOCHS
from openledger.local.processes import free_port
from openledger.settlement.ledger import db as ledger_db
from tests.databases import fresh_database

# The local API server's certificate is self-signed (kubeconfig: insecure-skip-tls-verify).
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

ANVIL_CHAIN_ID = 31337
SIGNER_KEY = "0x" + "5e" * 32  # never printed: the doctor does not even read it
RPC_PASSWORD = "doctor-rpc-password-7f3a"


@dataclass
class Scene:
    env: dict[str, str]
    namespace: str
    lease: str
    core: client.CoreV1Api
    coordination: client.CoordinationV1Api
    objects: client.CustomObjectsApi

    def doctor(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "openledger.cli", "doctor", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env={**self.env, **env})

    def hold_lease(self, renewed: dt.datetime, duration_s: int = 15) -> None:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.lease, namespace="default"),
            spec=client.V1LeaseSpec(
                holder_identity="operator-0-1", lease_duration_seconds=duration_s, renew_time=renewed,
                acquire_time=renewed,
            ),
        )  # fmt: skip
        self.coordination.create_namespaced_lease("default", body)

    def add_pool(self, name: str, rpc_url: str, chain_id: int = ANVIL_CHAIN_ID) -> None:
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"{name}-chain", namespace=self.namespace),
            string_data={"rpcUrl": rpc_url, "signerKey": SIGNER_KEY},
        )
        self.core.create_namespaced_secret(self.namespace, secret)
        ref = {"name": f"{name}-chain"}
        pool = {
            "apiVersion": "openledger.io/v1alpha1",
            "kind": "RewardPool",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "modelSelector": {"matchLabels": {"pool": name}},
                "chain": {
                    "chainId": chain_id,
                    "rpcUrlSecretRef": {**ref, "key": "rpcUrl"},
                    "signerKeySecretRef": {**ref, "key": "signerKey"},
                    "tokenAddress": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                    "distributorAddress": "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
                },
            },
        }
        self.objects.create_namespaced_custom_object("openledger.io", "v1alpha1", self.namespace, "rewardpools", pool)


@pytest.fixture
def scene(kubeconfig: Path, database_url: str, redis_url: str, eth_rpc_url: str) -> Iterator[Scene]:
    tag = uuid.uuid4().hex[:8]
    api = config.new_client_from_config(config_file=str(kubeconfig))
    core = client.CoreV1Api(api)
    namespace = f"doctor-{tag}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    stream, dead = f"test:doctor-{tag}:usage", f"test:doctor-{tag}:dead"
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(stream, "ledger", id="0", mkstream=True)
    with fresh_database(database_url, "doctor") as url:
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "ETH_RPC_URL": eth_rpc_url,
            "OPENLEDGER_NAMESPACES": json.dumps([namespace]),
            "OPENLEDGER_LEADER_LEASE_NAME": f"doctor-{tag}",
            "OPENLEDGER_OPERATOR_NAMESPACE": "default",
            "OPENLEDGER_USAGE_STREAM": stream,
            "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": dead,
            "OPENLEDGER_USAGE_CONSUMER_GROUP": "ledger",
        }
        scene = Scene(
            env, namespace, f"doctor-{tag}", core, client.CoordinationV1Api(api), client.CustomObjectsApi(api)
        )
        try:
            yield scene
        finally:
            r.delete(stream, dead)
            r.close()
            with contextlib.suppress(client.ApiException):
                scene.coordination.delete_namespaced_lease(scene.lease, "default")
            core.delete_namespace(namespace)
            api.close()


def _checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    document = json.loads(result.stdout)
    return {c["name"]: c for c in document["checks"]}


def _with_credentials(rpc_url: str) -> str:
    scheme, rest = rpc_url.split("://", 1)
    return f"{scheme}://doctor:{RPC_PASSWORD}@{rest}"


def test_healthy_platform_passes_with_a_json_report(scene: Scene, eth_rpc_url: str) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    scene.add_pool("main", _with_credentials(eth_rpc_url))

    result = scene.doctor("-o", "json")

    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True
    checks = {c["name"]: c for c in document["checks"]}
    assert all(set(c) == {"name", "status", "detail", "hint"} for c in document["checks"])
    expected = {
        "api server", "crd models.openledger.io", "crd agents.openledger.io", "crd rewardpools.openledger.io",
        "operator leader", "redis", "postgresql schema", "ingest lag", "dead letters", "settlement",
        f"chain {scene.namespace}/main", "ledger verify",
    }  # fmt: skip
    assert set(checks) == expected
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "ok"} == {}
    assert "operator-0-1" in checks["operator leader"]["detail"]
    assert scene.env["DATABASE_URL"].rsplit("/", 1)[1] in checks["postgresql schema"]["detail"]
    assert f"eth_chainId {ANVIL_CHAIN_ID}" in checks[f"chain {scene.namespace}/main"]["detail"]
    assert (
        "no drift" in checks["ledger verify"]["detail"]
        and "chain: 0 pool(s) checked" in checks["ledger verify"]["detail"]
    )
    assert RPC_PASSWORD not in result.stdout + result.stderr
    assert SIGNER_KEY not in result.stdout + result.stderr


def test_yaml_and_table_outputs_say_the_same(scene: Scene) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    as_yaml = scene.doctor("-o", "yaml")
    table = scene.doctor()
    assert as_yaml.returncode == table.returncode == 0, as_yaml.stdout + table.stdout
    document = yaml.safe_load(as_yaml.stdout)
    assert document["ok"] is True
    for check in document["checks"]:
        assert any(line.split()[0] == check["status"].upper() and check["name"] in line
                   for line in table.stdout.splitlines())  # fmt: skip
    assert table.stdout.strip().endswith(f"{len(document['checks'])} checks")


def test_no_leader_lease_fails_naming_the_check(scene: Scene) -> None:
    result = scene.doctor("-o", "json")

    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False
    leader = _checks(result)["operator leader"]
    assert leader["status"] == "fail" and f"no Lease default/{scene.lease}" in leader["detail"]
    assert leader["hint"]


def test_expired_lease_fails(scene: Scene) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60), duration_s=15)

    result = scene.doctor("-o", "json")

    assert result.returncode == 1
    leader = _checks(result)["operator leader"]
    assert leader["status"] == "fail" and "expired" in leader["detail"]


def test_stopped_redis_fails_fast_and_names_redis(scene: Scene) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    dead_redis = f"redis://doctor:{RPC_PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there

    started = time.monotonic()
    result = scene.doctor("-o", "json", "--timeout", "2", REDIS_URL=dead_redis)
    elapsed_s = time.monotonic() - started

    assert result.returncode == 1
    checks = _checks(result)
    assert checks["redis"]["status"] == "fail" and "REDIS_URL" in checks["redis"]["hint"]
    assert checks["ingest lag"]["status"] == "fail"
    assert checks["postgresql schema"]["status"] == "ok"
    assert elapsed_s < 30, f"doctor took {elapsed_s:.1f} s with Redis down"
    assert RPC_PASSWORD not in result.stdout + result.stderr


def test_old_schema_fails_with_the_upgrade_hint(scene: Scene, database_url: str) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    with fresh_database(database_url, "doctorold", migrate=False) as old:
        ledger_db.upgrade(old, "0100_settlement")

        result = scene.doctor("-o", "json", DATABASE_URL=old)

    assert result.returncode == 1
    schema = _checks(result)["postgresql schema"]
    assert schema["status"] == "fail" and "old: at 0100_settlement" in schema["detail"]
    assert "openledger db upgrade" in schema["hint"]


def test_pool_on_the_wrong_chain_fails_and_keeps_its_rpc_url_secret(scene: Scene, eth_rpc_url: str) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    scene.add_pool("other", _with_credentials(eth_rpc_url), chain_id=1)
    scene.add_pool("gone", f"http://doctor:{RPC_PASSWORD}@127.0.0.1:{free_port()}")

    result = scene.doctor("-o", "json", "--timeout", "2")

    assert result.returncode == 1
    checks = _checks(result)
    other = checks[f"chain {scene.namespace}/other"]
    assert other["status"] == "fail" and "eth_chainId 31337, spec.chain.chainId is 1" in other["detail"]
    assert checks[f"chain {scene.namespace}/gone"]["status"] == "fail"
    assert RPC_PASSWORD not in result.stdout + result.stderr
    assert SIGNER_KEY not in result.stdout + result.stderr


def test_dead_letters_and_ingest_lag_are_reported(scene: Scene, redis_url: str) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    r = redis.Redis.from_url(redis_url)
    try:
        r.xadd(scene.env["OPENLEDGER_USAGE_DEAD_LETTER_STREAM"], {"dead_id": "1-0", "reason": "poison"})
        # An entry written 10 minutes ago (stream ids are milliseconds) that no worker has read.
        old_ms = int(time.time() * 1000) - 600_000
        r.xadd(scene.env["OPENLEDGER_USAGE_STREAM"], {"event": "x"}, id=f"{old_ms}-0")

        result = scene.doctor("-o", "json")
    finally:
        r.close()

    assert result.returncode == 1
    checks = _checks(result)
    assert checks["dead letters"]["status"] == "fail" and "replay-dead" in checks["dead letters"]["hint"]
    ingest = checks["ingest lag"]
    assert ingest["status"] == "fail" and "1 undelivered" in ingest["detail"], ingest


def test_a_redis_that_accepts_but_never_answers_fails_within_the_timeout(scene: Scene) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]

        started = time.monotonic()
        result = scene.doctor("-o", "json", "--timeout", "1", REDIS_URL=f"redis://127.0.0.1:{port}/0")
        elapsed_s = time.monotonic() - started

    assert result.returncode == 1
    checks = _checks(result)
    assert checks["redis"]["status"] == "fail" and "timed out" in checks["redis"]["detail"].lower()
    assert checks["ingest lag"]["status"] == "fail"
    assert elapsed_s < 15, f"doctor took {elapsed_s:.1f} s with a silent Redis"


def test_settlement_lag_per_pool_fails_past_its_threshold(scene: Scene) -> None:
    scene.hold_lease(dt.datetime.now(dt.UTC))
    with psycopg.connect(scene.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("INSERT INTO epochs (pool, epoch, status) VALUES ('ns/settled', 1, 'settled')")
        for epoch in range(10, 10 + SETTLEMENT_LAG_FAIL_EPOCHS):
            conn.execute("INSERT INTO epochs (pool, epoch, status) VALUES ('ns/stuck', %s, 'closed')", (epoch,))

    result = scene.doctor("-o", "json")

    assert result.returncode == 1
    checks = _checks(result)
    assert checks["settlement ns/settled"]["status"] == "ok"
    stuck = checks["settlement ns/stuck"]
    assert stuck["status"] == "fail" and f"{SETTLEMENT_LAG_FAIL_EPOCHS} closed epoch(s) not settled" in stuck["detail"]
    assert "oldest unsettled 10" in stuck["detail"] and "last settled epoch none yet" in stuck["detail"]
