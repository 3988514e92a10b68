"""Claim proofs over HTTP and through `openledger claim`, against a settled epoch."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

from openledger.local.processes import free_port
from openledger.settlement.chain.deploy import Deployment
from openledger.settlement.chain.distributor import Distributor, token_balance
from openledger.settlement.chain.rpc import Chain
from openledger.settlement.claims import ClaimsServer
from openledger.settlement.merkle import verify

from .conftest import Signer, new_signer
from .test_settler_anvil import EPOCH_S, OWNER, POOL, settle, settler_for
from .usage import ingest, usage_event

OTHER = "0x" + "f3" * 20


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_proof_verifies_and_the_cli_submits_the_claim_once(
    settle_db: str, deployment: Deployment, chain: Chain, signer: Signer, eth_rpc_url: str
) -> None:
    ingest(settle_db, [usage_event(POOL, OWNER), usage_event(POOL, OTHER)])
    with settler_for(deployment, signer, settle_db, eth_rpc_url) as settler:
        settle(settler, chain, now_s=2 * EPOCH_S + 1)
    port = free_port()
    server = ClaimsServer(settle_db, "127.0.0.1", port, {POOL: deployment.distributor})
    server.start()
    try:
        base = f"http://127.0.0.1:{port}"
        ns, name = POOL.split("/")
        status, body = get(f"{base}/v1/pools/{ns}/{name}/claims/{OWNER}")
        assert status == 200 and body["epoch"] == 1 and body["distributor"] == deployment.distributor
        proof = [bytes.fromhex(p[2:]) for p in body["proof"]]  # type: ignore[union-attr]
        assert verify(bytes.fromhex(str(body["root"])[2:]), OWNER, int(str(body["amount"])), proof)
        assert get(f"{base}/v1/pools/{ns}/{name}/claims/0x{'00' * 20}")[0] == 404
        assert get(f"{base}/v1/pools/{ns}/{name}/claims/not-an-address")[0] == 400
        assert get(f"{base}/v1/pools/{ns}/nope/claims/{OWNER}")[0] == 404

        claimer = new_signer(chain)
        env = {"DATABASE_URL": settle_db, "ETH_RPC_URL": eth_rpc_url, "OPENLEDGER_SIGNER_KEY": claimer.key, "PATH": ""}
        argv = [sys.executable, "-m", "openledger.cli", "claim", OWNER, "--pool", POOL, "--server", base, "--submit"]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
        result = json.loads(out.stdout)
        assert result["submitted"]["status"] == 1 and result["submitted"]["paid"] == body["amount"]
        assert token_balance(chain, deployment.token, OWNER) == int(str(body["amount"]))
        # Printing only (from the database) works without a key; a second submit pays nothing.
        printed = subprocess.run(argv[:-3], env=env, capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(printed.stdout)["amount"] == body["amount"]
        assert result["submitted"]["nothing_to_claim"] is False
        # A replayed claim sends no transaction (it would revert NothingToClaim and burn gas).
        nonce = chain.w3.eth.get_transaction_count(claimer.address)  # type: ignore[arg-type]
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
        replay = json.loads(again.stdout)["submitted"]
        assert replay["nothing_to_claim"] is True and replay["paid"] == "0" and replay["tx_hash"] is None
        assert chain.w3.eth.get_transaction_count(claimer.address) == nonce  # type: ignore[arg-type]
        assert Distributor(chain, deployment.distributor).claimed(OWNER) == int(str(body["amount"]))

        # Without --server the distributor comes from the database (the settler's publication).
        from_db = [sys.executable, "-m", "openledger.cli", "claim", OTHER, "--pool", POOL, "--submit"]
        out = subprocess.run(from_db, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        other = json.loads(out.stdout)
        assert other["distributor"].lower() == deployment.distributor.lower()
        assert other["submitted"]["status"] == 1 and int(other["submitted"]["paid"]) == int(other["amount"]) > 0
        assert token_balance(chain, deployment.token, OTHER) == int(other["amount"])
    finally:
        server.stop()


def test_claim_cli_for_an_unknown_account_exits_non_zero(settle_db: str) -> None:
    env = {"DATABASE_URL": settle_db, "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-m", "openledger.cli", "claim", OWNER, "--pool", POOL],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no settled epoch" in out.stderr
