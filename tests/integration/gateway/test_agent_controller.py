"""The Agent controller in the real operator process, against the real API server and Redis,
with the gateway in front of a real kserve model server."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import redis
from kubernetes.client.exceptions import ApiException

from openledger.controllers.agent_builder import AGENT_LABEL
from openledger.gateway.lifetimes import inflight_ttl_s
from openledger.gateway.records import AgentKeys, apikey_key, hash_api_key
from openledger.local.processes import ManagedProcess, free_port, spawn, wait_ready
from tests.databases import fresh_database
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    PAYER,
    GatewayProcess,
    ModelServers,
    post,
    route_model,
    wait_for,
)

GROUP, VERSION = "openledger.io", "v1alpha1"

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="module")
def kube(kubeconfig: Path) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="module")
def ledger_url(database_url: str) -> Iterator[str]:
    with fresh_database(database_url, "agents") as url:
        yield url


@pytest.fixture(scope="module")
def operator(
    kubeconfig: Path,
    redis_url: str,
    ledger_url: str,
    shared_gateway: GatewayProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ManagedProcess]:
    health, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "REDIS_URL": redis_url,
        "DATABASE_URL": ledger_url,  # budgets' spend is rebuilt from this ledger
        "OPENLEDGER_USAGE_STREAM": shared_gateway.stream,
        "OPENLEDGER_HEALTH_PORT": str(health),
        "OPENLEDGER_METRICS_PORT": str(metrics),
        "OPENLEDGER_NAMESPACES": json.dumps(["ol-agt-*"]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-agt-{secrets.token_hex(4)}",
        "OPENLEDGER_LEADER_LEASE_DURATION_S": "4",
        "OPENLEDGER_LEADER_RENEW_PERIOD_S": "1",
    }
    log_dir = tmp_path_factory.mktemp("agent-operator")
    process = spawn(
        "operator",
        [sys.executable, "-m", "openledger.cli", "operator"],
        log_dir / "operator.log",
        detached=False,
        env=env,
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("controllers"))

    wait_ready(process, ready, 60, "operator")
    yield process
    process.stop(15)


@pytest.fixture
def agent_ns(kube: kubernetes.client.ApiClient) -> str:
    name = f"ol-agt-{secrets.token_hex(4)}"
    kubernetes.client.CoreV1Api(kube).create_namespace({"metadata": {"name": name}})
    return name


def _agent(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "account": PAYER,
        "models": ["iris"],
        "limits": {"requestsPerSecond": 100, "burst": 100},
        "budget": {"amount": "5", "period": "Day", "enforcement": "Hard"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": ns},
        "spec": body,
    }


def _get(kube: kubernetes.client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return dict(
            kubernetes.client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, ns, "agents", name)
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _secret_key(kube: kubernetes.client.ApiClient, ns: str, name: str) -> str | None:
    try:
        secret = kubernetes.client.CoreV1Api(kube).read_namespaced_secret(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return base64.b64decode(secret.data["apiKey"]).decode() if secret.data and "apiKey" in secret.data else None


def agent_status_spent(kube: kubernetes.client.ApiClient, ns: str) -> str | None:
    return ((_get(kube, ns, "bot") or {}).get("status") or {}).get("spentThisPeriod")


def _condition(agent: dict[str, Any] | None, type_: str) -> str | None:
    for cond in ((agent or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return str(cond["status"])
    return None


def test_agent_gets_a_key_limits_and_status_and_the_gateway_accepts_it(
    operator: ManagedProcess,
    kube: kubernetes.client.ApiClient,
    agent_ns: str,
    rds: redis.Redis,
    shared_gateway: GatewayProcess,
    model_servers: ModelServers,
) -> None:
    objects = kubernetes.client.CustomObjectsApi(kube)
    objects.create_namespaced_custom_object(GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "bot"))
    key = wait_for(lambda: _secret_key(kube, agent_ns, "bot-credentials"), 20, "the credentials Secret")
    agent = wait_for(lambda: (a := _get(kube, agent_ns, "bot")) and _condition(a, "Ready") == "True" and a, 20, "Ready")
    status = agent["status"]
    assert status["secretName"] == "bot-credentials"
    assert _condition(agent, "CredentialsIssued") == "True" and _condition(agent, "LimitsApplied") == "True"
    assert key not in json.dumps(agent)  # the key is never in status
    ref = f"{agent_ns}/bot"
    assert rds.get(apikey_key(hash_api_key(key))) == ref.encode()
    stored = json.dumps({k.decode(): v.decode() for k, v in rds.hgetall(AgentKeys(ref).config).items()})
    assert key not in stored and hash_api_key(key) in stored
    assert rds.exists(AgentKeys(ref).queue) and rds.xinfo_groups(AgentKeys(ref).queue)[0]["name"] == b"gateway"
    secret = kubernetes.client.CoreV1Api(kube).read_namespaced_secret("bot-credentials", agent_ns)
    assert secret.metadata.owner_references[0].kind == "Agent" and secret.metadata.owner_references[0].name == "bot"

    route_model(rds, agent_ns, "iris", model_servers.iris_url)
    assert post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)[0] == 200
    wait_for(
        lambda: ((_get(kube, agent_ns, "bot") or {}).get("status") or {}).get("spentThisPeriod") == "0.001",
        10,
        "spentThisPeriod from the status timer",
    )

    # A budget 10^6 times larger (base units far beyond 2^53): this period's spend is kept, exactly.
    assert rds.hget(AgentKeys(ref).spend, "spent") == str(10**15).encode()
    objects.patch_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", "bot", {"spec": {"budget": {"amount": "5000000"}}}
    )
    wait_for(lambda: rds.hget(AgentKeys(ref).config, "budget") == str(5 * 10**24).encode(), 10, "the new budget")
    wait_for(
        lambda: ((_get(kube, agent_ns, "bot") or {}).get("status") or {}).get("budgetRemaining") == "4999999.999",
        10,
        "the budget remaining after the change",
    )
    assert agent_status_spent(kube, agent_ns) == "0.001"

    # A spec change is applied with a new config version.
    version = int(rds.hget(AgentKeys(ref).config, "version"))
    objects.patch_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", "bot", {"spec": {"limits": {"burst": 7}}}
    )
    wait_for(lambda: int(rds.hget(AgentKeys(ref).config, "version")) > version, 10, "a new config version")
    assert rds.hget(AgentKeys(ref).config, "burst") == b"7"


def test_deleting_the_secret_rotates_the_key_and_deleting_the_agent_revokes_within_1_s(
    operator: ManagedProcess,
    kube: kubernetes.client.ApiClient,
    agent_ns: str,
    rds: redis.Redis,
    shared_gateway: GatewayProcess,
    model_servers: ModelServers,
) -> None:
    objects = kubernetes.client.CustomObjectsApi(kube)
    core = kubernetes.client.CoreV1Api(kube)
    objects.create_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "bot", credentialsSecretName="bot-key")
    )
    old = wait_for(lambda: _secret_key(kube, agent_ns, "bot-key"), 20, "the credentials Secret")
    route_model(rds, agent_ns, "iris", model_servers.iris_url)
    url = f"{shared_gateway.url}/v1/models/iris:predict"
    wait_for(lambda: post(url, {"instances": [IRIS_ROW]}, old)[0] == 200, 10, "the first key to work")

    core.delete_namespaced_secret("bot-key", agent_ns)
    new = wait_for(lambda: (k := _secret_key(kube, agent_ns, "bot-key")) and k != old and k, 20, "a rotated key")
    assert post(url, {"instances": [IRIS_ROW]}, old)[0] == 401
    assert post(url, {"instances": [IRIS_ROW]}, new)[0] == 200
    assert wait_for(lambda: (a := _get(kube, agent_ns, "bot")) and a["status"]["conditions"], 5)

    # A request admitted just before the deletion holds a slot and a reservation (as admit.lua
    # writes them): they must outlive the revocation so that request still settles and is metered.
    keys = AgentKeys(f"{agent_ns}/bot")
    rds.zadd(keys.inflight, {"req-in-flight": (time.time() + 60) * 1e6})
    rds.hset(keys.reserved, mapping={"req-in-flight": str(10**18), "_total": str(10**18)})
    objects.delete_namespaced_custom_object(GROUP, VERSION, agent_ns, "agents", "bot")
    deleted_at = time.monotonic()
    wait_for(lambda: post(url, {"instances": [IRIS_ROW]}, new)[0] == 401, 5, "revocation")
    assert time.monotonic() - deleted_at <= 1.0
    wait_for(lambda: _get(kube, agent_ns, "bot") is None, 10, "the Agent to go (finalizer done)")
    assert _secret_key(kube, agent_ns, "bot-key") is None
    assert not rds.exists(keys.config)
    assert rds.zscore(keys.inflight, "req-in-flight") and rds.hget(keys.reserved, "_total") == str(10**18).encode()
    lifetime_ms = inflight_ttl_s(60.0, 5.0, 1.0) * 1000  # the gateway's in-flight lifetime (default settings)
    for key in (keys.inflight, keys.reserved, keys.spend):
        assert 0 < rds.pttl(key) <= lifetime_ms


def _warnings(kube: kubernetes.client.ApiClient, ns: str, name: str) -> list[str]:
    events = kubernetes.client.CoreV1Api(kube).list_namespaced_event(ns).items
    return [e.reason for e in events if e.involved_object.name == name and e.type == "Warning"]


def test_an_agent_naming_another_agents_secret_does_not_get_its_key(
    operator: ManagedProcess,
    kube: kubernetes.client.ApiClient,
    agent_ns: str,
    rds: redis.Redis,
    shared_gateway: GatewayProcess,
    model_servers: ModelServers,
) -> None:
    objects = kubernetes.client.CustomObjectsApi(kube)
    core = kubernetes.client.CoreV1Api(kube)
    objects.create_namespaced_custom_object(GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "alpha"))
    key = wait_for(lambda: _secret_key(kube, agent_ns, "alpha-credentials"), 20, "alpha's Secret")
    wait_for(lambda: _condition(_get(kube, agent_ns, "alpha"), "Ready") == "True", 20, "alpha Ready")
    before = core.read_namespaced_secret("alpha-credentials", agent_ns)

    objects.create_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "beta", credentialsSecretName="alpha-credentials")
    )
    beta = wait_for(
        lambda: (a := _get(kube, agent_ns, "beta")) and _condition(a, "CredentialsIssued") == "False" and a,
        20,
        "beta refused alpha's Secret",
    )
    issued = next(c for c in beta["status"]["conditions"] if c["type"] == "CredentialsIssued")
    assert issued["reason"] == "SecretNotOwned" and beta["status"]["phase"] == "Failed"
    assert key not in json.dumps(beta)
    wait_for(lambda: "SecretNotOwned" in _warnings(kube, agent_ns, "beta"), 10, "a Warning Event on beta")
    # alpha's key still maps to alpha; beta has no records; the Secret is untouched.
    assert rds.get(apikey_key(hash_api_key(key))) == f"{agent_ns}/alpha".encode()
    assert not rds.exists(AgentKeys(f"{agent_ns}/beta").config)
    after = core.read_namespaced_secret("alpha-credentials", agent_ns)
    assert after.metadata.resource_version == before.metadata.resource_version and after.data == before.data

    route_model(rds, agent_ns, "iris", model_servers.iris_url)
    url = f"{shared_gateway.url}/v1/models/iris:predict"
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
    # Deleting beta does not delete the Secret it named but never owned.
    objects.delete_namespaced_custom_object(GROUP, VERSION, agent_ns, "agents", "beta")
    wait_for(lambda: _get(kube, agent_ns, "beta") is None, 10, "beta to go (finalizer done)")
    assert _secret_key(kube, agent_ns, "alpha-credentials") == key
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200


def test_a_secret_made_in_advance_and_labelled_for_the_agent_is_adopted(
    operator: ManagedProcess,
    kube: kubernetes.client.ApiClient,
    agent_ns: str,
    rds: redis.Redis,
) -> None:
    objects = kubernetes.client.CustomObjectsApi(kube)
    core = kubernetes.client.CoreV1Api(kube)
    chosen = "olk_" + secrets.token_urlsafe(32)
    for name, data in (("gamma-key", {"apiKey": base64.b64encode(chosen.encode()).decode()}), ("delta-key", None)):
        core.create_namespaced_secret(
            agent_ns, {"metadata": {"name": name, "labels": {AGENT_LABEL: name.split("-")[0]}}, "data": data}
        )
    objects.create_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "gamma", credentialsSecretName="gamma-key")
    )
    objects.create_namespaced_custom_object(
        GROUP, VERSION, agent_ns, "agents", _agent(agent_ns, "delta", credentialsSecretName="delta-key")
    )
    wait_for(lambda: _condition(_get(kube, agent_ns, "gamma"), "Ready") == "True", 20, "gamma Ready")
    assert rds.get(apikey_key(hash_api_key(chosen))) == f"{agent_ns}/gamma".encode()
    assert _secret_key(kube, agent_ns, "gamma-key") == chosen
    # A labelled Secret without a key gets one put in.
    wait_for(lambda: _condition(_get(kube, agent_ns, "delta"), "Ready") == "True", 20, "delta Ready")
    issued = _secret_key(kube, agent_ns, "delta-key")
    assert issued and rds.get(apikey_key(hash_api_key(issued))) == f"{agent_ns}/delta".encode()
