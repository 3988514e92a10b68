"""What a platform team runs on the installed product, in order, on the real node.

The package's ``product`` fixture (the chart from this checkout's image, as ``make cluster``):

1. the walkthrough (``examples/walkthrough/``, as its README applies it: ``openledger chain
   deploy``, the chain Secret with the RPC URL the operator *pod* reaches — anvil through its
   in-cluster Service —, RewardPool, Model, Agent) through the in-cluster gateway, ledger worker
   and operator (its settler) to a settled epoch on chain, and a claim through the chart's
   claims Service that pays exactly the ledger's payout; a second claim pays nothing;
2. ``helm upgrade`` with a changed value and a new image tag under load: every Deployment
   rolls, every request answers 200 and every 200 has exactly one ledger event;
3. the leading operator pod deleted: the standby holds the Lease within its duration and
   reconciles the next edit; the leading operator's container killed (``kill -9``): a leader
   again within the lease duration and the container's restart, reconciling the next edit;
4. ``kill -9`` of a ledger worker's container process under load: exactly once still holds
   and the container restarts;
5. ``helm uninstall`` leaves exactly what the chart README says it leaves.

Each test runs on what the one before left (one install, module fixtures), as an operator of
the platform would; a failure stops the module (``-x``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from web3 import Web3

from openledger.local import kserve, node
from openledger.local.cluster import PRODUCT_NAMESPACE, RELEASE, in_cluster_url
from openledger.local.platform import ANVIL_DEV_KEY, LocalPlatform
from openledger.local.product_cluster import CHART, DATABASE_SECRET, REDIS_SECRET, helm, wait_release_ready
from openledger.money import to_base_units
from openledger.settlement.chain.rpc import make_web3
from openledger.settlement.epochs import epoch_of
from tests.waiting import wait_for

WALKTHROUGH = Path(__file__).resolve().parents[3] / "examples" / "walkthrough"
MANIFESTS = ("01-chain-secret.yaml", "02-rewardpool.yaml", "03-model-cpu.yaml", "04-agent.yaml")
MODEL, AGENT, POOL = "demo-llm", "demo-agent", "demo-pool"
OWNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
FEE_BPS, CONTRIBUTOR_BPS, EPOCH_SECONDS = 500, 1500, 10  # 02-rewardpool.yaml, 03-model-cpu.yaml
BALANCE_OF = Web3.keccak(text="balanceOf(address)")[:4].hex().removeprefix("0x")
LEASE = f"{RELEASE}-operator"
LOAD_INTERVAL_S = 0.2  # at most 5 requests/s
DEPLOYMENTS = {f"{RELEASE}-{c}" for c in ("operator", "gateway", "ledger-worker", "claims")}

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------ helpers


def _json(platform: LocalPlatform, *args: str) -> dict[str, Any]:
    result = platform.kubectl(*args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _condition(obj: dict[str, Any], kind: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "openledger.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"openledger {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _render(name: str, values: dict[str, str]) -> str:
    """A walkthrough manifest with its ``__PLACEHOLDERS__`` substituted, as the README's sed does."""
    text = (WALKTHROUGH / name).read_text()
    for key, value in values.items():
        text = text.replace(f"__{key}__", value)
    assert not re.findall(r"__[A-Z_]+__", text), text
    return text


def _split(cost: int) -> tuple[int, int, int]:
    """(fee, contributor, owner) of one request's cost, as the ledger splits it (README step 6)."""
    fee = cost * FEE_BPS // 10_000
    contributor = (cost - fee) * CONTRIBUTOR_BPS // 10_000
    return fee, contributor, cost - fee - contributor


def _query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return list(conn.execute(sql, params).fetchall())


