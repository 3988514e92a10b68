"""The walkthrough of ``examples/walkthrough/`` — from a Model to a settled, claimed epoch — end to end.

It applies exactly the walkthrough's manifests (placeholders ``__ETH_RPC_URL__``,
``__TOKEN_ADDRESS__`` and ``__DISTRIBUTOR_ADDRESS__`` substituted, as the README's
``sed`` does) into a namespace of its own, against the real local platform, with the
product's real processes built by ``openledger.local.product.PRODUCT_PROCESSES``
exactly as ``make up`` starts them (operator with the Model/Agent/RewardPool
controllers, the serving stand-in, the gateway, the ledger worker), and runs the
README's CLI commands (``openledger chain deploy``, ``ledger balance``, ``ledger
verify``, ``claim``) as subprocesses.

Isolation on the shared session platform: its own namespace (the operator and the
stand-in watch only it), its own PostgreSQL database, its own usage stream, its own
leader-election Lease, free ports, and freshly deployed contracts (so every on-chain
balance of the new token starts at zero).

Steps asserted: Model Ready, Agent Ready, real inferences answered through the gateway by the
stand-in's real LLM (the official ``openai`` client and a plain HTTP POST, as curl sends it;
exact answers and token counts at temperature 0), exactly one
usage event per request, ledger verify clean, the epoch settled on chain with exactly
one transaction, the claim pays the owner exactly the ledger's payout, a replayed claim
pays zero.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import openai
import psycopg
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam
from web3 import Web3

from openledger.local.platform import ANVIL_DEV_KEY, LocalPlatform
from openledger.local.processes import ManagedProcess, free_port, spawn, tail, wait_ready
from openledger.local.product import PRODUCT_PROCESSES
from openledger.money import to_base_units
from openledger.settlement.chain.rpc import make_web3
from openledger.wire import UsageEvent
from tests.databases import fresh_database

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "examples" / "walkthrough"
MANIFESTS = ("01-chain-secret.yaml", "02-rewardpool.yaml", "03-model.yaml", "04-agent.yaml")

MODEL, AGENT, POOL = "demo-llm", "demo-agent", "demo-pool"
OWNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
CONTRIBUTOR = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
PAYER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
# The walkthrough's prices (03-model.yaml) and pool (02-rewardpool.yaml), in base units / bps.
PER_REQUEST, PER_INPUT, PER_OUTPUT = 10**15, 10**13, 2 * 10**13
FEE_BPS, CONTRIBUTOR_BPS, EPOCH_SECONDS = 500, 1500, 10
EXPECTED_PROCESSES = {"operator", "serving-standin", "gateway", "ledger-worker"}
# The walkthrough's question (README step 5) and the real model's answer at temperature 0.
FRANCE: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]
PARIS = "The capital of France is Paris."
CHAT_USAGE = (42, 7)  # (prompt, completion) tokens: the chat template's prompt, and the answer
BALANCE_OF = Web3.keccak(text="balanceOf(address)")[:4].hex()
ROOT_PUBLISHED = "0x" + Web3.keccak(text="RootPublished(uint256,bytes32,uint256)").hex().removeprefix("0x")

pytestmark = pytest.mark.timeout(420)


# ------------------------------------------------------------------ helpers


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, logs: Callable[[], str] = lambda: "") -> Any:
    """Poll until ``predicate`` returns something truthy; fail naming ``what`` with the last value and logs."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - "not yet"; reported if it never succeeds
            last = f"{type(exc).__name__}: {exc}"
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last value: {last!r}\n{logs()}")


def render(name: str, values: dict[str, str]) -> str:
    """A walkthrough manifest with its documented ``__PLACEHOLDERS__`` substituted (the README's sed)."""
    text = (WALKTHROUGH / name).read_text()
    for key, value in values.items():
        text = text.replace(f"__{key}__", value)
    left = re.findall(r"__[A-Z_]+__", text)
    assert not left, f"{name}: placeholders without a value: {left}"
    return text


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


