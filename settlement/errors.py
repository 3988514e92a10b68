"""Errors of the settlement path. One base; each says whether a retry can help.

::

    SettlementError
    ├── ChainUnavailable    the RPC endpoint is down, slow or erroring (temporary: retry later)
    ├── ContractReverted    a call would revert (no allowance, no funds, no role, paused): the chain
    │                       is fine, the publication is blocked until an operator acts
    ├── ConfigError         a RewardPool or secret is unusable (permanent until the spec changes;
    │                       the message names the field, never a secret's value)
    └── SettlementInvariant a rule of the distribution would break (a bug: stop and alert)
"""

from __future__ import annotations


class SettlementError(Exception):
    """Base of every settlement error."""

    temporary: bool = False


class ChainUnavailable(SettlementError):
    """The chain could not be reached or answered with an error; retry after a delay."""

    temporary = True


class ContractReverted(SettlementError):
    """A contract call reverted; the message carries the revert reason (no secrets)."""

    temporary = True


class ConfigError(SettlementError):
    """Configuration that cannot work; the message names the field."""


class SettlementInvariant(SettlementError):
    """A distribution rule does not hold (for example a cumulative amount that decreases)."""


def invariant(condition: bool, message: str) -> None:
    """Raise ``SettlementInvariant`` unless ``condition`` (survives ``python -O``)."""
    if not condition:
        raise SettlementInvariant(message)


__all__ = ["ChainUnavailable", "ConfigError", "ContractReverted", "SettlementError", "SettlementInvariant", "invariant"]
