"""Redis restarts empty (the local platform runs it with --save ''): the operator writes back
every Agent's records (config, key hash) and every Model's route within seconds, without
waiting for the full resync, so the gateway serves again with the same API key."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import urllib.request
from pathlib import Path

import redis

from openledger.gateway.records import AgentKeys, apikey_key, hash_api_key
from openledger.local.platform import LocalPlatform
from openledger.local.processes import free_port, spawn, wait_ready
from openledger.wire import model_route_key
from tests.integration.gateway.test_redis_restart import PrivateRedis
from tests.waiting import wait_for

OWNER = "0x" + "ab" * 20
PAYER = "0x" + "cd" * 20


def manifests(namespace: str) -> str:
    model = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "iris", "namespace": namespace},
        "spec": {
            "format": {"name": "sklearn"},
            "storageUri": "gs://example/iris",
            "protocol": "v1",
            "pricing": {"perRequest": "0.001"},
            "owner": OWNER,
        },
    }
    agent = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "agent", "namespace": namespace},
        "spec": {"account": PAYER, "models": ["iris"]},
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [model, agent]})


def test_an_emptied_redis_gets_every_record_back(
    local_platform: LocalPlatform, kubeconfig: Path, tmp_path: Path
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    namespace = f"ol-rr-{secrets.token_hex(4)}"
    health = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "REDIS_URL": private.url,
        "DATABASE_URL": local_platform.endpoints.database_url,
        "OPENLEDGER_HEALTH_PORT": str(health),
        "OPENLEDGER_METRICS_PORT": str(free_port()),
        "OPENLEDGER_CLAIMS_PORT": str(free_port()),
        "OPENLEDGER_NAMESPACES": json.dumps([namespace]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-rr-{secrets.token_hex(4)}",
        "OPENLEDGER_OPERATOR_RESYNC_S": "3600",  # so the full resync cannot be what repairs it
    }
    operator = spawn("operator", [sys.executable, "-m", "openledger.cli", "operator"], tmp_path / "op.log",
                     detached=False, env=env)  # fmt: skip
    try:

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("controllers"))

        wait_ready(operator, ready, 60, "operator")
        local_platform.kubectl("create", "namespace", namespace)
        local_platform.kubectl("apply", "-f", "-", stdin=manifests(namespace))
        rds = redis.Redis.from_url(private.url)
        agent = AgentKeys(f"{namespace}/agent")
        secret = wait_for(
            lambda: (
                local_platform.kubectl(
                    "get", "secret", "-n", namespace, "agent-credentials", "-o", "json", check=False
                ).stdout
            ),
            30,
            "the Agent's Secret",
        )
        api_key = base64.b64decode(json.loads(secret)["data"]["apiKey"]).decode()
        wait_for(lambda: rds.exists(agent.config, model_route_key(namespace, "iris")) == 2, 30, "records in Redis")

        private.stop()
        private.start()  # empty: no persistence
        rds = redis.Redis.from_url(private.url)
        assert rds.dbsize() == 0

        wait_for(lambda: rds.exists(model_route_key(namespace, "iris")), 15, "the Model route back")
        wait_for(lambda: rds.exists(agent.config), 15, "the Agent config back")
        wait_for(lambda: rds.exists(apikey_key(hash_api_key(api_key))), 15, "the same API key accepted again")
        assert api_key not in operator.log_path.read_text()
    finally:
        operator.stop()
        private.stop()
