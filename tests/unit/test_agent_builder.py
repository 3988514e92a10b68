"""Pure decisions of the Agent controller."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from openledger.controllers.agent_builder import (
    AGENT_LABEL,
    AgentSpecError,
    StreamUsage,
    Usage,
    agent_config,
    agent_status,
    api_key_from_secret,
    credentials_secret,
    failed_status,
    new_api_key,
    period_window_ms,
    rebuilt_spend,
    same_config,
    secret_name,
    secret_not_owned_status,
    secret_owned_by,
    spend_of,
    stream_usage,
)
from openledger.wire import Price, UsageEvent, unpack_usage_values

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


def test_budget_is_exact_base_units_of_any_size_the_ledger_holds() -> None:
    spec = {"account": ACCOUNT, "models": ["m"], "budget": {"amount": "100.5", "period": "Hour", "enforcement": "Soft"}}
    config = agent_config("ns/a", spec, "h")
    assert config.budget_base_units == 1005 * 10**17 and config.budget_period == "Hour"
    assert config.to_fields()["budget"] == "100500000000000000000"
    huge = {"account": ACCOUNT, "models": ["m"], "budget": {"amount": "9" * 59 + "." + "9" * 18}}
    assert agent_config("ns/a", huge, "h").budget_base_units == 10**77 - 1


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"account": "0x12", "models": ["m"]}, "spec.account"),
        ({"account": ACCOUNT, "models": []}, "spec.models"),
        ({"account": ACCOUNT, "models": ["m"], "budget": {"amount": "1.2.3"}}, "spec.budget.amount"),
        ({"account": ACCOUNT, "models": ["m"], "budget": {"amount": "1" + "0" * 60}}, "spec.budget.amount"),
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
    usage = Usage(queue_depth=3, in_flight=1, spent_base_units=10**18, rate_limited=5)
    status = agent_status(config, usage, None, 7, "bot-credentials")
    assert status["phase"] == "Ready" and status["spentThisPeriod"] == "1" and status["budgetRemaining"] == "1"
    assert status["queueDepth"] == 3 and status["observedGeneration"] == 7
    limits = next(c for c in status["conditions"] if c["type"] == "LimitsApplied")
    assert "version 4" in limits["message"] and "5 requests rate limited" in limits["message"]
    over = agent_status(config, Usage(spent_base_units=2 * 10**18), status, 7, "s")
    assert over["phase"] == "OverBudget" and over["budgetRemaining"] == "0"
    assert agent_status(config, usage, status, 7, "s", throttled=True)["phase"] == "Throttled"
    failed = failed_status(None, 2, "spec.account: bad")
    assert failed["phase"] == "Failed" and failed["conditions"][-1]["message"] == "spec.account: bad"


def test_status_of_a_budget_whose_spend_is_being_rebuilt_is_degraded_and_keeps_the_last_figures() -> None:
    config = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"], "budget": {"amount": "2"}}, "h", version=4)
    status = agent_status(config, Usage(spent_base_units=None), None, 1, "s", spend_problem="PostgreSQL unavailable")
    assert status["phase"] == "Degraded" and "spentThisPeriod" not in status and "budgetRemaining" not in status
    limits = next(c for c in status["conditions"] if c["type"] == "LimitsApplied")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (limits["status"], limits["reason"], ready["status"]) == ("False", "SpendRestoring", "False")
    assert "PostgreSQL unavailable" in limits["message"]
    unbudgeted = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"]}, "h")
    assert agent_status(unbudgeted, Usage(spent_base_units=None), None, 1, "s")["phase"] == "Ready"


def test_huge_spend_and_budget_stay_exact() -> None:
    budget = "9" * 59 + ".999999999999999999"
    config = agent_config("ns/a", {"account": ACCOUNT, "models": ["m"], "budget": {"amount": budget}}, "h")
    status = agent_status(config, Usage(spent_base_units=10**77 - 2), None, 1, "s")
    assert status["budgetRemaining"] == "0.000000000000000001" and status["phase"] == "Ready"


def test_spend_record_counts_only_for_its_own_period() -> None:
    assert spend_of({}, "20261202") is None  # no record: unknown, not zero
    assert spend_of({"period": "20261202", "spent": str(10**77)}, "20261202") == 10**77
    assert spend_of({"period": "20261201", "spent": "5"}, "20261202") == 0
    with pytest.raises(ValueError, match="'spent'"):
        spend_of({"period": "20261202", "spent": "1e3"}, "20261202")


def _event(agent: str, cost: int, finished_at_ms: int, event_id: str | None = None) -> UsageEvent:
    return UsageEvent(
        event_id=event_id or str(uuid.uuid4()),
        agent=agent,
        payer=ACCOUNT.lower(),
        model="ns/m",
        owner="0x" + "ab" * 20,
        price=Price(per_request=cost),
        input_tokens=0,
        output_tokens=0,
        cost=cost,
        outcome="ok",
        started_at_ms=finished_at_ms - 5,
        finished_at_ms=finished_at_ms,
    )


def test_stream_entries_of_both_wire_formats_are_read_for_their_agent_only() -> None:
    event = _event("ns/a", 10**60, 1_700_000_000_000)
    packed = event.to_entry()
    named = unpack_usage_values(packed["event"])  # the first wire format: one stream field per value
    expected = StreamUsage(str(uuid.UUID(event.event_id)), 10**60, 1_700_000_000_000)
    assert stream_usage("ns/a", packed) == expected == stream_usage("ns/a", named)
    assert stream_usage("ns/a", {k.encode(): v.encode() for k, v in packed.items()}) == expected
    assert stream_usage("ns/b", packed) is None
    with pytest.raises(ValueError, match="'cost'"):
        stream_usage("ns/a", named | {"cost": "-1"})
    with pytest.raises(ValueError, match="'id'"):
        stream_usage("ns/a", named | {"id": "nope"})


def test_rebuilt_spend_is_the_ledger_plus_the_periods_events_it_has_not_ingested_each_once() -> None:
    now_s = datetime(2026, 12, 2, 13, 30, tzinfo=UTC).timestamp()
    window = period_window_ms("Day", now_s)
    day_start, day_end = window
    assert (day_start, day_end) == (int(datetime(2026, 12, 2, tzinfo=UTC).timestamp()) * 1000, day_start + 86_400_000)
    ingested = StreamUsage("a", 10**30, day_start + 1)
    fresh = StreamUsage("b", 7, day_end - 1)
    stream = [
        ingested,  # already in the ledger's sum
        fresh,
        fresh,  # the same event twice counts once
        StreamUsage("c", 1000, day_start - 1),  # the previous day
        StreamUsage("d", 1000, day_end),  # the next day
        StreamUsage("e", 11, day_start),  # the period's first millisecond
    ]
    assert rebuilt_spend(10**30 + 5, stream, {"a"}, window) == 10**30 + 5 + 7 + 11
    assert rebuilt_spend(0, [], set(), window) == 0


def test_month_and_hour_windows_are_whole_hours() -> None:
    now_s = datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp()
    start, end = period_window_ms("Month", now_s)
    assert (end - start) == 29 * 86_400_000 and start % 3_600_000 == 0
    start, end = period_window_ms("Hour", now_s)
    assert end - start == 3_600_000 and start == int(datetime(2024, 2, 29, 23, tzinfo=UTC).timestamp()) * 1000


def test_an_agent_uses_only_a_secret_it_owns_or_that_carries_its_label() -> None:
    agent = {"apiVersion": "openledger.io/v1alpha1", "metadata": {"name": "b", "namespace": "ns", "uid": "uid-b"}}
    own = credentials_secret(agent, new_api_key())
    other = credentials_secret({**agent, "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a"}}, "k")
    assert secret_owned_by(own, agent) and not secret_owned_by(other, agent)
    assert secret_owned_by({"metadata": {"labels": {AGENT_LABEL: "b"}}}, agent)
    assert not secret_owned_by({"metadata": {"labels": {AGENT_LABEL: "a"}}}, agent)
    assert not secret_owned_by({"metadata": {}}, agent)
    foreign_uid = {"metadata": {"ownerReferences": [{"kind": "Agent", "uid": "uid-a"}]}}
    assert not secret_owned_by(foreign_uid, agent)
    relabelled = {"metadata": {**foreign_uid["metadata"], "labels": {AGENT_LABEL: "b"}}}
    assert not secret_owned_by(relabelled, agent)  # another Agent's Secret, whatever its label says
    status = secret_not_owned_status(None, 3, "a-credentials")
    cond = next(c for c in status["conditions"] if c["type"] == "CredentialsIssued")
    assert (status["phase"], cond["status"], cond["reason"]) == ("Failed", "False", "SecretNotOwned")
