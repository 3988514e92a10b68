"""A seeded fault soak of the money paths: real processes, load, faults, then the books are checked.

``make soak SEED=7 DURATION=600 RATE=20`` (or ``python -m tests.soak.harness``) starts a
private local platform (etcd + kube-apiserver, PostgreSQL, Redis with AOF, anvil) and the
product's processes exactly as ``make up`` builds them, applies a RewardPool, a Model and
several Agents (some with Hard budgets that the load exhausts), and sends chat completions
through the gateway from many threads. Faults are injected at seeded random times:

====================  ==============================================================
``kill_gateway``      kill -9 the gateway (restarted after a short pause, as a kubelet would)
``kill_worker``       kill -9 the ledger worker (restarted)
``kill_operator``     kill -9 the operator with its settler and claims server (restarted)
``restart_redis``     stop and start Redis on the same data (AOF)
``restart_postgres``  stop and start PostgreSQL
``restart_anvil``     stop the chain node, start it again with its state
``reorg``             replace the newest chain blocks (``anvil_reorg``)
``edit_pool``         edit the live RewardPool (minPayout), and try to move it to another
                      distributor (the API must refuse, or settlement must stay single)
====================  ==============================================================

After the load stops and every process is back, it drains (ledger ingested everything,
the pool settled every epoch) and checks what the README promises:

- every request answered 200 has exactly one ledger event (its ``x-openledger-event-id``);
- no Hard budget was exceeded (ledger sum per Agent and period ≤ budget);
- on chain: the distributor's cumulative total equals the ledger's settled payouts, every
  payee claims exactly its ledger payout once, a second claim pays nothing;
- ``openledger ledger verify`` is clean.

The same seed replays the same fault schedule and the same request mix (timing of the
processes themselves is not replayable; the schedule is what a failing seed reproduces).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from openledger.local.platform import ANVIL_DEV_KEY, LocalPlatform
from openledger.local.processes import ManagedProcess, spawn, tail, wait_ready
from openledger.local.product import PRODUCT_PROCESSES, ProductProcess
from openledger.money import to_base_units
from openledger.settlement.chain.distributor import Distributor
from openledger.settlement.chain.rpc import Chain, make_web3
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
FAULTS = (
    "kill_gateway",
    "kill_worker",
    "kill_operator",
    "restart_redis",
    "restart_postgres",
    "restart_anvil",
    "reorg",
    "edit_pool",
)
POOL, MODEL, EPOCH_S = "soak-pool", "soak-llm", 10
OWNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
CONTRIBUTOR = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
# (name, budget in whole tokens or None, enforcement): the tight Hard budgets run out under load.
AGENTS: tuple[tuple[str, str | None, str], ...] = (
    ("agent-a", None, "Hard"),
    ("agent-b", "1000", "Hard"),
    ("agent-c", "0.02", "Hard"),
    ("agent-d", "0.05", "Hard"),
    ("agent-e", "0.03", "Soft"),
    ("agent-f", None, "Hard"),
)
DECIMALS = 18
# A reorg replaces at most REORG_DEPTH_MAX blocks, fewer than the pool's confirmation depth (the
# inclusion block counts as the first): a deeper reorg undoes what the chain called final.
CONFIRMATIONS, REORG_DEPTH_MAX = 3, 2
WORDS = ("alpha", "ledger", "model", "pays", "token")


@dataclass
class Outcome:
    agent: str
    status: int
    event_id: str | None


@dataclass
class SoakReport:
    seed: int
    duration_s: float
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    answered_ok: int = 0
    ledger_events: int = 0
    unmetered_ok: list[str] = field(default_factory=list)  # 200 with no ledger event: a loss
    duplicate_ids: list[str] = field(default_factory=list)  # one event id answered twice
    budget_overruns: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent -> (spent, budget)
    chain_mismatch: list[str] = field(default_factory=list)
    double_claims: list[str] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)  # a check that never completed
    verify_ok: bool = False
    verify_output: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def losses(self) -> int:
        return (
            len(self.unmetered_ok)
            + len(self.duplicate_ids)
            + len(self.budget_overruns)
            + len(self.chain_mismatch)
            + len(self.double_claims)
            + len(self.stalled)
            + (0 if self.verify_ok else 1)
        )

    def summary(self) -> str:
        lines = [
            f"soak seed={self.seed} duration={self.duration_s:.0f}s requests={self.requests} "
            f"answered_200={self.answered_ok} ledger_events={self.ledger_events}",
            "statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            "faults: " + ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())),
            f"losses={self.losses}: unmetered_200={len(self.unmetered_ok)} duplicate_ids={len(self.duplicate_ids)} "
            f"budget_overruns={self.budget_overruns} chain_mismatch={self.chain_mismatch} "
            f"double_claims={self.double_claims} verify_ok={self.verify_ok} stalled={len(self.stalled)}",
        ]
        lines += [f"stalled: {s}" for s in self.stalled]
        lines += [f"note: {n}" for n in self.notes]
        if not self.verify_ok:
            lines.append("ledger verify:\n" + self.verify_output)
        return "\n".join(lines)


def fault_schedule(seed: int, duration_s: float) -> list[tuple[float, str]]:
    """Every fault kind at least once (more on long runs), at seeded times inside the load window."""
    rng = random.Random(seed)
    rounds = max(1, int(duration_s // 240))
    kinds = [k for _ in range(rounds) for k in FAULTS]
    rng.shuffle(kinds)
    start, end = 0.1 * duration_s, 0.85 * duration_s
    times = sorted(rng.uniform(start, end) for _ in kinds)
    return list(zip(times, kinds, strict=True))


# --------------------------------------------------------------------- the run


class Soak:
    """One soak run on its own platform under ``base_dir``."""

    def __init__(self, base_dir: Path, seed: int, duration_s: float, rate: float) -> None:
        self.base_dir = base_dir
        self.seed = seed
        self.duration_s = duration_s
        self.rate = rate
        self.rng = random.Random(seed)
        self.platform = LocalPlatform(base_dir / "platform", detached=False, durable=True)
        self.specs: dict[str, ProductProcess] = {}
        self.processes: dict[str, ManagedProcess] = {}
        self.env: dict[str, str] = {}
        self.report = SoakReport(seed, duration_s)
        self.outcomes: list[Outcome] = []
        self.keys: dict[str, str] = {}
        self.lock = threading.Lock()
        self.ns = f"soak-{secrets.token_hex(3)}"
        self.gateway_url = ""
        self.token = self.distributor = ""
        self.budgets: dict[str, int] = {}
        self.distributor_history: list[str] = []  # every distributor the pool pointed at

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        endpoints = self.platform.start()
        self.env = {
            **os.environ,
            **endpoints.as_env(),
            "OPENLEDGER_NAMESPACES": json.dumps([self.ns]),
            "OPENLEDGER_SETTLE_INTERVAL_S": "1",
            "OPENLEDGER_LOCAL_DIR": str(self.base_dir),
            "OPENLEDGER_OPERATOR_REDIS_CHECK_S": "1",
        }
        for build in PRODUCT_PROCESSES:
            spec = build(endpoints, self.platform.port)
            self.specs[spec.name] = spec
            self._spawn(spec.name)
        for name in self.specs:
            self._wait_ready(name)
        self.gateway_url = next(s.exports["GATEWAY_URL"] for s in self.specs.values() if "GATEWAY_URL" in s.exports)

    def _spawn(self, name: str) -> None:
        spec = self.specs[name]
        log = self.base_dir / "logs" / f"{name}.log"
        self.processes[name] = spawn(name, spec.argv(), log, detached=False, env={**self.env, **spec.env})

    def _wait_ready(self, name: str) -> None:
        spec = self.specs[name]
        if spec.ready_url:
            url = spec.ready_url
            wait_ready(self.processes[name], lambda: _http_ok(url), 120, name)

    def kill9_and_restart(self, name: str) -> None:
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGKILL)
        while process.alive():
            time.sleep(0.02)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self._spawn(name)
        self._wait_ready(name)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop(15)
        self.platform.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{tail(p.log_path, 30)}" for p in self.processes.values())

    # -------------------------------------------------------------- objects

    def kubectl_apply(self, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.platform.kubectl("apply", "-n", self.ns, "-f", "-", stdin=json.dumps(doc), check=False)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        out = self.platform.kubectl("get", kind, name, "-n", self.ns, "-o", "json", check=False)
        return dict(json.loads(out.stdout)) if out.returncode == 0 else {}

    def setup_objects(self) -> None:
        ns_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}}
        self.platform.kubectl("apply", "-f", "-", stdin=json.dumps(ns_doc))
        deployed = json.loads(_cli_ok(self.env, "chain", "deploy"))
        self.token, self.distributor = deployed["token"], deployed["distributor"]
        rpc = self.env["ETH_RPC_URL"]
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "chain"},
                "stringData": {"rpcUrl": rpc, "signerKey": ANVIL_DEV_KEY},
            },
            pool_doc(self.token, self.distributor, min_payout="0"),
            model_doc(),
        ]
        for name, budget, enforcement in AGENTS:
            docs.append(agent_doc(name, budget, enforcement))
            if budget is not None and enforcement == "Hard":
                self.budgets[f"{self.ns}/{name}"] = _base_units(budget)
        for doc in docs:
            out = self.kubectl_apply(doc)
            if out.returncode != 0:
                raise RuntimeError(f"apply {doc['kind']}: {out.stderr}")
        wait_for(lambda: self.get("model", MODEL).get("status", {}).get("phase") == "Ready", 180, "Model Ready", 0.5)
        wait_for(lambda: (self.get("rewardpool", POOL).get("status") or {}).get("models") == 1, 60, "pool bound", 0.5)
        for name, _, _ in AGENTS:
            self.keys[name] = wait_for(functools.partial(self._api_key, name), 60, f"Agent {name} key", 0.5)

    def _api_key(self, name: str) -> str | None:
        agent = self.get("agent", name)
        secret_name = (agent.get("status") or {}).get("secretName")
        if not secret_name:
            return None
        data = self.get("secret", secret_name).get("data") or {}
        return base64.b64decode(data["apiKey"]).decode() if "apiKey" in data else None

    # ----------------------------------------------------------------- load

    def load(self, stop: threading.Event, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        threads = 6
        pause = threads / self.rate
        while not stop.is_set():
            name = rng.choice([a[0] for a in AGENTS])
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": rng.randint(1, 12)}
            outcome = self._request(name, body)
            with self.lock:
                self.outcomes.append(outcome)
            stop.wait(pause * rng.uniform(0.5, 1.5))

    def _request(self, agent: str, body: dict[str, Any]) -> Outcome:
        request = urllib.request.Request(
            f"{self.gateway_url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.keys[agent]}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                resp.read()
                return Outcome(agent, resp.status, resp.headers.get("x-openledger-event-id"))
        except urllib.error.HTTPError as exc:
            exc.read()
            return Outcome(agent, exc.code, exc.headers.get("x-openledger-event-id"))
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return Outcome(agent, 0, None)  # no answer: the client cannot have been served

    # --------------------------------------------------------------- faults

    def inject(self, kind: str) -> None:
        if kind == "kill_gateway":
            self.kill9_and_restart("gateway")
        elif kind == "kill_worker":
            self.kill9_and_restart("ledger-worker")
        elif kind == "kill_operator":
            self.kill9_and_restart("operator")
        elif kind == "restart_redis":
            self.platform.restart_component("redis")
        elif kind == "restart_postgres":
            self.platform.restart_component("postgres")
        elif kind == "restart_anvil":
            chain = Chain(make_web3(self.env["ETH_RPC_URL"]))
            saved = chain.rpc("anvil_dumpState", [])
            self.platform.stop_component("anvil")
            time.sleep(self.rng.uniform(0.5, 3.0))
            self.platform.restart_component("anvil")
            Chain(make_web3(self.env["ETH_RPC_URL"])).rpc("anvil_loadState", [saved])
        elif kind == "reorg":
            chain = Chain(make_web3(self.env["ETH_RPC_URL"]))
            chain.rpc("anvil_reorg", [self.rng.randint(1, REORG_DEPTH_MAX), []])
        elif kind == "edit_pool":
            self._edit_pool()
        self.report.faults[kind] += 1

    def _edit_pool(self) -> None:
        out = self.kubectl_apply(pool_doc(self.token, self.distributor, min_payout="0.000001"))
        if out.returncode != 0:
            raise RuntimeError(f"edit minPayout refused: {out.stderr}")
        other = json.loads(_cli_ok(self.env, "chain", "deploy"))
        moved = self.kubectl_apply(pool_doc(self.token, other["distributor"], min_payout="0.000001"))
        if moved.returncode == 0:
            self.report.notes.append("the API accepted a distributorAddress edit (migration path exercised)")
            self.distributor_history.append(other["distributor"])
        else:
            self.report.notes.append("distributorAddress edit refused by the API server: " + moved.stderr.strip()[:160])

    # ----------------------------------------------------------------- run

    def run(self) -> SoakReport:
        self.start()
        self.setup_objects()
        self.distributor_history.append(self.distributor)
        stop, chain_stop = threading.Event(), threading.Event()
        threading.Thread(target=self.produce_blocks, args=(chain_stop,), daemon=True).start()
        workers = [threading.Thread(target=self.load, args=(stop, i), daemon=True) for i in range(6)]
        started = time.monotonic()
        for w in workers:
            w.start()
        try:
            for at, kind in fault_schedule(self.seed, self.duration_s):
                wait = started + at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                print(f"[soak] t={time.monotonic() - started:6.1f}s fault {kind}", flush=True)
                self.inject(kind)
            rest = started + self.duration_s - time.monotonic()
            if rest > 0:
                time.sleep(rest)
        finally:
            stop.set()
            for w in workers:
                w.join(90)
        try:
            self.check()
        finally:
            chain_stop.set()
        return self.report

    def produce_blocks(self, stop: threading.Event) -> None:
        """A block a second, as a real chain makes them (the local anvil mines only on demand)."""
        while not stop.wait(1.0):
            try:
                Chain(make_web3(self.env["ETH_RPC_URL"])).rpc("evm_mine", [])
            except Exception:  # noqa: BLE001 - the node is down during restart_anvil
                continue

    # ---------------------------------------------------------------- check

    def check(self) -> None:
        report = self.report
        report.requests = len(self.outcomes)
        report.statuses = Counter(o.status for o in self.outcomes)
        ok_ids = [o.event_id for o in self.outcomes if o.status == 200]
        report.answered_ok = len(ok_ids)
        missing_header = sum(1 for i in ok_ids if not i)
        if missing_header:
            report.unmetered_ok += ["<200 without x-openledger-event-id>"] * missing_header
        ids = [i for i in ok_ids if i]
        report.duplicate_ids = [i for i, n in Counter(ids).items() if n > 1]
        db = self.env["DATABASE_URL"]
        if not self._phase(lambda: wait_for(self._drained, 180, "the ledger worker to drain the usage stream", 0.5)):
            return
        with psycopg.connect(db, connect_timeout=5) as conn:
            stored = {str(r[0]) for r in conn.execute("SELECT event_id FROM usage_events").fetchall()}
            report.ledger_events = len(stored)
            report.unmetered_ok += [i for i in ids if i not in stored]
            for agent, budget in self.budgets.items():  # Day budgets: per UTC day of the finish time
                rows = conn.execute(
                    "SELECT finished_at_ms / 86400000 AS day, sum(cost) FROM usage_events WHERE agent = %s"
                    " GROUP BY day",
                    (agent,),
                ).fetchall()
                for _, spent in rows:
                    if int(spent) > budget:
                        report.budget_overruns[agent] = (int(spent), budget)
        self._phase(self._check_chain)
        verify = _cli(self.env, "ledger", "verify")
        report.verify_ok = verify.returncode == 0
        report.verify_output = verify.stdout + verify.stderr

    def _phase(self, step: Callable[[], Any]) -> bool:
        """Run one check; a stall (something never caught up) is a failure of the run, with logs."""
        try:
            step()
        except (AssertionError, RuntimeError) as exc:  # wait_for's timeout, a failed command
            self.report.stalled.append(f"{exc}\n{self.logs()}")
            return False
        return True

    def _drained(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.env["REDIS_URL"], socket_timeout=5)
        try:
            groups = client.xinfo_groups("openledger:usage")
        finally:
            client.close()
        return bool(groups) and all(int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0 for g in groups)

    def _check_chain(self) -> None:
        report = self.report
        last_event_epoch = int(time.time() // EPOCH_S)

        def settled() -> bool:
            status = self.get("rewardpool", POOL).get("status") or {}
            return (
                int(status.get("lastSettledEpoch") or 0) >= last_event_epoch
                and _base_units(status.get("pendingAmount") or "0") == 0
            )

        wait_for(settled, 6 * EPOCH_S + 60, "the pool to settle every epoch", 0.5)
        chain = Chain(make_web3(self.env["ETH_RPC_URL"]))
        status = self.get("rewardpool", POOL).get("status") or {}
        settled_total = _base_units(status.get("settledTotal") or "0")
        on_chain = sum(Distributor(chain, d).state().cumulative_total for d in self.distributor_history)
        if on_chain != settled_total:
            report.chain_mismatch.append(f"cumulative on chain {on_chain} != ledger settledTotal {settled_total}")
        claim_env = {**self.env, "OPENLEDGER_SIGNER_KEY": ANVIL_DEV_KEY}
        for account in (OWNER, CONTRIBUTOR):
            args = ("claim", account, "--pool", f"{self.ns}/{POOL}", "--submit")
            first = json.loads(_cli_ok(claim_env, *args))
            due = int(first["amount"])
            paid = int((first.get("submitted") or {}).get("paid") or 0)
            claimed = Distributor(chain, self.distributor_history[-1]).claimed(account)
            if claimed != due:
                report.chain_mismatch.append(f"{account}: claimed {claimed} on chain, ledger payout {due}")
            again = json.loads(_cli_ok(claim_env, *args))
            if int((again.get("submitted") or {}).get("paid") or 0) != 0:
                report.double_claims.append(account)
            for old in self.distributor_history[:-1]:  # a moved pool must not be payable again elsewhere
                if Distributor(chain, old).claimed(account) and claimed > due:
                    report.double_claims.append(f"{account} on {old}")
            report.notes.append(f"{account}: ledger payout {due}, paid now {paid}")


# ------------------------------------------------------------------ manifests


def pool_doc(token: str, distributor: str, *, min_payout: str) -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "RewardPool",
        "metadata": {"name": POOL},
        "spec": {
            "modelSelector": {"matchLabels": {"team": "soak"}},
            "protocolFeeBps": 500,
            "epochSeconds": EPOCH_S,
            "minPayout": min_payout,
            "chain": {
                "chainId": 31337,
                "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
                "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
                "tokenAddress": token,
                "distributorAddress": distributor,
                "confirmations": CONFIRMATIONS,
            },
        },
    }


def model_doc() -> dict[str, Any]:
    return {
        "apiVersion": "openledger.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": MODEL, "labels": {"team": "soak"}},
        "spec": {
            "format": {"name": "huggingface"},
            "storageUri": "hf://openledger/soak",
            "protocol": "openai",
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
            "pricing": {
                "token": "OPEN",
                "decimals": DECIMALS,
                "perRequest": "0.001",
                "perInputToken": "0.00001",
                "perOutputToken": "0.00002",
            },
            "owner": OWNER,
            "contributors": [{"account": CONTRIBUTOR, "shareBps": 1500, "role": "data"}],
        },
    }


def agent_doc(name: str, budget: str | None, enforcement: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "account": "0x" + name.encode().hex().rjust(40, "0")[-40:],
        "models": [MODEL],
        "limits": {"requestsPerSecond": 100, "burst": 100, "maxConcurrency": 8},
        "queue": {"maxDepth": 50, "maxWaitSeconds": 5},
    }
    if budget is not None:
        spec["budget"] = {"amount": budget, "period": "Day", "enforcement": enforcement}
    return {"apiVersion": "openledger.io/v1alpha1", "kind": "Agent", "metadata": {"name": name}, "spec": spec}


# -------------------------------------------------------------------- helpers


def _base_units(amount: str) -> int:
    return to_base_units(amount, DECIMALS, "amount")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openledger.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _cli_ok(env: dict[str, str], *args: str) -> str:
    out = _cli(env, *args)
    if out.returncode != 0:
        raise RuntimeError(f"openledger {' '.join(args)} exited {out.returncode}: {out.stdout}\n{out.stderr}")
    return out.stdout


@contextmanager
def soak_dir(keep: bool) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="openledger-soak-"))
    base.chmod(0o755)  # PostgreSQL runs as its own user below it
    try:
        yield base
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def run_soak(seed: int, duration_s: float, rate: float, base_dir: Path) -> SoakReport:
    soak = Soak(base_dir, seed, duration_s, rate)
    try:
        return soak.run()
    finally:
        soak.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second over all agents")
    parser.add_argument("--keep", action="store_true", help="keep the platform folder (logs) afterwards")
    args = parser.parse_args(argv)
    print(f"[soak] seed {args.seed} (replay with --seed {args.seed})", flush=True)
    with soak_dir(args.keep) as base:
        report = run_soak(args.seed, args.duration_s, args.rate, base)
        print(report.summary(), flush=True)
        if args.keep:
            print(f"[soak] logs under {base}")
    return 0 if report.losses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
