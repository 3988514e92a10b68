"""`openledger chain deploy` deploys a token and a distributor on the local chain."""

from __future__ import annotations

import json
import subprocess
import sys

from openledger.settlement.chain.distributor import Distributor, token_balance
from openledger.settlement.chain.rpc import Chain

from .conftest import new_signer


def test_chain_deploy_prints_working_addresses(chain: Chain, eth_rpc_url: str) -> None:
    deployer = new_signer(chain)
    env = {"ETH_RPC_URL": eth_rpc_url, "OPENLEDGER_SIGNER_KEY": deployer.key, "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-m", "openledger.cli", "chain", "deploy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    deployed = json.loads(out.stdout)
    assert deployed["chain_id"] == 31337 and deployed["settler"] == deployer.address
    distributor = Distributor(chain, deployed["distributor"])
    assert distributor.token() == deployed["token"]
    assert distributor.has_settler_role(deployer.address)
    assert token_balance(chain, deployed["token"], deployer.address) == 10**27
    assert deployer.key[2:] not in out.stdout + out.stderr
