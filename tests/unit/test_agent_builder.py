"""Pure decisions of the Agent controller."""

from __future__ import annotations

import base64

import pytest

from openledger.controllers.agent_builder import (
    AgentSpecError,
    Usage,
    agent_config,
    agent_status,
    api_key_from_secret,
    credentials_secret,
    failed_status,
    new_api_key,
    same_config,
    secret_name,
)
from openledger.gateway.records import QUANTA_MAX

ACCOUNT = "0x" + "Ab" * 20


def test_spec_becomes_the_enforced_config_with_crd_defaults() -> None:
    config = agent_config("ns/a", {"account": ACCOUNT, "models": ["m2", "m1", "m1"]}, "hash")
    assert config.account == ACCOUNT.lower() and config.models == ("m1", "m2")
    assert (config.requests_per_second, config.burst, config.tokens_per_minute, config.max_concurrency) == (
        10,
        20,
        100000,
        8,
    )
    assert (config.queue_max_depth, config.queue_max_wait_ms, config.budget_base_units) == (1000, 30000, None)


def test_budget_is_base_units_in_quanta_that_lua_can_count_exactly() -> None:
    spec = {"account": ACCOUNT, "models": ["m"], "budget": {"amount": "100.5", "period": "Hour", "enforcement": "Soft"}}
    config = agent_config("ns/a", spec, "h")
    assert config.budget_base_units == 1005 * 10**17 and config.budget_period == "Hour"
    assert config.budget_base_units // config.budget_quantum < QUANTA_MAX


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"account": "0x12", "models": ["m"]}, "spec.account"),
        ({"account": ACCOUNT, "models": []}, "spec.models"),
        ({"account": ACCOUNT, "models": ["m"], "budget": {"amount": "1.2.3"}}, "spec.budget.amount"),
        ({"account": ACCOUNT, "models": ["m"], "budget": {"amount": "1", "period": "Week"}}, "spec.budget.period"),
        ({"account": ACCOUNT, "models": ["m"], "limits": {"burst": -1}}, "spec.limits.burst"),
        ({"account": ACCOUNT, "models": ["m"], "queue": {"maxDepth": "x"}}, "spec.queue.maxDepth"),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(AgentSpecError, match=field.replace(".", r"\.")):
        agent_config("ns/a", spec, "h")


def test_unchanged_spec_needs_no_new_version() -> None:
    a = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"]}, "h", version=1)
    b = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"]}, "h", version=2)
    c = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"], "limits": {"burst": 3}}, "h", version=1)
    assert same_config(a, b) and not same_config(a, c)


def test_secret_is_owned_by_the_agent_and_holds_only_the_key() -> None:
    agent = {
        "apiVersion": "openledger.io/v1alpha1",
        "metadata": {"name": "bot", "namespace": "ns", "uid": "u1"},
        "spec": {},
    }
    key = new_api_key()
    secret = credentials_secret(agent, key)
    assert secret["metadata"]["name"] == "bot-credentials" == secret_name("bot", {})
    assert (
        secret["metadata"]["ownerReferences"][0] | {"uid": "u1", "kind": "Agent", "controller": True}
        == (secret["metadata"]["ownerReferences"][0])
    )
    assert base64.b64decode(secret["data"]["apiKey"]).decode() == key and api_key_from_secret(secret) == key
    assert api_key_from_secret({"data": {}}) is None and secret_name("bot", {"credentialsSecretName": "x"}) == "x"
    assert new_api_key() != key and len(key) > 40


def test_status_reports_spend_queue_and_phase_never_the_key() -> None:
    config = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"], "budget": {"amount": "2"}}, "h", version=4)
    usage = Usage(queue_depth=3, in_flight=1, spent_quanta=10**18 // config.budget_quantum, rate_limited=5)
    status = agent_status(config, usage, None, 7, "bot-credentials")
    assert status["phase"] == "Ready" and status["spentThisPeriod"] == "1" and status["budgetRemaining"] == "1"
    assert status["queueDepth"] == 3 and status["observedGeneration"] == 7
    limits = next(c for c in status["conditions"] if c["type"] == "LimitsApplied")
    assert "version 4" in limits["message"] and "5 requests rate limited" in limits["message"]
    over = agent_status(config, Usage(spent_quanta=2 * 10**18 // config.budget_quantum), status, 7, "s")
    assert over["phase"] == "OverBudget" and over["budgetRemaining"] == "0"
    assert agent_status(config, usage, status, 7, "s", throttled=True)["phase"] == "Throttled"
    failed = failed_status(None, 2, "spec.account: bad")
    assert failed["phase"] == "Failed" and failed["conditions"][-1]["message"] == "spec.account: bad"
