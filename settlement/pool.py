"""What the settler knows of a RewardPool, and what it reports back. Pure records.

``PoolConfig`` is built from the spec by the controller (no secrets in it);
``ChainIdentity`` is the contract a pool's settlement state belongs to;
``ChainSecrets`` carries the RPC URL and the signer key read from Secrets and
hides both from ``repr``; ``PoolStatus`` is one settler pass's result, which the
controller turns into ``status`` and Events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from openledger.settlement.errors import ConfigError

ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


@dataclass(frozen=True)
class PoolConfig:
    """What the settler needs of a RewardPool spec (no secrets)."""

    pool: str  # namespace/name
    epoch_seconds: int
    min_payout: int  # base units
    chain_id: int
    distributor: str
    confirmations: int = 2
    paused: bool = False
    token: str = ""  # spec.chain.tokenAddress; empty: the distributor's own token (standalone settler)

    def __post_init__(self) -> None:
        if self.epoch_seconds <= 0:
            raise ConfigError(f"spec.epochSeconds: {self.epoch_seconds} must be positive")
        if self.confirmations < 1:
            raise ConfigError(f"spec.chain.confirmations: {self.confirmations} must be at least 1")
        if not ADDRESS_RE.match(self.distributor):
            raise ConfigError(f"spec.chain.distributorAddress: {self.distributor!r} is not an address")
        if self.token and not ADDRESS_RE.match(self.token):
            raise ConfigError(f"spec.chain.tokenAddress: {self.token!r} is not an address")


@dataclass(frozen=True)
class ChainIdentity:
    """The contract a pool's settlement state (epochs, payouts, intents) belongs to. Addresses lower-case."""

    chain_id: int
    distributor: str
    token: str
    epoch_seconds: int

    def differences(self, other: ChainIdentity) -> list[str]:
        """The spec fields in which ``other`` differs, as ``"field: mine -> other"``."""
        fields = (
            ("spec.chain.chainId", self.chain_id, other.chain_id),
            ("spec.chain.distributorAddress", self.distributor.lower(), other.distributor.lower()),
            ("spec.chain.tokenAddress", self.token.lower(), other.token.lower()),
            ("spec.epochSeconds", self.epoch_seconds, other.epoch_seconds),
        )
        return [f"{name}: {mine} -> {theirs}" for name, mine, theirs in fields if mine != theirs]


@dataclass(frozen=True)
class ChainSecrets:
    """Read from Kubernetes Secrets (or the environment); never logged, never in status."""

    rpc_url: str = field(repr=False)
    signer_key: str = field(repr=False)


@dataclass(frozen=True)
class PoolStatus:
    """What the controller writes to ``status`` (amounts as int base units)."""

    current_epoch: int
    last_settled_epoch: int
    last_root: str
    last_tx_hash: str
    pending_amount: int
    settled_total: int
    lag_epochs: int
    chain_reachable: bool
    chain_message: str = ""
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message) for Kubernetes Events
    publishing_epoch: int = 0
    blocked_message: str = ""  # why the next publication is refused or would revert
    blocked_reason: str = ""  # CamelCase condition reason: PublicationBlocked, IdentityChanged, DistributorInUse, …
    database_available: bool = True  # False: the pass could not reach PostgreSQL (nothing else in here is fresh)


def database_unavailable(current_epoch: int, message: str) -> PoolStatus:
    """The result of a pass that could not reach PostgreSQL: no ledger figures, only the outage."""
    return PoolStatus(
        current_epoch=current_epoch,
        last_settled_epoch=0,
        last_root="0x" + "00" * 32,
        last_tx_hash="",
        pending_amount=0,
        settled_total=0,
        lag_epochs=0,
        chain_reachable=True,
        events=(),
        blocked_message=message,
        blocked_reason="DatabaseUnavailable",
        database_available=False,
    )


__all__ = ["ADDRESS_RE", "ChainIdentity", "ChainSecrets", "PoolConfig", "PoolStatus", "database_unavailable"]
