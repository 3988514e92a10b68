"""Fixtures of the settlement tests: a fresh database per test, a fresh signer and contracts.

Every test gets its own PostgreSQL database (migrated to head) and its own funded
signer account on the session's anvil, so nonces, balances and contracts never
cross tests. Tests that change anvil's mining mode or base fee restore it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from eth_account import Account
from web3 import Web3

from openledger.settlement.chain.decisions import FeePolicy
from openledger.settlement.chain.deploy import Deployment, deploy
from openledger.settlement.chain.rpc import Chain, make_web3
from openledger.settlement.chain.txmanager import TxManager
from tests.databases import fresh_database


@pytest.fixture
def settle_db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url, "settle") as url:
        yield url


@pytest.fixture
def chain(eth_rpc_url: str) -> Iterator[Chain]:
    chain = Chain(make_web3(eth_rpc_url))
    yield chain
    # Leave anvil as the session expects it: automine on, nothing pending.
    try:
        chain.rpc("evm_setAutomine", [True])
        chain.rpc("evm_mine", [])
    except Exception:  # noqa: BLE001 - anvil may be restarting in a chain-down test
        pass


@dataclass(frozen=True)
class Signer:
    key: str
    address: str


def new_signer(chain: Chain) -> Signer:
    account = Account.create()
    key = "0x" + bytes(account.key).hex()
    chain.rpc("anvil_setBalance", [account.address, hex(10**22)])
    return Signer(key=key, address=account.address)


@pytest.fixture
def signer(chain: Chain) -> Signer:
    return new_signer(chain)


@pytest.fixture
def deployment(chain: Chain, signer: Signer) -> Deployment:
    """OpenToken + RewardDistributor; the signer is admin and settler, holds the supply, approved."""
    return deploy(chain.w3, signer.key)


@pytest.fixture
def policy() -> FeePolicy:
    return FeePolicy(confirmations=2, stuck_after_s=2.0)


@pytest.fixture
def db_conn(settle_db: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(settle_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def txmanager(
    db_conn: psycopg.Connection[tuple[object, ...]], chain: Chain, signer: Signer, policy: FeePolicy
) -> TxManager:
    return TxManager(db_conn, chain, signer.key, chain.chain_id(), policy)


def mine(chain: Chain, blocks: int = 1) -> None:
    chain.rpc("anvil_mine", [blocks])


def checksum(address: str) -> str:
    return Web3.to_checksum_address(address)
