"""``openledger chain …``, ``openledger settler run`` and ``openledger claim``.

Secrets come from the environment, never from arguments (which show in ``ps``):
``OPENLEDGER_SIGNER_KEY`` (the settler's or claimer's key; ``chain deploy`` falls
back to anvil's first development key for the local platform) and the RPC URL
from ``ETH_RPC_URL`` / ``OPENLEDGER_ETH_RPC_URL``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import click

from openledger.output import emit, output_option
from openledger.settings import get_settings

SIGNER_KEY_ENV = "OPENLEDGER_SIGNER_KEY"


def _signer_key(required: bool = True, default: str | None = None) -> str:
    key = os.environ.get(SIGNER_KEY_ENV) or default
    if not key and required:
        raise click.UsageError(f"{SIGNER_KEY_ENV} is not set (the signer's private key, 0x + 64 hex)")
    return key or ""


@click.group("chain")
def chain_group() -> None:
    """On-chain settlement contracts (RewardDistributor, the local ERC-20)."""


@chain_group.command("deploy")
@click.option("--token", default=None, help="Use this ERC-20 instead of deploying OpenToken.")
@click.option("--settler", default=None, help="Address given the settler role (default: the deployer).")
def chain_deploy(token: str | None, settler: str | None) -> None:
    """Deploy OpenToken + RewardDistributor and approve the distributor; prints the addresses as JSON."""
    from openledger.local.platform import ANVIL_DEV_KEY
    from openledger.settlement.chain.deploy import deploy
    from openledger.settlement.chain.rpc import make_web3

    key = _signer_key(default=ANVIL_DEV_KEY)
    deployment = deploy(make_web3(get_settings().eth_rpc_url, timeout_s=30), key, token=token, settler=settler)
    click.echo(json.dumps(deployment.__dict__, indent=2))


@chain_group.command("compile")
def chain_compile() -> None:
    """Recompile the contracts with the pinned npm solc and rewrite the committed artifacts."""
    from openledger.settlement.contracts import write_artifacts

    for path in write_artifacts():
        click.echo(f"wrote {path}")


@click.group("settler")
def settler_group() -> None:
    """The settler: close epochs, publish roots, commit settlements."""


@settler_group.command("run")
@click.option("--pool", required=True, help="RewardPool as namespace/name.")
@click.option("--epoch-seconds", type=int, required=True)
@click.option("--min-payout", default="0", help="Whole tokens, a decimal string.")
@click.option("--decimals", type=int, default=18)
@click.option("--chain-id", type=int, required=True)
@click.option("--distributor", required=True, help="RewardDistributor address.")
@click.option("--confirmations", type=int, default=2)
@click.option("--interval-s", type=float, default=1.0, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, print the status as JSON, exit.")
@click.option("--now-s", type=float, default=None, hidden=True, help="Freeze the clock (tests).")
def settler_run(
    pool: str,
    epoch_seconds: int,
    min_payout: str,
    decimals: int,
    chain_id: int,
    distributor: str,
    confirmations: int,
    interval_s: float,
    once: bool,
    now_s: float | None,
) -> None:
    """Settle one pool outside the operator (the operator runs the same code per RewardPool)."""
    from openledger.money import to_base_units
    from openledger.settlement.ledger.db import libpq_url
    from openledger.settlement.settler import ChainSecrets, PoolConfig, Settler

    settings = get_settings()
    config = PoolConfig(
        pool=pool,
        epoch_seconds=epoch_seconds,
        min_payout=to_base_units(min_payout, decimals, "--min-payout"),
        chain_id=chain_id,
        distributor=distributor,
        confirmations=confirmations,
    )
    secrets = ChainSecrets(rpc_url=settings.eth_rpc_url, signer_key=_signer_key())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Settler(config, secrets, libpq_url(settings.database_url)) as settler:
        if once:
            click.echo(json.dumps(settler.step(now_s).__dict__, default=list))
            return
        while not stop.is_set():
            try:
                settler.step(now_s)
            except Exception:
                import logging

                logging.getLogger(__name__).exception(
                    "settler pass failed", extra={"action": "settle.error", "pool": pool}
                )
            stop.wait(interval_s)


@click.command("claim")
@click.argument("account")
@click.option("--pool", required=True, help="RewardPool as namespace/name.")
@click.option(
    "--server", default=None, help="Fetch the proof from the operator (http://host:port) instead of the database."
)
@click.option(
    "--submit", is_flag=True, help=f"Send the claim (signed with {SIGNER_KEY_ENV}; anyone may claim for anyone)."
)
@click.option(
    "--distributor",
    default=None,
    help="Distributor address (default: the one the pool's roots were published to, from the database or server).",
)
@output_option(default="json")
def claim_command(
    account: str, pool: str, server: str | None, submit: bool, distributor: str | None, output: str
) -> None:
    """Print ACCOUNT's latest claimable cumulative amount and Merkle proof; optionally submit the claim."""
    from openledger.settlement import claims

    settings = get_settings()
    try:
        if server:
            claim = claims.fetch_claim(server, pool, account)
        else:
            claim = claims.load_claim(settings.database_url, pool, account)
    except claims.ClaimNotFound as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    out: dict[str, Any] = claim.as_json()
    if submit:
        target = distributor or claim.distributor
        if not target:
            raise click.UsageError("--distributor is required to submit (the proof source did not name one)")
        out["submitted"] = claims.submit_claim(settings.eth_rpc_url, _signer_key(), target, claim)
    emit(output, out, lambda: _claim_table(out))


def _claim_table(out: dict[str, Any]) -> None:
    for key, value in out.items():
        if key == "proof":
            click.echo(f"proof\t{len(value)} sibling(s)")
            for sibling in value:
                click.echo(f"  {sibling}")
        elif isinstance(value, dict):
            for sub, item in value.items():
                click.echo(f"{key}.{sub}\t{item}")
        else:
            click.echo(f"{key}\t{value}")


__all__ = ["chain_group", "claim_command", "settler_group"]
