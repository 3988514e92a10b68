"""Every panel of every Grafana dashboard returns data from a real Prometheus scraping the product.

The product's processes run as ``make up`` starts them (operator with the settler, the serving
stand-in, the gateway, the ledger worker; ``PRODUCT_PROCESSES``) on the local platform, and a
Prometheus built from its Go module (``openledger.local.prometheus``) scrapes each one's metrics
port every second, adding ``namespace`` as Kubernetes service discovery would. A small load then
makes every signal the dashboards show happen for real:

- chat completions through the gateway with the ``openai`` client, one of them streamed;
- refusals: a rate-limited Agent, an Agent whose Hard budget is below one request,
  requests queued behind an Agent's concurrency of 1;
- a V1 Model (the stand-in's iris model) answers once, then fails every prediction (2 features,
  not 4) until its circuit opens;
- an epoch settled on anvil (transactions, gas, pending → settled); the iris Model's earnings are
  in a second RewardPool whose chain RPC is a closed port (chain errors);
- a malformed usage-stream entry (dead-lettered), a hand edit of an InferenceService (drift
  repaired), an InferenceService deleted in a namespace being deleted (the operator's re-create
  is refused: a reconcile error).

Then, for every target of every panel, the template variables are substituted as Grafana does
(``$datasource`` is the data source, ``$namespace``/``$model``/… their All value ``.*``,
``$__rate_interval`` a window covering the load) and the expression is evaluated through
``/api/v1/query``: it must parse, return at least one series, and at least one finite value.
Every metric a query names must have series of its own, and every variable's ``label_values``
query must list values. The failure message lists every expression that had no data.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from openledger.local import prometheus
from openledger.local.platform import ANVIL_DEV_KEY, LocalPlatform
from openledger.local.processes import ManagedProcess, free_port, spawn, tail, wait_ready
from openledger.local.product import PRODUCT_PROCESSES
from tests.databases import fresh_database
from tests.e2e.test_walkthrough import cli_ok, condition, http_ok, kubectl_json, render, wait_for
from tests.unit.test_dashboards_json import DASHBOARDS, load, metric_names, panels, variable_query

MODEL, BROKEN, POOL, OFFLINE_POOL = "demo-llm", "iris", "demo-pool", "offline-pool"
PAYER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
EPOCH_SECONDS = 10
HI: list[Any] = [{"role": "user", "content": "Say hi."}]

pytestmark = pytest.mark.timeout(480)


# ---------------------------------------------------------------- manifests


def agent(name: str, models: list[str], *, rps: int = 10, burst: int = 20, concurrency: int = 4,
          budget: str = "10") -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "account": PAYER,
            "models": models,
            "limits": {
                "requestsPerSecond": rps,
                "burst": burst,
                "tokensPerMinute": 100000,
                "maxConcurrency": concurrency,
            },
            "budget": {"amount": budget, "period": "Day", "enforcement": "Hard"},
            "queue": {"maxDepth": 10, "maxWaitSeconds": 60},
        },
    }


def iris_model(name: str) -> dict[str, Any]:
    """A V1 Model (the stand-in serves scikit-learn's iris), in the offline pool."""
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "labels": {"team": "offline"}},
        "spec": {
            "format": {"name": "sklearn"},
            "storageUri": "gs://example/iris",
            "protocol": "v1",
            "deploymentMode": "Standard",
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
            "pricing": {"token": "OPEN", "decimals": 18, "perRequest": "0.0001"},
            "owner": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        },
    }


def offline_pool(token: str) -> list[dict[str, Any]]:
    """A RewardPool whose chain RPC is a closed port (a distributor of its own), for the iris Model."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "offline-chain"},
        "stringData": {"rpcUrl": f"http://127.0.0.1:{free_port()}", "signerKey": ANVIL_DEV_KEY},
    }
    pool = {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "RewardPool",
        "metadata": {"name": OFFLINE_POOL},
        "spec": {
            "modelSelector": {"matchLabels": {"team": "offline"}},
            "protocolFeeBps": 0,
            "epochSeconds": EPOCH_SECONDS,
            "minPayout": "0",
            "chain": {
                "chainId": 31337,
                "rpcUrlSecretRef": {"name": "offline-chain", "key": "rpcUrl"},
                "signerKeySecretRef": {"name": "offline-chain", "key": "signerKey"},
                "tokenAddress": token,
                "distributorAddress": "0x" + secrets.token_hex(20),
                "confirmations": 1,
            },
        },
    }
    return [secret, pool]


# ------------------------------------------------------------------ queries


def substitute(expr: str, window_s: int) -> str:
    """Grafana's substitution: All (``.*``) for every dashboard variable, a window for the interval ones."""
    window = f"{window_s}s"
    for builtin in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace("${" + builtin + "}", window).replace("$" + builtin, window)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def predict_status(gateway_url: str, api_key: str, features: list[float]) -> int:
    """POST a V1 prediction to the iris Model (it needs 4 features, fails on fewer): the HTTP status."""
    request = urllib.request.Request(
        f"{gateway_url}/v1/models/{BROKEN}:predict",
        data=json.dumps({"instances": [features]}).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in series)