def cli(env: dict[str, str], *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openledger.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def cli_ok(env: dict[str, str], *args: str) -> str:
    out = cli(env, *args)
    assert out.returncode == 0, f"`openledger {' '.join(args)}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def kubectl_json(platform: LocalPlatform, *args: str) -> dict[str, Any]:
    out = platform.kubectl(*args, "-o", "json", check=False)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return dict(json.loads(out.stdout))


def condition(obj: dict[str, Any], type_: str) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return str(cond.get("status"))
    return "Unknown"


def ledger_balance(env: dict[str, str], account: str) -> int:
    """``openledger ledger balance ACCOUNT`` (one account key) → base units."""
    return ledger_balances(env, account)[0]


def ledger_balances(env: dict[str, str], *accounts: str) -> list[int]:
    """``openledger ledger balance ACCOUNT…`` (account keys, read in one snapshot) → base units each."""
    out = cli_ok(env, "ledger", "balance", *accounts)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(accounts), f"ledger balance {accounts}: expected one line per account, got:\n{out}"
    amounts = []
    for account, line in zip(accounts, lines, strict=True):
        key, _, amount = line.partition("\t")
        assert key == account.lower(), out
        amounts.append(int(amount.split()[0]))
    return amounts


def token_balance(rpc_url: str, token: str, account: str) -> int:
    w3 = make_web3(rpc_url)
    data = BALANCE_OF.removeprefix("0x")
    call = {"to": Web3.to_checksum_address(token), "data": "0x" + data + account.lower()[2:].rjust(64, "0")}
    return int(w3.eth.call(call).hex() or "0", 16)


def split(cost: int) -> tuple[int, int, int]:
    """(fee, contributor, owner) of one request's cost: fee first, the contributor's share of the rest."""
    fee = cost * FEE_BPS // 10_000
    contributor = (cost - fee) * CONTRIBUTOR_BPS // 10_000
    return fee, contributor, cost - fee - contributor


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def walk_db(database_url: str) -> Iterator[str]:
    # Not migrated: the ledger worker started by the test runs `db upgrade` itself.
    with fresh_database(database_url, "walk", migrate=False) as url:
        yield url


# --------------------------------------------------------------------- test


def test_walkthrough_from_model_to_claimed_epoch(
    local_platform: LocalPlatform,
    platform_env: dict[str, str],
    walk_db: str,
    redis_url: str,
    eth_rpc_url: str,
    tmp_path: Path,
) -> None:
    started = last = time.monotonic()
    laps: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        laps[name], last = now - last, now

    ns = f"ol-walk-{secrets.token_hex(4)}"
    stream = f"openledger:usage:walk:{ns}"
    env = {
        **platform_env,
        "DATABASE_URL": walk_db,
        "OPENLEDGER_NAMESPACES": json.dumps([ns]),
        "OPENLEDGER_LEADER_LEASE_NAME": f"ol-walk-{ns}",
        "OPENLEDGER_CLAIMS_PORT": str(free_port()),
        "OPENLEDGER_SETTLE_INTERVAL_S": "1",
        "OPENLEDGER_USAGE_STREAM": stream,
        "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": f"{stream}:dead",
        "OPENLEDGER_LOCAL_DIR": str(tmp_path),  # the stand-in's model-server logs
        # The test reads every usage event back from the stream; the worker's trim would drop the
        # ones it has already ingested while the (real, CPU) model still answers the next request.
        "OPENLEDGER_LEDGER_TRIM_INTERVAL_S": "0",
    }
    ns_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    out = local_platform.kubectl("apply", "-f", "-", stdin=json.dumps(ns_doc), check=False)
    assert out.returncode == 0, out.stderr

    # The product's processes, built exactly as `make up` builds them.
    specs = [build(local_platform.endpoints, lambda _name: free_port()) for build in PRODUCT_PROCESSES]
    assert {s.name for s in specs} >= EXPECTED_PROCESSES, f"PRODUCT_PROCESSES: {[s.name for s in specs]}"
    processes: list[ManagedProcess] = []

    def logs() -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}):\n{tail(p.log_path, 25)}" for p in processes)

    try:
        for spec in specs:
            log_path = tmp_path / f"{spec.name}.log"
            processes.append(spawn(spec.name, spec.argv(), log_path, detached=False, env={**env, **spec.env}))
        for spec, process in zip(specs, processes, strict=True):  # checked by a real request, as `make up` does
            if spec.ready_url:
                wait_ready(process, functools.partial(http_ok, spec.ready_url), 120, spec.name)
        gateway_url = next(s.exports["GATEWAY_URL"] for s in specs if "GATEWAY_URL" in s.exports)

        lap("processes ready")
        # Step 0: contracts on the local chain (`openledger chain deploy`, anvil's dev key).
        deployment = json.loads(cli_ok(env, "chain", "deploy"))
        token, distributor = deployment["token"], deployment["distributor"]
        values = {"ETH_RPC_URL": eth_rpc_url, "TOKEN_ADDRESS": token, "DISTRIBUTOR_ADDRESS": distributor}

        lap("chain deploy")
        # Steps 1-4: the manifests, as they are.
        for name in MANIFESTS:
            out = local_platform.kubectl("apply", "-n", ns, "-f", "-", stdin=render(name, values), check=False)
            assert out.returncode == 0, f"kubectl apply {name}: {out.stderr}"

        lap("manifests applied")
        model = wait_for(
            lambda: (
                (m := kubectl_json(local_platform, "get", "model", MODEL, "-n", ns))
                and (m.get("status") or {}).get("phase") == "Ready"
                and condition(m, "Ready") == "True"
                and m
            ),
            150,
            f"Model {MODEL} Ready",
            logs,
        )
        assert model["status"].get("url"), model["status"]
        agent = wait_for(
            lambda: (
                (a := kubectl_json(local_platform, "get", "agent", AGENT, "-n", ns))
                and condition(a, "Ready") == "True"
                and a
            ),
            60,
            f"Agent {AGENT} Ready",
            logs,
        )
        assert agent["status"]["phase"] == "Ready", agent["status"]
        # As the README says: wait until the pool has bound the Model. The gateway stamps each usage
        # event with the binding it sees at request time, and a Model created after its pool is bound
        # only on the pool's next settle pass; a request before that would belong to no pool.
        pool = wait_for(
            lambda: (
                (p := kubectl_json(local_platform, "get", "rewardpool", POOL, "-n", ns))
                and (p.get("status") or {}).get("models") == 1
                and p
            ),
            60,
            f"RewardPool {POOL} to select {MODEL}",
            logs,
        )
        assert condition(pool, "ChainReachable") == "True", pool["status"]
        listing = local_platform.kubectl("get", "openledger", "-n", ns, check=False)
        assert listing.returncode == 0, listing.stderr
        for name in (MODEL, AGENT, POOL):
            assert name in listing.stdout, f"`kubectl get openledger` does not list {name}:\n{listing.stdout}"

        lap("Model, Agent, RewardPool ready")
        # The Agent's API key, from its Secret (delivered once, key `apiKey`).
        secret_name = agent["status"].get("secretName") or f"{AGENT}-credentials"
        secret = kubectl_json(local_platform, "get", "secret", secret_name, "-n", ns)
        api_key = base64.b64decode(secret["data"]["apiKey"]).decode()

        # Send the requests once the settler has closed the previous epoch and early in the current
        # one, so that one close (the next) covers all of them: epoch N closes on the settler's first
        # pass after N ends. Nothing earned yet, so that close settles without a transaction.
        def epoch_open() -> bool:
            now = time.time()
            status = kubectl_json(local_platform, "get", "rewardpool", POOL, "-n", ns).get("status") or {}
            fresh = int(status.get("lastSettledEpoch") or 0) == int(now // EPOCH_SECONDS) - 1
            return fresh and now % EPOCH_SECONDS <= 6.0 and not status.get("lastTxHash")

        wait_for(epoch_open, 2 * EPOCH_SECONDS + 10, "the settler to close the previous (empty) epoch", logs)
        requests_epoch = int(time.time() // EPOCH_SECONDS)

        lap("epoch start")
        # Step 5: real inferences through the gateway — the official openai client, and a plain POST (curl).
        # The model is real (SmolLM2-135M-Instruct on llama.cpp): at temperature 0 its answers and the
        # tokenizer's counts are exact (the prompt counted as the chat template renders it).
        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=30)
        chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=20, temperature=0)
        assert chat.choices[0].message.content == PARIS, chat
        completion = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert completion.choices[0].text == " Paris.\n\nThe United States has", completion
        assert completion.choices[0].finish_reason == "length", completion
        body = json.dumps({"model": MODEL, "messages": FRANCE, "max_tokens": 20, "temperature": 0})
        request = urllib.request.Request(
            f"{gateway_url}/v1/chat/completions",
            data=body.encode(),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            curl = json.loads(resp.read())
        assert curl["choices"][0]["message"]["content"] == PARIS, curl
        assert chat.usage is not None and completion.usage is not None, (chat, completion)
        usages = [
            (chat.usage.prompt_tokens, chat.usage.completion_tokens),
            (completion.usage.prompt_tokens, completion.usage.completion_tokens),
            (int(curl["usage"]["prompt_tokens"]), int(curl["usage"]["completion_tokens"])),
        ]
        assert usages == [CHAT_USAGE, (5, 8), CHAT_USAGE], usages
        costs = [PER_REQUEST + i * PER_INPUT + o * PER_OUTPUT for i, o in usages]

        # Exactly one usage event per request, with the pool's binding snapshotted in it.
        rds = redis.Redis.from_url(redis_url, decode_responses=True)
        entries = cast(list[tuple[str, dict[str, str]]], rds.xrange(stream, "-", "+"))
        events = [UsageEvent.from_fields(fields) for _, fields in entries]
        rds.close()
        assert len(events) == 3, f"expected 3 usage events on {stream}, got {len(events)}: {events}"
        assert len({e.event_id for e in events}) == 3, events
        assert {(e.agent, e.model, e.pool, e.fee_bps, e.outcome) for e in events} == {
            (f"{ns}/{AGENT}", f"{ns}/{MODEL}", f"{ns}/{POOL}", FEE_BPS, "ok")
        }, events
        assert [(e.input_tokens, e.output_tokens) for e in events] == usages, events
        assert [e.cost for e in events] == costs, events

        lap("3 inferences")

        # Step 6: the ledger — one usage event row per request, balances, verify.
        def ingested() -> int:
            with psycopg.connect(walk_db, connect_timeout=5) as conn:
                row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
            return int(row[0]) if row and int(row[0]) >= 3 else 0

        assert wait_for(ingested, 30, "the ledger worker to ingest the 3 usage events", logs) == 3
        assert int(time.time() // EPOCH_SECONDS) == requests_epoch, (
            "the requests and their ingestion spanned an epoch boundary; the machine is too slow for "
            f"epochSeconds {EPOCH_SECONDS} (took until {time.time() % EPOCH_SECONDS:.1f} s into the next epoch)"
        )
        owner_due = sum(split(c)[2] for c in costs)
        contributor_due = sum(split(c)[1] for c in costs)
        # One snapshot: the settler's closing entry for this epoch (a transfer) may land right after it.
        accounts = (f"agent:{PAYER}", f"owner:{OWNER}", f"contributor:{CONTRIBUTOR}", f"pool_fee:{ns}/{POOL}")
        fee_due = sum(split(c)[0] for c in costs)
        assert ledger_balances(env, *accounts) == [-sum(costs), owner_due, contributor_due, fee_due]
        verify = cli(env, "ledger", "verify")
        assert verify.returncode == 0 and "OK: no drift" in verify.stdout, f"{verify.stdout}\n{verify.stderr}"

        lap("ledger ingested + verified")
        # Step 7: the epoch settles on chain (RewardPool status lastSettledEpoch / lastTxHash).
        settled = wait_for(
            lambda: (
                (p := kubectl_json(local_platform, "get", "rewardpool", POOL, "-n", ns)["status"])
                and int(p.get("lastSettledEpoch") or 0) >= requests_epoch
                and p.get("lastTxHash")
                and p
            ),
            EPOCH_SECONDS + 30,
            f"RewardPool {POOL} to settle epoch {requests_epoch}",
            logs,
        )
        # Money in status is a decimal string of whole tokens, like everywhere in the API.
        assert to_base_units(settled["settledTotal"], 18, "settledTotal") == owner_due + contributor_due, settled
        assert to_base_units(settled.get("pendingAmount") or "0", 18, "pendingAmount") == 0, settled
        w3 = make_web3(eth_rpc_url)
        published = w3.eth.get_logs(
            {"address": Web3.to_checksum_address(distributor), "fromBlock": 0, "topics": [ROOT_PUBLISHED]}
        )
        assert len(published) == 1, f"expected one root publication on chain, got {len(published)}: {published}"
        assert "0x" + published[0]["transactionHash"].hex().removeprefix("0x") == settled["lastTxHash"], settled
        assert int.from_bytes(published[0]["topics"][1], "big") == requests_epoch, published[0]
        with psycopg.connect(walk_db, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT epoch, tx_hash FROM epochs WHERE pool = %s AND tx_hash IS NOT NULL", (f"{ns}/{POOL}",)
            ).fetchall()
        assert [(int(e), str(h)) for e, h in rows] == [(requests_epoch, settled["lastTxHash"])], rows
        reasons = kubectl_json(
            local_platform, "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={POOL}"
        )
        seen = {item.get("reason") for item in reasons.get("items") or []}
        assert {"EpochClosed", "RootPublished", "EpochSettled"} <= seen, seen
        # The payees' ledger balances moved to the distributor's account (earned → in a confirmed root).
        assert ledger_balance(env, f"owner:{OWNER}") == 0
        verify = cli(env, "ledger", "verify")
        assert verify.returncode == 0 and "OK: no drift" in verify.stdout, f"{verify.stdout}\n{verify.stderr}"

        lap("epoch settled")
        # Step 8: claim — anyone may submit; the owner gets exactly the ledger's payout, once.
        claim_env = {**env, "OPENLEDGER_SIGNER_KEY": ANVIL_DEV_KEY}
        assert token_balance(eth_rpc_url, token, OWNER) == 0
        args = ("claim", OWNER, "--pool", f"{ns}/{POOL}", "--distributor", distributor, "--submit")
        first = json.loads(cli_ok(claim_env, *args))
        lap("claim")
        assert int(first["amount"]) == owner_due, first
        assert first["submitted"]["status"] == 1 and int(first["submitted"]["paid"]) == owner_due, first
        assert token_balance(eth_rpc_url, token, OWNER) == owner_due
        replay = json.loads(cli_ok(claim_env, *args))
        lap("replay")
        # The contract answers a replay with NothingToClaim (a reverted transaction): zero paid.
        assert int(replay["amount"]) == owner_due and int(replay["submitted"]["paid"]) == 0, replay
        assert token_balance(eth_rpc_url, token, OWNER) == owner_due
        contributor = json.loads(cli_ok(claim_env, "claim", CONTRIBUTOR, *args[2:]))
        assert int(contributor["submitted"]["paid"]) == contributor_due, contributor
        assert token_balance(eth_rpc_url, token, CONTRIBUTOR) == contributor_due
        lap("claims")
        for process in processes:  # the signer key lives in a Secret: never in a log
            assert ANVIL_DEV_KEY[2:] not in process.log_path.read_text(errors="replace"), process.log_path
        laps["total"] = time.monotonic() - started
        print("walkthrough timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in laps.items()))
    finally:
        # Delete the objects while the operator still runs (it removes children and Redis keys).
        for kind in ("agent", "model", "rewardpool"):
            local_platform.kubectl("delete", kind, "--all", "-n", ns, "--wait=false", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = local_platform.kubectl("get", "openledger", "-n", ns, "-o", "name", check=False)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
        for process in reversed(processes):
            process.stop(15)
        local_platform.kubectl("delete", "namespace", ns, "--wait=false", check=False)
