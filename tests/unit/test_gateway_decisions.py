"""Pure decisions of the gateway: metering bounds, protocols, records, ids."""

from __future__ import annotations

import json
import uuid

import pytest

from openledger.gateway.ids import uuid7
from openledger.gateway.metering import RequestError, actual_usage, estimate, max_cost
from openledger.gateway.protocols import Route, error_body, match_path, upstream_path
from openledger.gateway.records import QUANTA_MAX, AgentConfig, choose_quantum, period_bounds_s, period_id
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
    assert shape.max_input_tokens == len("héllo".encode()) + 4
    assert shape.max_output_tokens == 20
    assert shape.estimated_tokens < shape.max_input_tokens + shape.max_output_tokens + 8
    default = estimate("openai", "completions", {"prompt": "abc"}, default_max_tokens=7)
    assert default.max_output_tokens == 7


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
        budget_base_units=10**20,
        budget_quantum=choose_quantum(10**20),
        key_hash="h",
        version=3,
    )
    assert AgentConfig.from_fields(config.to_fields()) == config
    raw = config.to_fields()
    del raw["burst"]
    with pytest.raises(ValueError, match="'burst'"):
        AgentConfig.from_fields(raw)


def test_budget_quanta_stay_exact_in_lua_doubles() -> None:
    for amount in (1, 10**18, 10**20, 123456789 * 10**18, 10**30):
        quantum = choose_quantum(amount)
        assert amount // quantum < QUANTA_MAX
        assert quantum == 1 or amount // (quantum // 10) >= QUANTA_MAX
    config = AgentConfig(ref="ns/a", account="0x", models=(), budget_base_units=10**20, budget_quantum=10**5)
    assert config.cost_quanta(1) == 1 and config.cost_quanta(10**5) == 1 and config.cost_quanta(10**5 + 1) == 2
    with pytest.raises(ValueError, match="2\\*\\*50"):
        AgentConfig(ref="ns/a", account="0x", models=(), budget_base_units=10**20)


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