def scrape_report(url: str, window_s: int) -> str:
    """Per job: successful/attempted scrapes in the window, and the slowest scrape."""
    ok = {s["metric"]["job"]: s["value"][1] for s in prometheus.query(url, f"sum_over_time(up[{window_s}s])")}
    tried = {s["metric"]["job"]: s["value"][1] for s in prometheus.query(url, f"count_over_time(up[{window_s}s])")}
    slowest = prometheus.query(url, f"max_over_time(scrape_duration_seconds[{window_s}s])")
    slow = {s["metric"]["job"]: float(s["value"][1]) for s in slowest}
    return ", ".join(f"{job} {ok.get(job)}/{n} (slowest {slow.get(job, 0):.2f} s)" for job, n in sorted(tried.items()))


def no_data(url: str, window_s: int) -> tuple[list[str], int]:
    """Every dashboard query that fails, returns nothing, or only NaN; and how many were run."""
    problems: list[str] = []
    ran = 0
    for path in DASHBOARDS:
        board = load(path)
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = variable_query(var["query"]["query"])
            ran += 1
            if not prometheus.label_values(url, label, substitute(selector, window_s)):
                problems.append(f"{path.stem} variable ${var['name']}: {var['query']['query']} lists no value")
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], window_s)
                where = f"{path.stem} / {panel['title']} / {target['refId']}"
                ran += 1
                try:
                    series = prometheus.query(url, expr)
                except prometheus.PrometheusError as exc:
                    problems.append(f"{where}: refused: {exc}\n    {expr}")
                    continue
                if not series:
                    problems.append(f"{where}: no series\n    {expr}")
                elif not finite(series):
                    problems.append(f"{where}: only NaN/Inf\n    {expr}")
                for name in sorted(metric_names(target["expr"])):
                    if not prometheus.query(url, f'count({{__name__="{name}"}})'):
                        problems.append(f"{where}: metric {name} has no series")
    return problems, ran


# ---------------------------------------------------------------- the run


