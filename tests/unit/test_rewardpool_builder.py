"""Pure pieces of the RewardPool controller."""

from __future__ import annotations

from typing import Any

import pytest

from openledger.controllers import rewardpool_builder as rb
from openledger.settlement.settler import ChainSecrets, PoolStatus
from openledger.wire import PoolBinding

DIST = "0x" + "d1" * 20


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "modelSelector": {"matchLabels": {"team": "a"}},
        "protocolFeeBps": 500,
        "epochSeconds": 60,
        "minPayout": "1.5",
        "chain": {
            "chainId": 31337,
            "rpcUrlSecretRef": {"name": "chain", "key": "rpcUrl"},
            "signerKeySecretRef": {"name": "chain", "key": "signerKey"},
            "tokenAddress": "0x" + "01" * 20,
            "distributorAddress": DIST,
            "confirmations": 3,
        },
    }
    base.update(over)
    return base


def test_pool_config_converts_money_and_keeps_no_secret() -> None:
    config = rb.pool_config("ns", "pool", spec())
    assert config.pool == "ns/pool" and config.min_payout == 15 * 10**17 and config.confirmations == 3
    secrets = ChainSecrets(rpc_url="http://user:hunter2@rpc", signer_key="0x" + "ee" * 32)
    assert "hunter2" not in repr(secrets) and "ee" * 32 not in repr(secrets)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"minPayout": "1.2.3"}, "spec.minPayout"),
        ({"chain": {"chainId": 1}}, "spec.chain.distributorAddress"),
        ({"epochSeconds": 0}, "spec.epochSeconds"),
    ],
)
def test_bad_spec_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(rb.RewardPoolSpecError, match=field.replace(".", r"\.")):
        rb.pool_config("ns", "pool", spec(**change))


def test_secret_values_are_shape_checked_without_echoing_them() -> None:
    rb.check_secrets("http://rpc:8545", "0x" + "ab" * 32)
    with pytest.raises(rb.RewardPoolSpecError, match="rpcUrlSecretRef") as bad_url:
        rb.check_secrets("ftp://secret-host", "0x" + "ab" * 32)
    with pytest.raises(rb.RewardPoolSpecError, match="signerKeySecretRef") as bad_key:
        rb.check_secrets("http://rpc:8545", "not-a-key-SECRET")
    assert "secret-host" not in str(bad_url.value) and "SECRET" not in str(bad_key.value)


