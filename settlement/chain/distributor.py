"""Calldata and reads of the RewardDistributor contract (no signing here)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from eth_abi.abi import encode
from web3 import Web3

from openledger.settlement.chain.rpc import Chain
from openledger.settlement.contracts import load_artifact

# Generous fixed limits: a publication that also pulls funding costs ~57k (the first ~109k).
PUBLISH_GAS = 200_000
CLAIM_GAS_PER_PROOF_ITEM = 2_000
CLAIM_GAS_BASE = 120_000


@cache
def _selector(signature: str) -> bytes:
    return bytes(Web3.keccak(text=signature)[:4])


def publish_calldata(epoch: int, root: bytes, cumulative_total: int) -> bytes:
    return _selector("publish(uint256,bytes32,uint256)") + encode(
        ["uint256", "bytes32", "uint256"], [epoch, root, cumulative_total]
    )


def claim_calldata(account: str, cumulative_amount: int, proof: list[bytes]) -> bytes:
    return _selector("claim(address,uint256,bytes32[])") + encode(
        ["address", "uint256", "bytes32[]"], [Web3.to_checksum_address(account), cumulative_amount, proof]
    )


def claim_gas(proof_length: int) -> int:
    return CLAIM_GAS_BASE + CLAIM_GAS_PER_PROOF_ITEM * proof_length


@dataclass(frozen=True)
class DistributorState:
    epoch: int
    root: bytes
    cumulative_total: int
    funded: int


class Distributor:
    """Reads of one deployed distributor, through ``Chain`` (errors translated)."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = Web3.to_checksum_address(address)
        self.contract: Any = chain.w3.eth.contract(address=self.address, abi=load_artifact("RewardDistributor").abi)

    def state(self) -> DistributorState:
        epoch, root, total, funded = self.chain.call("distributor.state", self.contract.functions.state().call)
        return DistributorState(int(epoch), bytes(root), int(total), int(funded))

    def claimed(self, account: str) -> int:
        fn = self.contract.functions.claimed(Web3.to_checksum_address(account))
        return int(self.chain.call("distributor.claimed", fn.call))

    def token(self) -> str:
        return str(self.chain.call("distributor.token", self.contract.functions.token().call))

    def has_settler_role(self, account: str) -> bool:
        role = Web3.keccak(text="SETTLER_ROLE")
        fn = self.contract.functions.hasRole(role, Web3.to_checksum_address(account))
        return bool(self.chain.call("distributor.hasRole", fn.call))


def token_balance(chain: Chain, token: str, account: str) -> int:
    contract = chain.w3.eth.contract(address=Web3.to_checksum_address(token), abi=load_artifact("OpenToken").abi)
    return int(chain.call("token.balanceOf", contract.functions.balanceOf(Web3.to_checksum_address(account)).call))


__all__ = [
    "PUBLISH_GAS",
    "Distributor",
    "DistributorState",
    "claim_calldata",
    "claim_gas",
    "publish_calldata",
    "token_balance",
]