class Run:
    """The product's processes in namespace ``ns`` (and ``doomed_ns``), and the steps of the load."""

    def __init__(self, platform: LocalPlatform, env: dict[str, str], tmp_path: Path) -> None:
        self.platform = platform
        self.ns = f"ol-dash-{secrets.token_hex(4)}"
        self.doomed_ns = f"{self.ns}-gone"
        self.stream = f"openledger:usage:dash:{self.ns}"
        self.tmp_path = tmp_path
        self.env = {
            **env,
            "OPENLEDGER_NAMESPACES": json.dumps([self.ns, self.doomed_ns]),
            "OPENLEDGER_LEADER_LEASE_NAME": f"ol-dash-{self.ns}",
            "OPENLEDGER_CLAIMS_PORT": str(free_port()),
            "OPENLEDGER_SETTLE_INTERVAL_S": "1",
            "OPENLEDGER_USAGE_STREAM": self.stream,
            "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": f"{self.stream}:dead",
            "OPENLEDGER_LOCAL_DIR": str(tmp_path),
            # A malformed entry is dead-lettered at its first failed delivery; verify runs during the test.
            "OPENLEDGER_LEDGER_MAX_DELIVERIES": "1",
            "OPENLEDGER_LEDGER_VERIFY_INTERVAL_S": "5",
            # The failing Model's circuit opens after 2 failures and stays open for the test.
            "OPENLEDGER_GATEWAY_BREAKER_FAILURES": "2",
            "OPENLEDGER_GATEWAY_BREAKER_COOLDOWN_S": "300",
        }
        self.specs = [build(platform.endpoints, lambda _name: free_port()) for build in PRODUCT_PROCESSES]
        self.processes: list[ManagedProcess] = []
        self.gateway_url = next(s.exports["GATEWAY_URL"] for s in self.specs if "GATEWAY_URL" in s.exports)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}):\n{tail(p.log_path, 25)}" for p in self.processes)

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait_for(predicate, timeout_s, what, self.logs)

    def apply(self, doc: dict[str, Any] | str, namespace: str = "") -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        out = self.platform.kubectl("apply", "-n", namespace or self.ns, "-f", "-", stdin=text, check=False)
        assert out.returncode == 0, f"kubectl apply: {out.stderr}"

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        return kubectl_json(self.platform, "get", kind, name, "-n", namespace or self.ns)

    def ready(self, kind: str, name: str) -> bool:
        return condition(self.get(kind, name), "Ready") == "True"

    def start(self) -> None:
        for name in (self.ns, self.doomed_ns):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, "default")
        for spec in self.specs:
            # The stand-in serves only the test's namespace: the doomed one needs no model server.
            own = {"OPENLEDGER_NAMESPACES": json.dumps([self.ns])} if spec.name == "serving-standin" else {}
            env = {**self.env, **spec.env, **own}
            log_path = self.tmp_path / f"{spec.name}.log"
            self.processes.append(spawn(spec.name, spec.argv(), log_path, detached=False, env=env))
        for spec, process in zip(self.specs, self.processes, strict=True):
            if spec.ready_url:
                wait_ready(process, functools.partial(http_ok, spec.ready_url), 120, spec.name)

    def provision(self, eth_rpc_url: str) -> None:
        """The walkthrough's chain, pool and LLM Model; a failing V1 Model; Agents with tight limits."""
        deployment = json.loads(cli_ok(self.env, "chain", "deploy"))
        token, distributor = deployment["token"], deployment["distributor"]
        values = {"ETH_RPC_URL": eth_rpc_url, "TOKEN_ADDRESS": token, "DISTRIBUTOR_ADDRESS": distributor}
        for name in ("01-chain-secret.yaml", "02-rewardpool.yaml", "03-model.yaml"):
            self.apply(render(name, values))
        for doc in [
            iris_model(BROKEN),
            agent("demo-agent", [MODEL, BROKEN]),
            agent("rate-agent", [MODEL], rps=1, burst=1),
            agent("queue-agent", [MODEL], concurrency=1),
            agent("broke-agent", [MODEL], budget="0.0001"),  # below one request's 0.001
            *offline_pool(token),
        ]:
            self.apply(doc)
        for name in (MODEL, BROKEN):
            self.wait(functools.partial(self.ready, "model", name), 180, f"Model {name} Ready")
        for pool, model in ((POOL, MODEL), (OFFLINE_POOL, BROKEN)):
            self.wait(functools.partial(self.pool_models, pool, 1), 60, f"RewardPool {pool} to select {model}")

    def pool_models(self, pool: str, count: int) -> bool:
        return (self.get("rewardpool", pool).get("status") or {}).get("models") == count

    def client(self, name: str) -> openai.OpenAI:
        self.wait(functools.partial(self.ready, "agent", name), 60, f"Agent {name} Ready")
        secret = self.get("secret", f"{name}-credentials")
        key = base64.b64decode(secret["data"]["apiKey"]).decode()
        return openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key=key, max_retries=0, timeout=60)

    def load(self) -> None:
        """Answers (one streamed), refusals (rate, budget), a queue, and a Model whose circuit opens."""
        demo = self.client("demo-agent")
        for _ in range(3):
            chat = demo.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0)
            assert chat.choices[0].message.content, chat
        chunks = list(demo.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=True))
        assert any(c.choices and c.choices[0].finish_reason for c in chunks), chunks
        rate, broke, queue = self.client("rate-agent"), self.client("broke-agent"), self.client("queue-agent")
        # Three at once: the rate limiter (1 request/s, burst 1) lets one through.
        codes = at_once(3, lambda: rate.chat.completions.create(model=MODEL, messages=HI, max_tokens=1))
        assert 200 in codes and 429 in codes, codes
        refused = refusal(lambda: broke.chat.completions.create(model=MODEL, messages=HI, max_tokens=1))
        assert refused[0] == 429 and "insufficient_quota" in refused[1], refused  # OpenAI's answer to no budget
        # Three at once behind a concurrency of 1: two wait in the queue.
        queued = at_once(3, lambda: queue.chat.completions.create(model=MODEL, messages=HI, max_tokens=8))
        assert queued == [200, 200, 200], queued
        # The iris Model earns once (for the offline pool, whose chain is down), then fails until its circuit opens.
        assert predict_status(self.gateway_url, demo.api_key, [5.1, 3.5, 1.4, 0.2]) == 200
        statuses = [predict_status(self.gateway_url, demo.api_key, [1.0, 2.0]) for _ in range(4)]
        assert statuses[0] >= 500 and statuses[-1] == 503, statuses

    def break_things(self, redis_url: str) -> None:
        """A dead letter, a drift repaired, a reconcile error."""
        rds = redis.Redis.from_url(redis_url)
        rds.xadd(self.stream, {"not": "a usage event"})
        self.wait(lambda: rds.xlen(f"{self.stream}:dead") == 1, 30, "the malformed entry to be dead-lettered")
        rds.close()
        # A hand edit of the InferenceService's annotation: no new generation, so no model server restart.
        patch = {"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Knative"}}}
        out = self.platform.kubectl(
            "patch", "inferenceservice", MODEL, "-n", self.ns, "--type=merge", "-p", json.dumps(patch), check=False
        )
        assert out.returncode == 0, out.stderr
        # The namespace of a Model is being deleted (no namespace controller runs locally, so it stays
        # Terminating); its InferenceService is deleted by hand; the operator's re-create is refused (403).
        self.apply(iris_model("doomed"), self.doomed_ns)
        self.wait(lambda: self.get("inferenceservice", "doomed", self.doomed_ns), 60, "the doomed InferenceService")
        self.platform.kubectl("delete", "namespace", self.doomed_ns, "--wait=false", check=False)
        out = self.platform.kubectl("delete", "inferenceservice", "doomed", "-n", self.doomed_ns, check=False)
        assert out.returncode == 0, out.stderr

    def stop(self) -> None:
        """Delete the objects while the operator still runs (it removes children, Redis keys, finalizers)."""
        for namespace in (self.ns, self.doomed_ns):
            for kind in ("agent", "model", "rewardpool"):
                self.platform.kubectl("delete", kind, "--all", "-n", namespace, "--wait=false", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(self._has_objects, (self.ns, self.doomed_ns))):
            time.sleep(0.5)
        for process in reversed(self.processes):
            process.stop(15)
        self.platform.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)

    def _has_objects(self, namespace: str) -> bool:
        out = self.platform.kubectl("get", "openledger", "-n", namespace, "-o", "name", check=False)
        return out.returncode == 0 and bool(out.stdout.strip())


