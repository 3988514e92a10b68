"""Pure decisions of the gateway: metering bounds, protocols, records, ids."""

from __future__ import annotations

import json
import uuid

import pytest

from openledger.gateway.durability import DurabilityBarrier, durable
from openledger.gateway.ids import uuid7
from openledger.gateway.journal import LEASE_S, RECORD_TTL_S, SWEEP_INTERVAL_S
from openledger.gateway.lifetimes import INFLIGHT_MARGIN_S, inflight_ttl_s, shutdown_timeout_s
from openledger.gateway.metering import (
    CHAT_TEMPLATE_TOKENS,
    RequestError,
    actual_usage,
    estimate,
    max_cost,
    with_output_bound,
)
from openledger.gateway.protocols import Route, error_body, match_path, upstream_path
from openledger.gateway.records import AgentConfig, AgentKeys, period_bounds_s, period_id
from openledger.gateway.redisproto import RedisClient
from openledger.gateway.scripts import ADMIT, SETTLE, AdmitCode
from openledger.gateway.server import graceful_shutdown_s
from openledger.settings import Settings
from openledger.wire import Price


def test_paths_map_to_protocols_and_upstream_paths() -> None:
    assert match_path("/v1/models/iris:predict") == Route("v1", "predict", "iris")
    assert match_path("/v2/models/iris/infer") == Route("v2", "infer", "iris")
    assert match_path("/v1/chat/completions") == Route("openai", "chat", None)
    assert match_path("/openai/v1/completions") == Route("openai", "completions", None)
    assert match_path("/v1/models/a/b:predict") is None
    assert match_path("/v3/anything") is None
    assert upstream_path(Route("openai", "chat", None), "llm") == "/openai/v1/chat/completions"
    assert upstream_path(Route("v2", "infer", "m"), "m") == "/v2/models/m/infer"


def test_errors_use_each_protocols_shape() -> None:
    openai = json.loads(error_body("openai", 429, "rate_limited", "slow down"))
    assert openai == {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limited", "param": None}
    }
    assert json.loads(error_body("v1", 401, "invalid_api_key", "no")) == {"error": "no"}
    assert json.loads(error_body("v2", 402, "budget_exhausted", "broke")) == {"error": "broke"}


def test_openai_estimate_bounds_input_by_bytes_and_output_by_max_tokens() -> None:
    shape = estimate("openai", "chat", {"messages": [{"role": "user", "content": "héllo"}], "max_tokens": 10, "n": 2})
    assert shape.max_input_tokens == len("héllo".encode()) + 4 + CHAT_TEMPLATE_TOKENS
    assert shape.max_output_tokens == 20
    assert shape.estimated_tokens < shape.max_input_tokens + shape.max_output_tokens + 8
    default = estimate("openai", "completions", {"prompt": "abc"}, default_max_tokens=7)
    assert default.max_output_tokens == 7
    # Legacy completions default to 16 output tokens (OpenAI's and vLLM's default), chat to the gateway's.
    assert estimate("openai", "completions", {"prompt": "abc"}, default_max_tokens=256).max_output_tokens == 16


