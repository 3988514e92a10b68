"""Claims: the latest settled proof of an account, served over HTTP, printed and submitted.

A claim is always against the newest *settled* epoch of the pool (its root is
the one on chain). The proof server is a small aiohttp app::

    GET /v1/pools/{namespace}/{name}/claims/{account}
      200 {"pool", "epoch", "account", "amount", "proof": ["0x…"], "root", "distributor", "claimed"?}
      404 {"error": "..."}   no settled epoch, or the account is not in its tree
      400 {"error": "..."}   the account is not an address

The operator starts it (``OPENLEDGER_CLAIMS_PORT``); ``openledger claim`` reads the
database directly or asks the server (``--server``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web

from openledger.settlement import epochs as ep
from openledger.settlement.ledger.db import libpq_url
from openledger.settlement.merkle import MerkleError, normalise_account

HTTP_TIMEOUT_S = 10.0


class ClaimNotFound(LookupError):
    """No settled epoch for the pool, or the account has nothing in its tree."""


@dataclass(frozen=True)
class Claim:
    pool: str
    epoch: int
    account: str
    amount: int  # cumulative, base units
    proof: tuple[bytes, ...]
    root: str
    distributor: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "epoch": self.epoch,
            "account": self.account,
            "amount": str(self.amount),
            "proof": ["0x" + p.hex() for p in self.proof],
            "root": self.root,
            "distributor": self.distributor,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        return cls(
            pool=data["pool"],
            epoch=int(data["epoch"]),
            account=data["account"],
            amount=int(data["amount"]),
            proof=tuple(bytes.fromhex(p[2:]) for p in data["proof"]),
            root=data["root"],
            distributor=data.get("distributor", ""),
        )


def distributor_of(conn: psycopg.Connection[Any], pool: str, tx_hash: str | None) -> str:
    """The distributor the pool's roots were published to, from the settler's own transactions.

    Prefers the transaction that settled the epoch (``tx_hash``), else the pool's newest
    publication; "" when the pool never sent one (e.g. its root was found already on chain).
    """
    from web3 import Web3

    prefix = f"publish:{pool}:"
    row = conn.execute(
        "SELECT to_address FROM settlement_txs WHERE left(intent, length(%(p)s)) = %(p)s"
        " ORDER BY (tx_hash = %(h)s) IS TRUE DESC, id DESC LIMIT 1",
        {"p": prefix, "h": tx_hash},
    ).fetchone()
    return str(Web3.to_checksum_address(str(row[0]))) if row else ""


def claim_from_conn(conn: psycopg.Connection[Any], pool: str, account: str, distributor: str = "") -> Claim:
    try:
        key = normalise_account(account)
    except MerkleError as exc:
        raise ValueError(str(exc)) from None
    settled = ep.latest_epoch(conn, pool, (ep.SETTLED,))
    if settled is None:
        raise ClaimNotFound(f"pool {pool}: no settled epoch yet")
    found = ep.proof_of(conn, pool, settled.epoch, key)
    if found is None:
        raise ClaimNotFound(f"pool {pool}: account {key} has nothing in epoch {settled.epoch}")
    amount, proof = found
    if not distributor:
        distributor = distributor_of(conn, pool, settled.tx_hash)
    return Claim(pool, settled.epoch, key, amount, tuple(proof), settled.root, distributor)


def load_claim(database_url: str, pool: str, account: str) -> Claim:
    with psycopg.connect(libpq_url(database_url), connect_timeout=5) as conn:
        return claim_from_conn(conn, pool, account)


def fetch_claim(server: str, pool: str, account: str) -> Claim:
    namespace, _, name = pool.partition("/")
    url = f"{server.rstrip('/')}/v1/pools/{urllib.parse.quote(namespace)}/{urllib.parse.quote(name)}/claims/{account}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return Claim.from_json(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ClaimNotFound(json.loads(exc.read()).get("error", "not found")) from None
        raise


def submit_claim(rpc_url: str, key: str, distributor: str, claim: Claim, timeout_s: float = 60.0) -> dict[str, Any]:
    """Send ``claim`` signed by ``key``; returns the tx hash, status and amount paid.

    When the account has already been paid ``claim.amount`` (a replayed claim, or one
    superseded by nothing new), the contract would revert (``NothingToClaim``) and burn
    gas: no transaction is sent and the answer is ``{"nothing_to_claim": true, "paid": "0"}``.
    """
    from eth_account import Account
    from web3 import Web3

    from openledger.settlement.chain.distributor import Distributor, claim_calldata, claim_gas
    from openledger.settlement.chain.rpc import Chain, make_web3

    chain = Chain(make_web3(rpc_url))
    before = Distributor(chain, distributor).claimed(claim.account)
    if before >= claim.amount:
        return {"tx_hash": None, "status": None, "paid": "0", "nothing_to_claim": True, "claimed": str(before)}
    sender = Account.from_key(key).address
    base_fee = chain.next_base_fee()
    tx = {
        "type": 2,
        "chainId": chain.chain_id(),
        "nonce": chain.nonce(sender, "pending"),
        "to": Web3.to_checksum_address(distributor),
        "data": claim_calldata(claim.account, claim.amount, list(claim.proof)),
        "gas": claim_gas(len(claim.proof)),
        "maxFeePerGas": 2 * base_fee + 10**9,
        "maxPriorityFeePerGas": 10**9,
        "value": 0,
    }
    signed = Account.sign_transaction(tx, key)
    tx_hash = chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s)
    return {
        "tx_hash": "0x" + bytes(tx_hash).hex(),
        "status": int(receipt["status"]),
        "paid": str(max(claim.amount - before, 0) if receipt["status"] == 1 else 0),
        "nothing_to_claim": False,
    }


# ------------------------------------------------------------------- server


def make_app(database_url: str, distributors: dict[str, str] | None = None) -> web.Application:
    """The proof server; ``distributors`` maps pool → address (filled by the controller)."""
    url = libpq_url(database_url)
    known = distributors if distributors is not None else {}

    def lookup(pool: str, account: str) -> Claim:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return claim_from_conn(conn, pool, account, known.get(pool, ""))

    async def get_claim(request: web.Request) -> web.Response:
        pool = f"{request.match_info['namespace']}/{request.match_info['name']}"
        try:
            claim = await asyncio.to_thread(lookup, pool, request.match_info["account"])
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except ClaimNotFound as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except psycopg.OperationalError:
            return web.json_response({"error": "ledger database unavailable"}, status=503, headers={"Retry-After": "5"})
        return web.json_response(claim.as_json())

    app = web.Application()
    app.router.add_get("/v1/pools/{namespace}/{name}/claims/{account}", get_claim)
    return app


class ClaimsServer:
    """The proof server on its own thread and event loop (so Kopf's loop is never blocked)."""

    def __init__(self, database_url: str, host: str, port: int, distributors: dict[str, str] | None = None) -> None:
        self.app = make_app(database_url, distributors)
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.app)
        self._thread = threading.Thread(target=self._loop.run_forever, name="openledger-claims", daemon=True)

    def start(self) -> None:
        """Listen; raises ``OSError`` (port taken) after stopping its thread."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            raise

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


__all__ = [
    "Claim",
    "ClaimNotFound",
    "ClaimsServer",
    "claim_from_conn",
    "distributor_of",
    "fetch_claim",
    "load_claim",
    "make_app",
    "submit_claim",
]
