"""The settler's pure ``decide``: one action per observation, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from openledger.settlement.chain.distributor import DistributorState
from openledger.settlement.epochs import EpochRow
from openledger.settlement.pool import ChainIdentity, PoolConfig
from openledger.settlement.settler import (
    ZERO_ROOT,
    Adopt,
    Close,
    Commit,
    Drive,
    Observation,
    Publish,
    ReadContract,
    RecordIdentity,
    Refuse,
    Reopen,
    Wait,
    decide,
)

POOL = "ns/pool"
DIST = "0x" + "d1" * 20
TOKEN = "0x" + "01" * 20
CONFIG = PoolConfig(pool=POOL, epoch_seconds=100, min_payout=0, chain_id=31337, distributor=DIST, token=TOKEN)
IDENTITY = ChainIdentity(31337, DIST, TOKEN, 100)
ROOT_A, ROOT_B = "0x" + "aa" * 32, "0x" + "bb" * 32


def row(epoch: int, status: str, root: str = ROOT_A, total: int = 10) -> EpochRow:
    return EpochRow(POOL, epoch, status, 1, root, total, 1, None)


def contract(epoch: int, root: str, total: int = 10) -> DistributorState:
    return DistributorState(epoch, bytes.fromhex(root[2:]), total, total)


def obs(**over: object) -> Observation:
    base = Observation(current_epoch=5, recorded=IDENTITY, distributor_holder=POOL, has_epochs=True,
                       newest=row(4, "settled"), settled=row(4, "settled"))  # fmt: skip
    return replace(base, **over)  # type: ignore[arg-type]


def test_first_pass_records_the_identity_before_anything_else() -> None:
    assert decide(CONFIG, obs(recorded=None, distributor_holder=None, has_epochs=False, newest=None)) == (
        RecordIdentity()
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"distributor": "0x" + "d2" * 20}, "spec.chain.distributorAddress"),
        ({"token": "0x" + "02" * 20}, "spec.chain.tokenAddress"),
        ({"chain_id": 1}, "spec.chain.chainId"),
        ({"epoch_seconds": 3600}, "spec.epochSeconds"),
    ],
)
def test_a_changed_identity_is_refused_once_the_pool_has_epochs(change: dict[str, object], field: str) -> None:
    action = decide(replace(CONFIG, **change), obs(distributor_holder=None))  # type: ignore[arg-type]
    assert isinstance(action, Refuse) and action.reason == "IdentityChanged"
    assert field in action.message and "new RewardPool" in action.message


def test_identity_may_be_replaced_while_the_pool_has_no_epoch() -> None:
    fresh = obs(has_epochs=False, newest=None, settled=None, distributor_holder=None)
    assert decide(replace(CONFIG, distributor="0x" + "d2" * 20), fresh) == RecordIdentity(replace=True)


def test_a_distributor_recorded_by_another_pool_is_refused() -> None:
    action = decide(CONFIG, obs(recorded=None, distributor_holder="ns/other", has_epochs=False, newest=None))
    assert isinstance(action, Refuse) and action.reason == "DistributorInUse" and "ns/other" in action.message


def test_a_finished_epoch_is_closed_even_when_paused() -> None:
    assert decide(replace(CONFIG, paused=True), obs(current_epoch=6)) == Close(5)
    assert decide(replace(CONFIG, paused=True), obs()) == Wait()


def test_an_orphaned_intent_is_adopted() -> None:
    assert decide(CONFIG, obs(orphan=(4, "0xabc"))) == Adopt(4, "0xabc")


def test_in_flight_publication_is_driven_once_per_pass_then_waits() -> None:
    inflight = obs(inflight=row(4, "publishing"), inflight_tx="pending", inflight_tx_hash="0xt")
    assert decide(CONFIG, inflight) == Drive(4)
    assert decide(CONFIG, replace(inflight, driven=True)) == Wait()


@pytest.mark.parametrize(
    ("tx_state", "on_chain", "expected"),
    [
        ("confirmed", None, Commit(4, "0xt", "confirmed")),
        ("none", None, Reopen(4, abandon=False)),
        ("reverted", contract(4, ROOT_A), Commit(4, "0xt", "found on chain")),
        ("reverted", contract(3, ROOT_B), Reopen(4, abandon=True, detail="transaction reverted")),
        ("failed", contract(3, ROOT_B), Reopen(4, abandon=True, detail="transaction failed")),
    ],
)
def test_in_flight_outcomes(tx_state: str, on_chain: DistributorState | None, expected: object) -> None:
    o = obs(inflight=row(4, "publishing"), inflight_tx=tx_state, inflight_tx_hash="0xt", contract=on_chain)
    assert decide(CONFIG, o) == expected


def test_a_failed_publication_reads_the_contract_before_deciding() -> None:
    o = obs(inflight=row(4, "publishing"), inflight_tx="reverted", inflight_tx_hash="0xt")
    assert decide(CONFIG, o) == ReadContract()


def test_unchanged_root_commits_without_a_transaction_or_the_chain() -> None:
    o = obs(candidate=row(5, "closed", ROOT_A), settled=row(4, "settled", ROOT_A), current_epoch=6,
            newest=row(5, "closed"))  # fmt: skip
    assert decide(CONFIG, o) == Commit(5, None, "unchanged root")


def test_a_new_root_is_published_only_over_the_contract_state_this_ledger_settled() -> None:
    base = obs(candidate=row(5, "closed", ROOT_B), settled=row(4, "settled", ROOT_A), current_epoch=6,
               newest=row(5, "closed", ROOT_B))  # fmt: skip
    assert decide(CONFIG, base) == ReadContract()
    assert decide(CONFIG, replace(base, contract=contract(4, ROOT_A))) == Publish(5)
    assert decide(CONFIG, replace(base, contract=contract(5, ROOT_B))) == Commit(5, None, "found on chain")


@pytest.mark.parametrize(
    ("settled", "on_chain"),
    [
        (row(4, "settled", ROOT_A), contract(0, ZERO_ROOT, 0)),  # a fresh contract: it would pay history again
        (None, contract(9, ROOT_A)),  # a contract holding another pool's (or ledger's) state
    ],
)
def test_a_contract_that_holds_state_this_ledger_did_not_publish_is_refused(
    settled: EpochRow | None, on_chain: DistributorState
) -> None:
    o = obs(candidate=row(5, "closed", ROOT_B), settled=settled, contract=on_chain, current_epoch=6,
            newest=row(5, "closed", ROOT_B))  # fmt: skip
    action = decide(CONFIG, o)
    assert isinstance(action, Refuse) and action.reason == "ContractStateMismatch"
    assert "pay them twice" in action.message


def test_nothing_to_do_waits() -> None:
    assert decide(CONFIG, obs()) == Wait()