@pytest.mark.parametrize(
    ("protocol", "kind", "body", "field"),
    [
        ("openai", "chat", {"messages": []}, "messages"),
        ("openai", "chat", {"messages": [{"content": 3}]}, "messages[0].content"),
        ("openai", "completions", {"prompt": 3}, "prompt"),
        ("openai", "chat", {"messages": [{"content": "x"}], "max_tokens": 0}, "max_tokens"),
        ("v1", "predict", {"rows": []}, "instances"),
        ("v2", "infer", {"inputs": [{"shape": "2"}]}, "inputs[0].shape"),
        ("v1", "predict", [], "body"),
    ],
)
def test_bad_bodies_name_the_field(protocol: str, kind: str, body: object, field: str) -> None:
    with pytest.raises(RequestError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        estimate(protocol, kind, body)


def test_charged_usage_never_exceeds_the_reserved_bound() -> None:
    shape = estimate("openai", "chat", {"messages": [{"content": "hi"}], "max_tokens": 5})
    over = {"usage": {"prompt_tokens": 10_000, "completion_tokens": 10_000}}
    assert actual_usage(shape, over) == (shape.max_input_tokens, 5)
    assert actual_usage(shape, {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}) == (1, 2)
    v1 = estimate("v1", "predict", {"instances": [[1], [2]]})
    assert actual_usage(v1, {"predictions": [0, 1, 2]}) == (2, 2)
    v2 = estimate("v2", "infer", {"inputs": [{"shape": [3, 4]}]})
    assert actual_usage(v2, {"outputs": [{"shape": [3]}]}) == (3, 3)
    price = Price(per_request=5, per_input_token=2, per_output_token=3)
    assert max_cost(price, v2) == 5 + 3 * 2 + 3 * 3


def test_agent_config_round_trips_and_names_missing_fields() -> None:
    config = AgentConfig(
        ref="ns/a",
        account="0x" + "1" * 40,
        models=("m1", "m2"),
        requests_per_second=2.5,
        budget_base_units=10**77 + 1,
        key_hash="h",
        version=3,
    )
    assert AgentConfig.from_fields(config.to_fields()) == config
    raw = config.to_fields()
    del raw["burst"]
    with pytest.raises(ValueError, match="'burst'"):
        AgentConfig.from_fields(raw)


def test_budgets_are_exact_integers_of_any_ledger_size() -> None:
    big = 10**78 - 1
    config = AgentConfig(ref="ns/a", account="0x", models=(), budget_base_units=big)
    assert config.to_fields()["budget"] == str(big) and "quantum" not in config.to_fields()
    assert AgentConfig.from_fields({**config.to_fields(), "quantum": "1000"}) == config  # an old field is ignored
    with pytest.raises(ValueError, match="budget"):
        AgentConfig(ref="ns/a", account="0x", models=(), budget_base_units=10**78)


def test_revocation_leaves_in_flight_records_to_expire() -> None:
    keys = AgentKeys("ns/a")
    assert set(keys.in_flight_keys()) == {keys.inflight, keys.reserved}
    assert not set(keys.in_flight_keys()) & set(keys.all_static())
    assert keys.spend not in keys.all_static() and keys.spend_gen not in keys.all_static()


def test_in_flight_ttl_is_minutes_and_outlives_a_request_and_shutdown() -> None:
    ttl = inflight_ttl_s(60, 5, 1)
    assert 60 + 5 < ttl <= 5 * 60
    assert 60 < shutdown_timeout_s(60, 5, 1) < ttl
    assert inflight_ttl_s(600, 5, 1) > 600  # follows the upstream timeout


@pytest.mark.parametrize("timeouts", [(60, 5, 1), (2, 0.1, 0.1), (600, 5, 10)])
def test_a_dead_gateways_stream_is_swept_before_its_slot_is_reclaimed(timeouts: tuple[float, float, float]) -> None:
    """A stream may run until the upstream deadline, its gateway die, its lease (renewed until then)
    run out and a sweep come: all before the slot's ttl (after it the reservation is released
    uncharged), with the in-flight margin to spare. Its journal record expires before the settle
    marker (which lives as long as the slot): a record swept after its marker would charge twice."""
    upstream_s = timeouts[0]
    ttl = inflight_ttl_s(*timeouts)
    assert LEASE_S >= INFLIGHT_MARGIN_S
    assert upstream_s + LEASE_S + SWEEP_INTERVAL_S + INFLIGHT_MARGIN_S <= ttl
    assert ttl >= RECORD_TTL_S + INFLIGHT_MARGIN_S


def test_no_money_through_lua_numbers() -> None:
    for script in (ADMIT, SETTLE):
        assert "tonumber(ARGV[12])" not in script.source and "%.0f', x) end\n" not in script.source
        assert "HINCRBY', KEYS[4], '_total'" not in script.source and "INCRBY', KEYS[3]" not in script.source
    assert AdmitCode(-9) is AdmitCode.SPEND_UNKNOWN


def test_durability_replies_and_policies() -> None:
    assert durable("wait", 1) and not durable("wait", 0)
    assert durable("waitaof", [1, 0]) and not durable("waitaof", [0, 0])
    with pytest.raises(ValueError, match="gateway_durability"):
        DurabilityBarrier(RedisClient("redis://127.0.0.1:1/0"), "fsync", 1000)


def test_budget_periods_are_utc_calendar_periods() -> None:
    t = 1_795_618_167  # 2026-11-25T14:49:27Z
    assert (
        period_id("Hour", t) == "2026112514" and period_id("Day", t) == "20261125" and period_id("Month", t) == "202611"
    )
    start, end = period_bounds_s("Month", t)
    assert end - start == 30 * 86400
    with pytest.raises(ValueError, match=r"budget\.period"):
        period_id("Week", t)


def test_event_ids_are_time_ordered_uuid7() -> None:
    a, b = uuid7(1_000), uuid7(2_000)
    assert uuid.UUID(a).version == 7 and uuid.UUID(a).variant == uuid.RFC_4122
    assert a < b and len({uuid7() for _ in range(1000)}) == 1000


def test_graceful_shutdown_outlasts_the_upstream_timeout() -> None:
    assert graceful_shutdown_s(Settings(gateway_upstream_timeout_s=600)) > 600
    assert graceful_shutdown_s(Settings(gateway_shutdown_timeout_s=95)) == 95


def test_a_request_without_an_output_bound_is_sent_with_the_reserved_one() -> None:
    """The model never generates more than the reservation covers (tokens beyond it would be free)."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert with_output_bound("chat", chat, 256) == {**chat, "max_tokens": 256}
    assert estimate("openai", "chat", chat, 256).max_output_tokens == 256
    assert with_output_bound("completions", {"prompt": "x"}, 64) == {"prompt": "x", "max_tokens": 16}
    assert with_output_bound("completions", {"prompt": "x"}, 8) == {"prompt": "x", "max_tokens": 8}
    assert estimate("openai", "completions", {"prompt": "x"}, 64).max_output_tokens == 16
    assert with_output_bound("chat", {**chat, "max_tokens": 5}, 256) is None  # the client's own bound
    assert with_output_bound("chat", {**chat, "max_completion_tokens": 5}, 256) is None
    assert with_output_bound("embeddings", {"input": "x"}, 256) is None


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_null_output_bound_is_no_bound_and_gets_the_reserved_one(field: str) -> None:
    """``"max_tokens": null`` would let the model use its own default, beyond what was reserved."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: None}
    sent = with_output_bound("chat", chat, 256)
    assert sent == {"model": "m", "messages": chat["messages"], "max_tokens": 256}
    assert estimate("openai", "chat", chat, 256).max_output_tokens == 256
    both = {**chat, "max_tokens": None, "max_completion_tokens": None}
    assert with_output_bound("chat", both, 256) == {"model": "m", "messages": chat["messages"], "max_tokens": 256}
    completion = {"prompt": "x", field: None}
    assert with_output_bound("completions", completion, 256) == {"prompt": "x", "max_tokens": 16}
    assert estimate("openai", "completions", completion, 256).max_output_tokens == 16


def test_a_null_bound_beside_a_real_one_is_dropped_and_the_real_one_kept() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "max_completion_tokens": 5}
    assert with_output_bound("chat", chat, 256) == {"messages": chat["messages"], "max_completion_tokens": 5}
    assert estimate("openai", "chat", chat, 256).max_output_tokens == 5