def test_missing_secret_ref_names_the_field() -> None:
    bad = spec()
    del bad["chain"]["signerKeySecretRef"]
    with pytest.raises(rb.RewardPoolSpecError, match="signerKeySecretRef"):
        rb.pool_config("ns", "pool", bad)


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({"matchLabels": {"team": "a"}}, {"team": "a", "x": "y"}, True),
        ({"matchLabels": {"team": "a"}}, {"team": "b"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}, {"tier": "gold"}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}, {"tier": "gold"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {}, True),
        ({}, {"anything": "x"}, True),
    ],
)
def test_label_selector_semantics(selector: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    assert rb.selects(selector, labels) is selected


def test_selected_models_and_binding() -> None:
    models = [{"metadata": {"name": n, "labels": {"team": t}}} for n, t in (("b", "a"), ("a", "a"), ("c", "z"))]
    assert rb.selected_models(spec(), models) == ["a", "b"]
    assert rb.binding("ns", "pool", spec()) == PoolBinding(pool="ns/pool", fee_bps=500)


def test_model_events_that_can_change_the_selection() -> None:
    assert rb.model_selection_changed(None, {"team": "a"}, deleted=False)  # first seen (created / restart)
    assert rb.model_selection_changed({"team": "a"}, {"team": "b"}, deleted=False)  # relabelled
    assert rb.model_selection_changed({"team": "a"}, None, deleted=False)  # labels removed
    assert rb.model_selection_changed({"team": "a"}, {"team": "a"}, deleted=True)  # deleted
    assert not rb.model_selection_changed({"team": "a"}, {"team": "a"}, deleted=False)  # status/spec only
    assert not rb.model_selection_changed({}, None, deleted=False)


def test_resync_targets_skip_deleting_and_invalid_pools() -> None:
    def pool(name: str, body: dict[str, Any], **meta: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns", **meta}, "spec": body}

    pools = [
        pool("b", spec()),
        pool("a", spec(protocolFeeBps=100)),
        pool("gone", spec(), deletionTimestamp="2026-01-01T00:00:00Z"),
        pool("bad", spec(chain={})),
    ]
    assert [(name, s.get("protocolFeeBps")) for name, s in rb.resync_targets(pools)] == [("a", 100), ("b", 500)]


def settled(**over: Any) -> PoolStatus:
    base: dict[str, Any] = dict(
        current_epoch=10,
        last_settled_epoch=9,
        last_root="0x" + "ab" * 32,
        last_tx_hash="0x" + "cd" * 32,
        pending_amount=5 * 10**17,
        settled_total=2 * 10**18,
        lag_epochs=0,
        chain_reachable=True,
    )
    base.update(over)
    return PoolStatus(**base)


def test_status_of_a_settled_pool() -> None:
    status = rb.pool_status(None, generation=3, models=2, paused=False, epoch_seconds=60, settled=settled(), now="T")
    assert status["phase"] == "Ready" and status["pendingAmount"] == "0.5" and status["settledTotal"] == "2"
    assert status["lastTxHash"] == "0x" + "cd" * 32 and status["lastSettledAt"] == "T"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "ChainReachable": "True",
        "Settled": "True",
        "Ready": "True",
    }


def test_chain_down_degrades_and_shows_the_backlog() -> None:
    status = rb.pool_status(
        None,
        generation=1,
        models=1,
        paused=False,
        epoch_seconds=60,
        settled=settled(chain_reachable=False, chain_message="chain RPC x failed", lag_epochs=3),
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Degraded"
    assert conds["ChainReachable"]["status"] == "False" and conds["Settled"]["reason"] == "Backlog"
    assert "3 closed epoch" in conds["Settled"]["message"]


def test_empty_tx_hash_is_left_out_because_the_schema_needs_32_bytes() -> None:
    status = rb.pool_status(
        None, generation=1, models=0, paused=False, epoch_seconds=60, settled=settled(last_tx_hash="")
    )
    assert "lastTxHash" not in status


def test_invalid_spec_fails_ready_with_the_message() -> None:
    status = rb.pool_status(None, generation=1, models=0, paused=False, epoch_seconds=60, error="spec.minPayout: bad")
    assert status["phase"] == "Failed" and status["conditions"][0]["message"] == "spec.minPayout: bad"


def test_database_unavailable_degrades_and_keeps_the_last_figures() -> None:
    from openledger.settlement.pool import database_unavailable

    previous = rb.pool_status(None, generation=1, models=1, paused=False, epoch_seconds=60, settled=settled())
    status = rb.pool_status(
        previous,
        generation=1,
        models=1,
        paused=False,
        epoch_seconds=60,
        settled=database_unavailable(11, "PostgreSQL unavailable: connection refused"),
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Degraded" and "settledTotal" not in status  # merge patch keeps the last value
    assert conds["Settled"]["status"] == "False" and conds["Settled"]["reason"] == "DatabaseUnavailable"
    assert conds["Ready"]["reason"] == "DatabaseUnavailable" and "refused" in conds["Ready"]["message"]


@pytest.mark.parametrize("reason", ["IdentityChanged", "DistributorInUse", "ContractStateMismatch"])
def test_a_refused_publication_is_never_up_to_date(reason: str) -> None:
    status = rb.pool_status(
        None,
        generation=2,
        models=1,
        paused=False,
        epoch_seconds=60,
        settled=settled(lag_epochs=0, blocked_reason=reason, blocked_message="spec.chain.distributorAddress: a -> b"),
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Failed" and conds["Settled"]["status"] == "False"
    assert conds["Settled"]["reason"] == reason and "distributorAddress" in conds["Settled"]["message"]


def test_status_amounts_use_the_pool_token_decimals() -> None:
    status = rb.pool_status(
        None,
        generation=1,
        models=1,
        paused=False,
        epoch_seconds=60,
        decimals=6,
        settled=settled(pending_amount=1500000),
    )
    assert status["pendingAmount"] == "1.5"


def test_defaults_come_from_the_crd_schema() -> None:
    bare = {"modelSelector": {}, "chain": {k: v for k, v in spec()["chain"].items() if k != "confirmations"}}
    config = rb.pool_config("ns", "pool", bare)
    assert (config.epoch_seconds, config.min_payout, config.confirmations, config.paused) == (3600, 0, 2, False)
    assert config.token == "0x" + "01" * 20 and rb.token_decimals(bare) == 18
    assert rb.binding("ns", "pool", bare).fee_bps == 0


def model_obj(name: str, labels: dict[str, str], **pricing: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"owner": "0x" + "0a" * 20, "pricing": pricing}}


def pool_obj(name: str, created: str, body: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created, **meta}, "spec": body}


def test_a_model_belongs_to_the_oldest_pool_selecting_it_whichever_pool_syncs() -> None:
    models = [model_obj("m", {"team": "a"}, perRequest="1")]
    pools = [pool_obj("young", "2026-01-02T00:00:00Z", spec()), pool_obj("old", "2026-01-01T00:00:00Z", spec())]
    old = rb.binding_plan("ns", "old", spec(), models, pools)
    young = rb.binding_plan("ns", "young", spec(), models, pools)
    assert old.bound == ["m"] and old.refused == []
    assert young.bound == [] and [(r.model, r.reason) for r in young.refused] == [("m", "ModelClaimed")]
    assert "ns/old" in young.refused[0].message
    # The older pool being deleted (or invalid) no longer holds it: the younger one binds it.
    pools[1] = pool_obj("old", "2026-01-01T00:00:00Z", spec(), deletionTimestamp="2026-01-03T00:00:00Z")
    assert rb.binding_plan("ns", "young", spec(), models, pools).bound == ["m"]
    pools[1] = pool_obj("old", "2026-01-01T00:00:00Z", spec(chain={}))
    assert rb.binding_plan("ns", "young", spec(), models, pools).bound == ["m"]


def test_a_model_priced_in_other_decimals_than_the_pool_token_is_refused() -> None:
    models = [model_obj("six", {"team": "a"}, decimals=6, perRequest="1"), model_obj("ok", {"team": "a"})]
    plan = rb.binding_plan("ns", "pool", spec(), models, [])
    assert plan.bound == ["ok"] and [(r.model, r.reason) for r in plan.refused] == [("six", "DecimalsMismatch")]
    assert "spec.pricing.decimals 6" in plan.refused[0].message and "tokenDecimals 18" in plan.refused[0].message
    six = spec()
    six["chain"] = {**six["chain"], "tokenDecimals": 6}
    assert rb.binding_plan("ns", "pool", six, models, []).bound == ["six"]


def test_a_price_that_can_overflow_the_distributor_amounts_is_refused() -> None:
    limit = rb.AMOUNT_MAX // rb.PRICE_HEADROOM  # base units; 18 decimals
    fits = model_obj("fits", {"team": "a"}, perInputToken=f"{limit // 10**18}")
    huge = model_obj("huge", {"team": "a"}, perOutputToken=f"{limit // 10**18 + 1}")
    plan = rb.binding_plan("ns", "pool", spec(), [fits, huge], [])
    assert plan.bound == ["fits"] and [(r.model, r.reason) for r in plan.refused] == [("huge", "PriceOverflow")]
    assert "spec.pricing.perOutputToken" in plan.refused[0].message


def test_models_bound_condition() -> None:
    plan = rb.BindingPlan(["a"], [rb.Refusal("b", "DecimalsMismatch", "Model b: decimals")])
    cond = rb.models_bound_condition(plan, generation=1, now="T")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "DecimalsMismatch", "Model b: decimals")
    assert rb.models_bound_condition(rb.BindingPlan(["a"], []), generation=1, now="T")["status"] == "True"