def at_once(n: int, call: Callable[[], object]) -> list[int]:
    """``n`` calls in parallel: their statuses."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: status_of(call), range(n)))


def status_of(call: Callable[[], object]) -> int:
    """200, or the HTTP status of the gateway's refusal."""
    return refusal(call)[0]


def refusal(call: Callable[[], object]) -> tuple[int, str]:
    """(200, ""), or the HTTP status and the error the gateway answered."""
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code, str(exc.body)
    return 200, ""


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def dash_db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url, "dash", migrate=False) as url:
        yield url


# --------------------------------------------------------------------- test


def test_every_dashboard_panel_returns_data_from_the_running_product(
    local_platform: LocalPlatform,
    platform_env: dict[str, str],
    dash_db: str,
    redis_url: str,
    eth_rpc_url: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    run = Run(local_platform, {**platform_env, "DATABASE_URL": dash_db}, tmp_path)
    targets = prometheus.product_targets(run.specs, {"namespace": run.ns})
    assert {t.job for t in targets} >= {"operator", "gateway", "ledger-worker"}, targets
    try:
        server = prometheus.start_prometheus(local_platform, targets, interval_s=1.0)
        run.start()
        run.wait(
            lambda: (up := prometheus.targets_up(server.url)) and len(up) == len(targets) and all(up.values()),
            30,
            "Prometheus to scrape every product process",
        )
        run.provision(eth_rpc_url)
        load_started = time.monotonic()
        run.load()
        run.break_things(redis_url)
        run.wait(lambda: (run.get("rewardpool", POOL).get("status") or {}).get("lastTxHash"), 3 * EPOCH_SECONDS + 30,
                 f"RewardPool {POOL} to settle an epoch")  # fmt: skip
        run.wait(lambda: condition(run.get("rewardpool", OFFLINE_POOL), "ChainReachable") == "False",
                 2 * EPOCH_SECONDS + 30, f"RewardPool {OFFLINE_POOL} to find its chain down")  # fmt: skip
        done = time.time()
        scraped = f'timestamp(up{{namespace="{run.ns}"}})'
        run.wait(lambda: all(float(s["value"][1]) > done for s in prometheus.query(server.url, scraped)), 15,
                 "a scrape of every target after the load")  # fmt: skip
        window_s = math.ceil(time.monotonic() - load_started) + 10
        problems, ran = no_data(server.url, window_s)
        scrapes = scrape_report(server.url, window_s)
        print(f"dashboards: {ran} queries over a {window_s} s window, {len(problems)} without data; "
              f"test took {time.monotonic() - started:.0f} s; scrapes: {scrapes}")  # fmt: skip
        assert not problems, (
            f"{len(problems)} of {ran} dashboard queries have no data (scrapes: {scrapes}):\n" + "\n".join(problems)
        )
    finally:
        local_platform.stop_component("prometheus")
        run.stop()
