"""Redis restarts empty (the local platform runs it with --save ''): the operator writes back
every Agent's records (config, key hash) and every Model's route within seconds, without
waiting for the full resync, so the gateway serves again with the same API key.

And a Hard budget survives the loss: the operator rebuilds the period's spend from the
ledger plus the stream's events the ledger has not ingested yet before the gateway admits
a budgeted request again (503 ``spend_restoring`` until then)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

from openledger.gateway.records import AgentKeys, apikey_key, hash_api_key, period_id
from openledger.local.platform import LocalPlatform
from openledger.local.processes import ManagedProcess, free_port, spawn, wait_ready
from openledger.wire import Price, model_route_key
from tests.databases import fresh_database
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    route_model,
    usage_events,
)
from tests.integration.gateway.test_redis_restart import PrivateRedis
from tests.integration.ledger.conftest import LedgerEnv, ThreadWorker
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


def spawn_operator(
    kubeconfig: Path, redis_url: str, database_url: str, namespace: str, log_dir: Path, **extra: str
) -> ManagedProcess:
    """The real operator process, watching ``namespace`` only, ready to act."""
    health = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "OPENLEDGER_HEALTH_PORT": str(health),
        "OPENLEDGER_METRICS_PORT": str(free_port()),
        "OPENLEDGER_CLAIMS_PORT": str(free_port()),
        "OPENLEDGER_NAMESPACES": json.dumps([namespace]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-rr-{secrets.token_hex(4)}",
        "OPENLEDGER_OPERATOR_RESYNC_S": "3600",  # so the full resync cannot be what repairs it
        **extra,
    }
    operator = spawn("operator", [sys.executable, "-m", "openledger.cli", "operator"], log_dir / "op.log",
                     detached=False, env=env)  # fmt: skip

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("controllers"))

    wait_ready(operator, ready, 60, "operator")
    return operator


def test_an_emptied_redis_gets_every_record_back(
    local_platform: LocalPlatform, kubeconfig: Path, database_url: str, tmp_path: Path
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    namespace = f"ol-rr-{secrets.token_hex(4)}"
    operator = spawn_operator(kubeconfig, private.url, database_url, namespace, tmp_path)
    try:
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

        rds.set("test:before-restart", "1")  # nothing writes it back: it proves the restart was empty
        private.stop()
        private.start()  # empty: no persistence
        rds = redis.Redis.from_url(private.url)
        assert not rds.exists("test:before-restart")  # (the operator may have written records back already)

        wait_for(lambda: rds.exists(model_route_key(namespace, "iris")), 15, "the Model route back")
        wait_for(lambda: rds.exists(agent.config), 15, "the Agent config back")
        wait_for(lambda: rds.exists(apikey_key(hash_api_key(api_key))), 15, "the same API key accepted again")
        assert api_key not in operator.log_path.read_text()
    finally:
        operator.stop()
        private.stop()


TOKEN = 10**18  # one whole token in base units: the price of one request below


def budget_agent(namespace: str) -> str:
    agent = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "spender", "namespace": namespace},
        "spec": {
            "account": PAYER,
            "models": ["iris"],
            "budget": {"amount": "5", "period": "Day", "enforcement": "Hard"},
        },
    }
    return json.dumps(agent)


def spend_record(rds: redis.Redis, keys: AgentKeys) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in rds.hgetall(keys.spend).items()}


def set_connections(database_url: str, allowed: bool) -> None:
    """Let PostgreSQL accept connections to the database, or refuse them (the database is "down")."""
    server, name = database_url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def ingest_all(ledger: LedgerEnv, expected_events: int) -> None:
    """Run the ledger worker until it holds ``expected_events``, then stop it."""
    worker = ThreadWorker(ledger.config())
    try:
        ledger.wait_for(lambda: ledger.count() == expected_events, 30, f"{expected_events} events in the ledger")
    finally:
        worker.close()


def test_a_hard_budget_holds_across_a_redis_loss_spend_is_rebuilt_from_ledger_and_stream(
    local_platform: LocalPlatform,
    kubeconfig: Path,
    database_url: str,
    model_servers: ModelServers,
    start_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    namespace = f"ol-rr-{secrets.token_hex(4)}"
    ref = f"{namespace}/spender"
    keys = AgentKeys(ref)
    rds = redis.Redis.from_url(private.url)
    price = Price(per_request=TOKEN)
    with fresh_database(database_url, "spend") as ledger_url:
        gateway = start_gateway(redis=private.url)
        ledger = LedgerEnv(ledger_url, private.url, gateway.stream, f"{gateway.stream}:dead", log_dir=tmp_path)
        operator = spawn_operator(
            kubeconfig, private.url, ledger_url, namespace, tmp_path, OPENLEDGER_USAGE_STREAM=gateway.stream
        )
        url = f"{gateway.url}/v1/models/iris:predict"
        try:
            local_platform.kubectl("create", "namespace", namespace)
            local_platform.kubectl("apply", "-f", "-", stdin=budget_agent(namespace))
            secret = wait_for(
                lambda: (
                    local_platform.kubectl(
                        "get", "secret", "-n", namespace, "spender-credentials", "-o", "json", check=False
                    ).stdout
                ),
                30,
                "the Agent's Secret",
            )
            key = base64.b64decode(json.loads(secret)["data"]["apiKey"]).decode()
            route_model(rds, namespace, "iris", model_servers.iris_url, price=price)
            # A new Agent's spend record comes from the (empty) ledger: 0 in this period.
            wait_for(lambda: spend_record(rds, keys).get("spent") == "0", 20, "the spend record of a new Agent")

            # 4 of the 5 tokens: 2 requests the ledger ingests, then 2 only in the stream.
            assert [post(url, {"instances": [IRIS_ROW]}, key)[0] for _ in range(2)] == [200, 200]
            ingest_all(ledger, 2)
            assert [post(url, {"instances": [IRIS_ROW]}, key)[0] for _ in range(2)] == [200, 200]
            assert len(usage_events(rds, gateway.stream, ref)) == 4  # the ingested ones are still there too
            assert spend_record(rds, keys)["spent"] == str(4 * TOKEN)

            # Redis loses everything but the stream (a failover to a replica that had only the
            # stream, eviction…), and PostgreSQL is down: budgeted admission waits, never resets.
            set_connections(ledger_url, False)
            for stale in rds.scan_iter(match="openledger:*"):
                if stale != gateway.stream.encode():
                    rds.delete(stale)
            route_model(rds, namespace, "iris", model_servers.iris_url, price=price)
            answers = wait_for(
                lambda: (a := post(url, {"instances": [IRIS_ROW]}, key)) and a[0] == 503 and a, 20, "503 answers"
            )
            headers = {k.lower(): v for k, v in answers[1].items()}
            assert "restored" in json.dumps(answers[2]) and headers.get("retry-after") == "1"
            wait_for(lambda: agent_reason(local_platform, namespace, "LimitsApplied") == "SpendRestoring", 20,
                     "the SpendRestoring condition")  # fmt: skip
            for _ in range(5):
                assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 503
            assert not rds.exists(keys.spend)

            # PostgreSQL back: the spend is the ledger's 2 plus the stream's 2, exactly.
            set_connections(ledger_url, True)
            wait_for(lambda: rds.exists(keys.spend), 20, "the rebuilt spend record")
            period = period_id("Day", time.time())
            assert spend_record(rds, keys) == {"period": period, "spent": str(4 * TOKEN)}
            assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
            assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 402  # the Hard budget is spent

            # An empty Redis (FLUSHALL: the stream is gone too): the ledger holds all 5.
            ingest_all(ledger, 5)
            rds.flushall()
            route_model(rds, namespace, "iris", model_servers.iris_url, price=price)
            wait_for(lambda: rds.exists(keys.spend), 20, "the spend record rebuilt from the ledger")
            assert spend_record(rds, keys) == {"period": period, "spent": str(5 * TOKEN)}
            assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 402
            wait_for(lambda: agent_reason(local_platform, namespace, "LimitsApplied") == "Applied", 20, "Applied")
        finally:
            set_connections(ledger_url, True)
            operator.stop()
            private.stop()


def agent_reason(platform: LocalPlatform, namespace: str, condition: str) -> str | None:
    out = platform.kubectl("get", "agent", "-n", namespace, "spender", "-o", "json", check=False).stdout
    for cond in (json.loads(out or "{}").get("status") or {}).get("conditions") or []:
        if cond["type"] == condition:
            return str(cond.get("reason"))
    return None
