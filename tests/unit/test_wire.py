import pytest
from hypothesis import given
from hypothesis import strategies as st

from openledger.wire import (
    USAGE_EVENT_FIELD,
    USAGE_FIELDS,
    Contributor,
    ModelRoute,
    Price,
    UsageEvent,
    pack_usage_values,
    unpack_usage_values,
)

PRICE = Price(token="OPEN", decimals=18, per_request=5, per_input_token=2, per_output_token=3)


def make_event(**overrides: object) -> UsageEvent:
    fields: dict[str, object] = dict(
        event_id="0192f0c4-0000-7000-8000-000000000001",
        agent="team-a/agent-1",
        payer="0x" + "a" * 40,
        model="team-a/llama",
        owner="0x" + "b" * 40,
        price=PRICE,
        input_tokens=10,
        output_tokens=20,
        cost=PRICE.cost(10, 20),
        outcome="ok",
        started_at_ms=1,
        finished_at_ms=2,
        contributors=(Contributor("0x" + "c" * 40, 1500, "data"),),
        pool="team-a/pool",
        fee_bps=500,
    )
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def test_cost_is_exact_integer_arithmetic() -> None:
    assert PRICE.cost(10, 20) == 5 + 20 + 60


def test_usage_event_round_trips_through_stream_fields() -> None:
    event = make_event()
    encoded = {k.encode(): v.encode() for k, v in event.to_fields().items()}
    assert UsageEvent.from_fields(encoded) == event


def test_the_stream_entry_is_one_packed_field_that_round_trips() -> None:
    event = make_event(extra={"note": "tab\there, newline\n, back\\slash"})
    entry = event.to_entry()
    assert list(entry) == [USAGE_EVENT_FIELD]
    assert entry[USAGE_EVENT_FIELD].count("\t") == len(USAGE_FIELDS) - 1
    assert "\n" not in entry[USAGE_EVENT_FIELD]
    assert UsageEvent.from_fields(entry) == event
    assert tuple(event.to_fields()) == USAGE_FIELDS


@given(st.lists(st.text(), min_size=len(USAGE_FIELDS), max_size=len(USAGE_FIELDS)))
def test_packing_round_trips_any_text(values: list[str]) -> None:
    packed = pack_usage_values(values)
    assert "\n" not in packed and "\r" not in packed
    assert list(unpack_usage_values(packed).values()) == values


def test_a_packed_event_with_a_value_too_few_is_named() -> None:
    packed = make_event().to_entry()[USAGE_EVENT_FIELD]
    with pytest.raises(ValueError, match="'event' has 19 tab-separated values, expected 20"):
        UsageEvent.from_fields({USAGE_EVENT_FIELD: packed.rsplit("\t", 1)[0]})


def test_failed_request_costs_nothing() -> None:
    event = make_event(outcome="upstream_error", cost=0)
    assert UsageEvent.from_fields(event.to_fields()).cost == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cost", "86", "'cost'"),
        ("input_tokens", "ten", "'input_tokens' is not an integer"),
        ("outcome", "great", "'outcome' must be one of"),
        ("contributors", "0xabc", "'contributors' is malformed"),
        ("fee_bps", "10001", "'fee_bps' is more than 10000 bps"),
    ],
)
def test_bad_event_field_is_named(field: str, value: str, message: str) -> None:
    fields = make_event().to_fields()
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        UsageEvent.from_fields(fields)


def test_missing_field_is_named() -> None:
    fields = make_event().to_fields()
    del fields["payer"]
    with pytest.raises(ValueError, match="missing field 'payer'"):
        UsageEvent.from_fields(fields)


def test_model_route_round_trips_as_json() -> None:
    route = ModelRoute(
        model="ns/m",
        url="http://127.0.0.1:1",
        protocol="v2",
        price=PRICE,
        owner="0x" + "b" * 40,
        contributors=(Contributor("0x" + "c" * 40, 100),),
        generation=3,
    )
    assert ModelRoute.from_json(route.to_json()) == route