def _events_of(database_url: str, ids: list[str]) -> dict[str, int]:
    rows = _query(
        database_url,
        "SELECT event_id::text, count(*) FROM usage_events WHERE event_id = ANY(%s::uuid[]) GROUP BY 1",
        ids,
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _agent_events(database_url: str, agent: str) -> int:
    return int(_query(database_url, "SELECT count(*) FROM usage_events WHERE agent = %s", agent)[0][0])


def _token_balance(rpc_url: str, token: str, account: str) -> int:
    call = {"to": Web3.to_checksum_address(token), "data": "0x" + BALANCE_OF + account.lower()[2:].rjust(64, "0")}
    return int(make_web3(rpc_url).eth.call(call).hex() or "0", 16)  # type: ignore[arg-type]


@dataclass
class Answer:
    status: int  # 0: no HTTP answer at all
    event_id: str
    detail: str


def chat(gateway_url: str, api_key: str, max_tokens: int = 2) -> Answer:
    """One chat completion as curl sends it (README step 5), short answers to keep the CPU model quick."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    request = urllib.request.Request(
        f"{gateway_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Answer(response.status, response.headers.get("x-openledger-event-id", ""), "")
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(
                exc.code, exc.headers.get("x-openledger-event-id", ""), exc.read()[:300].decode(errors="replace")
            )
    except OSError as exc:
        return Answer(0, "", f"{type(exc).__name__}: {exc}")


@dataclass
class Load:
    """One client sending chat completions back to back until stopped."""

    gateway_url: str
    api_key: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: len(self.answers) >= 2, 120, "the load's first answers", 0.2)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(90)

    def _run(self) -> None:
        # Paced under the walkthrough Agent's limit (10 requests/s): a 429 would be the Agent's
        # limit doing its job, not the upgrade failing a request.
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.answers.append(chat(self.gateway_url, self.api_key))
            next_at = max(next_at + LOAD_INTERVAL_S, time.monotonic() - LOAD_INTERVAL_S)
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def ok_ids(self) -> list[str]:
        return [a.event_id for a in self.answers if a.status == 200]

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def summary(self) -> str:
        statuses = Counter(a.status for a in self.answers)
        return f"{len(self.answers)} requests {dict(statuses)}; first failures: {self.failures()[:3]}"


def assert_exactly_once(database_url: str, agent: str, before: int, load: Load) -> None:
    """Every 200 has its one ledger event, and the agent has no event beyond them."""
    ids = load.ok_ids()
    assert ids and all(ids) and len(set(ids)) == len(ids), ids
    wait_for(lambda: len(_events_of(database_url, ids)) == len(ids), 180, f"{len(ids)} events in the ledger", 1)
    assert set(_events_of(database_url, ids).values()) == {1}
    time.sleep(2)  # a duplicate or a stray event would be ingested by now
    assert _agent_events(database_url, agent) - before == len(ids)


def _deployments(platform: LocalPlatform) -> dict[str, dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={RELEASE}"
    items = _json(platform, "-n", PRODUCT_NAMESPACE, "get", "deployments", "-l", selector).get("items", [])
    return {d["metadata"]["name"]: d for d in items}


def _pods(platform: LocalPlatform, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
    items = _json(platform, "-n", PRODUCT_NAMESPACE, "get", "pods", "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]  # not the old, terminating ones


def _container_pid(platform: LocalPlatform, status: dict[str, Any], command: str) -> int:
    """The host pid of a container's process (containerd names its task by the container id)."""
    container_id = status["containerID"].removeprefix("containerd://")
    tasks = node.ctr(platform.base_dir, "tasks", "ls").stdout.splitlines()
    pid = next(int(line.split()[1]) for line in tasks if line.startswith(container_id))
    assert command in Path(f"/proc/{pid}/cmdline").read_text(), pid
    return pid


def _lease_renewed_after(platform: LocalPlatform, wall_s: float) -> str:
    """The Lease's holder once it was renewed after ``wall_s`` (epoch seconds), else ''."""
    spec = _json(platform, "-n", PRODUCT_NAMESPACE, "get", "lease", LEASE).get("spec") or {}
    renewed = spec.get("renewTime")
    if not renewed or not spec.get("holderIdentity"):
        return ""
    at = dt.datetime.fromisoformat(renewed.replace("Z", "+00:00")).timestamp()
    return str(spec["holderIdentity"]) if at > wall_s else ""


def _edit_agent_and_wait_reconciled(platform: LocalPlatform, ns: str, requests_per_second: int) -> None:
    """Edit the walkthrough's Agent and wait until the leading operator has reconciled that generation."""
    platform.kubectl("-n", ns, "patch", "agent", AGENT, "--type", "merge", "-p",
                     json.dumps({"spec": {"limits": {"requestsPerSecond": requests_per_second}}}))  # fmt: skip
    generation = _json(platform, "-n", ns, "get", "agent", AGENT)["metadata"]["generation"]
    wait_for(lambda: (_json(platform, "-n", ns, "get", "agent", AGENT).get("status") or {}).get("observedGeneration")
             == generation, 60, f"the leader to reconcile Agent generation {generation}", 0.5)  # fmt: skip


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(product: LocalPlatform) -> dict[str, str]:
    """The shell of README step 0 after ``make cluster`` (``source .local/env``)."""
    return {**os.environ, **product.endpoints.as_env()}


@pytest.fixture(scope="module")
def walk(product: LocalPlatform, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """README steps 1-4 on the CPU node in a namespace of their own (the models claim as ``openledger local
    models-volume`` offers it); the chain Secret names anvil as pods reach it."""
    ns = f"ol-pool-{secrets.token_hex(3)}"
    node.apply(product.kubectl, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    kserve.add_models_volume(product, ns)
    contracts = json.loads(_cli(env, "chain", "deploy"))
    values = {
        "ETH_RPC_URL": in_cluster_url(product, "anvil"),  # the operator pod's settler sends here
        "TOKEN_ADDRESS": contracts["token"],
        "DISTRIBUTOR_ADDRESS": contracts["distributor"],
    }
    for name in MANIFESTS:
        product.kubectl("apply", "-n", ns, "-f", "-", stdin=_render(name, values))
    wait_for(lambda: _condition(_json(product, "-n", ns, "get", "rewardpool", POOL), "ChainReachable"), 90,
             f"RewardPool {POOL} ChainReachable (the operator pod reaches anvil)", 1)  # fmt: skip
    wait_for(lambda: _condition(_json(product, "-n", ns, "get", "model", MODEL), "Ready"), 240, f"Model {MODEL}", 1)
    agent = wait_for(lambda: (a := _json(product, "-n", ns, "get", "agent", AGENT)) and _condition(a, "Ready") and a,
                     60, f"Agent {AGENT} Ready", 0.5)  # fmt: skip
    wait_for(lambda: (_json(product, "-n", ns, "get", "rewardpool", POOL).get("status") or {}).get("models") == 1,
             60, f"RewardPool {POOL} to bind {MODEL}", 1)  # fmt: skip
    secret = _json(product, "-n", ns, "get", "secret", agent["status"].get("secretName") or f"{AGENT}-credentials")
    yield {
        "ns": ns,
        "agent": f"{ns}/{AGENT}",
        "api_key": base64.b64decode(secret["data"]["apiKey"]).decode(),
        **contracts,
    }


# --------------------------------------------------------------------- tests


def test_walkthrough_settles_on_chain_and_the_claims_service_pays_exactly_the_ledgers_payout(
    product: LocalPlatform, env: dict[str, str], walk: dict[str, str]
) -> None:
    gateway_url, database_url = product.endpoints.extra["GATEWAY_URL"], product.endpoints.database_url
    answers = [chat(gateway_url, walk["api_key"], max_tokens=20) for _ in range(2)]
    assert [a.status for a in answers] == [200, 200], answers
    ids = [a.event_id for a in answers]
    wait_for(lambda: len(_events_of(database_url, ids)) == 2, 60, "the ledger worker pod to ingest both events", 0.5)
    pool_ref = f"{walk['ns']}/{POOL}"
    costs = [int(r[0]) for r in _query(database_url, "SELECT cost FROM usage_events WHERE pool = %s", pool_ref)]
    assert len(costs) == 2 and all(costs), costs
    owner_due = sum(_split(c)[2] for c in costs)
    contributor_due = sum(_split(c)[1] for c in costs)

    # The epoch the operator pod's settler closes next covers both (they are in the ledger now).
    covering = epoch_of(time.time(), EPOCH_SECONDS)
    status = wait_for(
        lambda: (
            (s := _json(product, "-n", walk["ns"], "get", "rewardpool", POOL).get("status") or {})
            and int(s.get("lastSettledEpoch") or 0) >= covering
            and s.get("lastTxHash")
            and s
        ),
        EPOCH_SECONDS + 60,
        f"the operator pod to settle epoch {covering} of {pool_ref} on chain",
        1,
    )
    # Money in status is a decimal string of whole tokens (18 decimals here).
    assert to_base_units(status["settledTotal"], 18, "settledTotal") == owner_due + contributor_due, status

    # README step 8, the proof from the chart's claims Service (its cluster IP, from the host).
    claims_url = product.endpoints.extra["CLAIMS_URL"]
    claim_env = {**env, "OPENLEDGER_SIGNER_KEY": ANVIL_DEV_KEY}
    args = ("claim", OWNER, "--pool", pool_ref, "--server", claims_url, "--distributor", walk["distributor"])
    assert _token_balance(env["ETH_RPC_URL"], walk["token"], OWNER) == 0
    first = json.loads(_cli(claim_env, *args, "--submit"))
    assert int(first["amount"]) == owner_due, first
    assert first["submitted"]["status"] == 1 and int(first["submitted"]["paid"]) == owner_due, first
    assert _token_balance(env["ETH_RPC_URL"], walk["token"], OWNER) == owner_due
    again = json.loads(_cli(claim_env, *args, "--submit"))  # cumulative claims: nothing new to pay
    assert int(again["amount"]) == owner_due and int(again["submitted"]["paid"]) == 0, again
    assert _token_balance(env["ETH_RPC_URL"], walk["token"], OWNER) == owner_due


def test_helm_upgrade_with_a_new_tag_and_value_rolls_everything_without_a_failed_request_or_lost_event(
    product: LocalPlatform, walk: dict[str, str]
) -> None:
    values_path = node.node_dir(product.base_dir) / "values.json"
    image = json.loads(values_path.read_text())["image"]
    new_tag = f"{image['tag']}-next"
    # The same archive under a second tag: a new image reference for every pod template.
    node.ctr(product.base_dir, "images", "tag", "--force", f"{image['repository']}:{image['tag']}",
             f"{image['repository']}:{new_tag}")  # fmt: skip
    before = {n: d["metadata"]["generation"] for n, d in _deployments(product).items()}
    assert set(before) >= DEPLOYMENTS, before
    database_url, gateway_url = product.endpoints.database_url, product.endpoints.extra["GATEWAY_URL"]
    events_before = _agent_events(database_url, walk["agent"])

    with Load(gateway_url, walk["api_key"]) as load:
        started, started_at = time.monotonic(), time.time() - 1
        helm(product, "upgrade", RELEASE, str(CHART), "--namespace", PRODUCT_NAMESPACE, "--values", str(values_path),
             "--set", f"image.tag={new_tag}", "--set", "ledgerWorker.logLevel=WARNING", "--timeout", "8m")  # fmt: skip
        wait_release_ready(product, 480, started_at)
        rolled_s = time.monotonic() - started
        time.sleep(3)  # requests on the new pods only
    print(f"helm upgrade rolled in {rolled_s:.1f} s under load: {load.summary()}")

    after = _deployments(product)
    for name in before:
        template = after[name]["spec"]["template"]["spec"]
        assert after[name]["metadata"]["generation"] > before[name], name
        assert all(c["image"].endswith(f":{new_tag}") for c in template["containers"]), name
    worker_env = {e["name"]: e.get("value") for e in after[f"{RELEASE}-ledger-worker"]["spec"]["template"]["spec"]
                  ["containers"][0]["env"]}  # fmt: skip
    assert worker_env["OPENLEDGER_LOG_LEVEL"] == "WARNING"
    assert not load.failures(), load.summary()
    assert_exactly_once(database_url, walk["agent"], events_before, load)


def test_the_standby_operator_takes_the_lease_within_its_duration_and_reconciles(
    product: LocalPlatform, walk: dict[str, str]
) -> None:
    lease = _json(product, "-n", PRODUCT_NAMESPACE, "get", "lease", LEASE)["spec"]
    duration_s, leader = int(lease["leaseDurationSeconds"]), lease["holderIdentity"]
    operators = {p["metadata"]["name"] for p in _pods(product, "operator")}
    leader_pod = leader.rsplit("-", 1)[0]  # identity: <pod name>-<pid>
    assert leader_pod in operators and len(operators) == 2, (leader, operators)

    started = time.monotonic()
    product.kubectl("-n", PRODUCT_NAMESPACE, "delete", "pod", leader_pod, "--wait=false")
    holder = wait_for(
        lambda: (
            (h := _json(product, "-n", PRODUCT_NAMESPACE, "get", "lease", LEASE)["spec"].get("holderIdentity"))
            and not h.startswith(leader_pod + "-")
            and h
        ),
        duration_s + 30,
        "another operator to hold the Lease",
        0.2,
    )
    took_s = time.monotonic() - started
    print(f"leader {leader} deleted; {holder} holds the Lease after {took_s:.1f} s (duration {duration_s} s)")
    assert holder.rsplit("-", 1)[0] in operators - {leader_pod}, holder  # the standby, not a new pod
    assert took_s <= duration_s, f"takeover took {took_s:.1f} s, more than the lease duration {duration_s} s"

    _edit_agent_and_wait_reconciled(product, walk["ns"], requests_per_second=11)


def test_kill_9_of_the_leading_operator_leaves_a_leader_within_the_lease_and_it_reconciles(
    product: LocalPlatform, walk: dict[str, str]
) -> None:
    """A crashed leader cannot hand the Lease over: the restarted container (same identity, pod and
    pid 1) or the standby (once the Lease ran out) leads again within the lease duration plus the
    container's restart, and reconciles the next edit."""
    lease = _json(product, "-n", PRODUCT_NAMESPACE, "get", "lease", LEASE)["spec"]
    duration_s, leader_pod = int(lease["leaseDurationSeconds"]), lease["holderIdentity"].rsplit("-", 1)[0]
    pod = _json(product, "-n", PRODUCT_NAMESPACE, "get", "pod", leader_pod)
    status = pod["status"]["containerStatuses"][0]
    killed_at = time.time()
    os.kill(_container_pid(product, status, "operator"), signal.SIGKILL)
    holder = wait_for(lambda: _lease_renewed_after(product, killed_at), duration_s + 60, "a leader again", 0.5)
    took_s = time.time() - killed_at
    print(f"leader {leader_pod} killed; {holder} leads after {took_s:.1f} s (duration {duration_s} s)")
    assert holder.rsplit("-", 1)[0] in {p["metadata"]["name"] for p in _pods(product, "operator")}, holder
    assert took_s <= duration_s + 30, f"no leader for {took_s:.1f} s"  # restart back-off starts at 10 s
    restarted = wait_for(lambda: (s := _json(product, "-n", PRODUCT_NAMESPACE, "get", "pod", leader_pod)["status"]
                                  ["containerStatuses"][0])["restartCount"] > status["restartCount"] and s,
                         60, f"{leader_pod}'s container restarted", 0.5)  # fmt: skip
    assert restarted["lastState"]["terminated"]["exitCode"] == 137, restarted  # SIGKILL

    _edit_agent_and_wait_reconciled(product, walk["ns"], requests_per_second=12)


def test_kill_9_of_a_ledger_worker_container_loses_and_doubles_no_event(
    product: LocalPlatform, env: dict[str, str], walk: dict[str, str]
) -> None:
    database_url, gateway_url = product.endpoints.database_url, product.endpoints.extra["GATEWAY_URL"]
    events_before = _agent_events(database_url, walk["agent"])
    worker = next(p for p in _pods(product, "ledger-worker") if p["status"].get("containerStatuses"))
    name, status = worker["metadata"]["name"], worker["status"]["containerStatuses"][0]
    restarts = status["restartCount"]

    with Load(gateway_url, walk["api_key"]) as load:
        time.sleep(2)
        os.kill(_container_pid(product, status, "ledger-worker"), signal.SIGKILL)
        wait_for(
            lambda: (
                (s := _json(product, "-n", PRODUCT_NAMESPACE, "get", "pod", name)["status"]["containerStatuses"][0])
                and s["restartCount"] == restarts + 1
                and s.get("ready")
                and s
            ),
            120,
            f"{name} restarted and ready",
            0.5,
        )
        time.sleep(2)
    last = _json(product, "-n", PRODUCT_NAMESPACE, "get", "pod", name)["status"]["containerStatuses"][0]["lastState"]
    assert last["terminated"]["exitCode"] == 137, last  # SIGKILL
    assert not load.failures(), load.summary()
    assert_exactly_once(database_url, walk["agent"], events_before, load)
    verify = subprocess.run([sys.executable, "-m", "openledger.cli", "ledger", "verify"], env=env,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert verify.returncode == 0 and "OK: no drift" in verify.stdout, verify.stdout + verify.stderr


def test_the_helm_test_account_may_only_get_the_operators_lease(product: LocalPlatform) -> None:
    account = f"system:serviceaccount:{PRODUCT_NAMESPACE}:{RELEASE}-test"

    def can(*args: str) -> bool:
        result = product.kubectl("auth", "can-i", *args, "-n", PRODUCT_NAMESPACE, "--as", account, check=False)
        return result.stdout.strip() == "yes"

    assert can("get", f"leases.coordination.k8s.io/{LEASE}")
    assert not can("get", "leases.coordination.k8s.io/other")
    assert not can("list", "leases.coordination.k8s.io")
    assert not can("update", f"leases.coordination.k8s.io/{LEASE}")
    assert not can("get", "secrets")


def test_helm_uninstall_leaves_exactly_what_the_chart_readme_says(product: LocalPlatform, walk: dict[str, str]) -> None:
    helm(product, "uninstall", RELEASE, "--namespace", PRODUCT_NAMESPACE, "--wait", "--timeout", "5m")
    wait_for(lambda: not _json(product, "-n", PRODUCT_NAMESPACE, "get", "pods").get("items"), 120,
             "the release's pods to go", 1)  # fmt: skip
    kinds = product.kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").stdout.split()
    kinds = [k for k in kinds if k.split(".")[0] != "events"]
    left = set(product.kubectl("-n", PRODUCT_NAMESPACE, "get", ",".join(kinds), "-o", "name").stdout.split())
    assert left == {
        f"secret/{DATABASE_SECRET}",  # created by the installer (make cluster), never by the chart
        f"secret/{REDIS_SECRET}",
        f"lease.coordination.k8s.io/{LEASE}",  # the operator's leader Lease
        "configmap/kube-root-ca.crt",  # Kubernetes' own, in every namespace
        "serviceaccount/default",
    }, sorted(left)
    selector = f"app.kubernetes.io/instance={RELEASE}"
    cluster_scoped = product.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name")
    assert cluster_scoped.stdout.strip() == ""
    crds = product.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {c for c in crds if c.endswith(".openledger.io")} == {
        f"customresourcedefinition.apiextensions.k8s.io/{k}.openledger.io" for k in ("models", "agents", "rewardpools")
    }
    # The CRDs stay, so the objects and what they own stay: the Agent's credentials Secret too.
    ns = walk["ns"]
    kept = set(product.kubectl("-n", ns, "get", "agents,models,rewardpools,inferenceservices,secrets", "-o",
                               "name").stdout.split())  # fmt: skip
    assert kept == {
        f"agent.openledger.io/{AGENT}",
        f"model.openledger.io/{MODEL}",
        f"rewardpool.openledger.io/{POOL}",
        f"inferenceservice.serving.kserve.io/{MODEL}",
        f"secret/{AGENT}-credentials",
        "secret/chain",
    }
    # The migration-made schema and the ledger stay in the database.
    assert _query(product.endpoints.database_url, "SELECT count(*) FROM alembic_version")[0][0] == 1
    assert _agent_events(product.endpoints.database_url, walk["agent"]) > 0
