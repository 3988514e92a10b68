"""The revenue split of one usage event, and the ledger's account names. Pure.

A usage event that cost ``C`` base units posts one balanced set of amounts:

* the payer (the Agent's account) is debited ``C``;
* the RewardPool's fee account is credited ``fee = C * fee_bps // 10000``
  (the protocol account ``protocol:fees`` when no pool settles the model);
* each contributor is credited ``(C - fee) * share_bps // 10000``, rounded down;
* the model owner is credited the rest, so every rounding remainder lands on the
  owner, deterministically, and the amounts sum to exactly zero.

The split is well defined for any ``fee_bps`` ≤ 10000 and contributor shares that
sum to ≤ 10000 (the Model CRD enforces the sum): shares are of what the fee
leaves, so ``fee_bps + sum(shares)`` may exceed 10000 (a 5 % fee and contributors
at 100 % pay the contributors 95 % and the owner 0). Nothing a valid spec can say
makes an event unsplittable, so configuration never dead-letters usage.

Credits are positive, debits negative. An event that cost 0 (a failed request)
posts nothing: it is recorded in ``usage_events`` without a journal entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from openledger.settlement.ledger.errors import InvariantViolation, PoisonEvent, invariant

BPS = 10_000

# Account kinds. An account key is "<kind>:<ref>": an address for agent, owner
# and contributor accounts, a RewardPool "namespace/name" for pool fees.
AGENT = "agent"
OWNER = "owner"
CONTRIBUTOR = "contributor"
POOL_FEE = "pool_fee"
PROTOCOL = "protocol"
EXTERNAL = "external"
ACCOUNT_KINDS = (AGENT, OWNER, CONTRIBUTOR, POOL_FEE, PROTOCOL, EXTERNAL)
PAYEE_KINDS = (OWNER, CONTRIBUTOR)
PROTOCOL_FEES_ACCOUNT = "protocol:fees"


def agent_account(address: str) -> str:
    return f"{AGENT}:{address.lower()}"


def owner_account(address: str) -> str:
    return f"{OWNER}:{address.lower()}"


def contributor_account(address: str) -> str:
    return f"{CONTRIBUTOR}:{address.lower()}"


def fee_account(pool: str) -> str:
    """The pool's fee account, or the protocol's when no pool settles the model."""
    return f"{POOL_FEE}:{pool}" if pool else PROTOCOL_FEES_ACCOUNT


def parse_account(key: str) -> tuple[str, str]:
    """``"owner:0xab…"`` → ``("owner", "0xab…")``; raises ``ValueError`` naming the account."""
    kind, sep, ref = key.partition(":")
    if not sep or kind not in ACCOUNT_KINDS or not ref:
        raise ValueError(f"account {key[:80]!r}: expected '<kind>:<ref>' with kind one of {ACCOUNT_KINDS}")
    return kind, ref


@dataclass(frozen=True)
class Split:
    """How one cost is divided. ``payer + fee + contributors + owner == 0``."""

    cost: int
    fee: int
    contributors: tuple[int, ...]
    owner: int


def split_cost(cost: int, fee_bps: int, share_bps: Sequence[int]) -> Split:
    """Divide ``cost`` base units: fee first, contributors by share of the rest, owner the remainder."""
    if cost < 0:
        raise PoisonEvent(f"cost: {cost} is negative")
    if not 0 <= fee_bps <= BPS:
        raise PoisonEvent(f"fee_bps: {fee_bps} is not within 0..{BPS}")
    if any(s < 0 for s in share_bps) or sum(share_bps) > BPS:
        raise PoisonEvent(f"contributors: shares {list(share_bps)} are negative or sum to more than {BPS} bps")
    fee = cost * fee_bps // BPS
    rest = cost - fee
    contributors = tuple(rest * s // BPS for s in share_bps)
    owner = rest - sum(contributors)
    invariant(owner >= 0, f"owner share {owner} is negative for cost {cost}")
    invariant(fee + sum(contributors) + owner == cost, f"split of {cost} does not add up")
    return Split(cost, fee, contributors, owner)


def event_postings(
    cost: int,
    payer: str,
    owner: str,
    pool: str,
    fee_bps: int,
    contributors: Sequence[tuple[str, int]],
) -> list[tuple[str, int]]:
    """The postings of one event as ``(account, amount)``; empty when ``cost`` is 0.

    Accounts may repeat (an owner who is also a contributor has two accounts,
    a contributor listed twice gets two lines); ``aggregate`` merges them.
    """
    if cost == 0:
        return []
    split = split_cost(cost, fee_bps, [bps for _, bps in contributors])
    postings = [(agent_account(payer), -cost), (fee_account(pool), split.fee)]
    postings += [
        (contributor_account(a), amount) for (a, _), amount in zip(contributors, split.contributors, strict=True)
    ]
    postings.append((owner_account(owner), split.owner))
    return postings


def aggregate(postings: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum amounts per account, dropping accounts that net to zero. Raises if the total is not 0."""
    totals: dict[str, int] = {}
    for account, amount in postings:
        totals[account] = totals.get(account, 0) + amount
    if sum(totals.values()) != 0:
        raise InvariantViolation(f"postings do not balance: they sum to {sum(totals.values())}")
    return {account: amount for account, amount in sorted(totals.items()) if amount != 0}
