"""Deploy the local token and distributor with web3.py (``openledger chain deploy``).

Deployment is idempotent per call only in the sense that it always deploys fresh
contracts; the addresses it prints go into a RewardPool's ``spec.chain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from web3 import Web3

from openledger.settlement.contracts import load_artifact

DEFAULT_SUPPLY_BASE_UNITS = 10**9 * 10**18  # one billion tokens at 18 decimals
MAX_UINT256 = 2**256 - 1
RECEIPT_TIMEOUT_S = 60


class DeployError(RuntimeError):
    """A deployment transaction failed or reverted."""


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    token: str
    distributor: str
    admin: str
    settler: str


def _send(w3: Web3, key: str, tx: dict[str, Any]) -> dict[str, Any]:
    account = Account.from_key(key)
    tx = {**tx, "from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    tx.setdefault("chainId", w3.eth.chain_id)
    if "gas" not in tx:
        tx["gas"] = int(w3.eth.estimate_gas(tx) * 12 // 10)  # type: ignore[arg-type]
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas") or 0)
    tx.setdefault("maxPriorityFeePerGas", 10**9)
    tx.setdefault("maxFeePerGas", 2 * base_fee + 10**9)
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = dict(w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S))
    if receipt["status"] != 1:
        raise DeployError(f"transaction {tx_hash.hex()} reverted")
    return receipt


def deploy_contract(w3: Web3, key: str, name: str, *args: Any) -> str:
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    tx = factory.constructor(*args).build_transaction({"from": Account.from_key(key).address, "gas": 3_000_000})
    tx.pop("nonce", None)
    receipt = _send(w3, key, {k: v for k, v in tx.items() if k in ("data", "gas", "value")})
    return str(Web3.to_checksum_address(receipt["contractAddress"]))


def deploy(
    w3: Web3,
    key: str,
    *,
    token: str | None = None,
    settler: str | None = None,
    supply_base_units: int = DEFAULT_SUPPLY_BASE_UNITS,
    approve: bool = True,
) -> Deployment:
    """Deploy OpenToken (unless ``token`` is given) and a RewardDistributor.

    The key's account is admin; ``settler`` (default: the same account) gets the
    settler role. With ``approve`` the key's account approves the distributor for
    an unlimited amount, so publications can pull their funding.
    """
    admin = Account.from_key(key).address
    settler = Web3.to_checksum_address(settler or admin)
    if token is None:
        token = deploy_contract(w3, key, "OpenToken", "OpenLedger Token", "OPEN", supply_base_units, admin)
    token = Web3.to_checksum_address(token)
    distributor = deploy_contract(w3, key, "RewardDistributor", token, admin, settler)
    if approve:
        erc20 = w3.eth.contract(address=token, abi=load_artifact("OpenToken").abi)
        tx = erc20.functions.approve(distributor, MAX_UINT256).build_transaction({"from": admin})
        _send(w3, key, {k: v for k, v in tx.items() if k in ("to", "data", "gas", "value")})
    return Deployment(chain_id=int(w3.eth.chain_id), token=token, distributor=distributor, admin=admin, settler=settler)
