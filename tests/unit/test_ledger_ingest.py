"""The ingest hot path agrees with the wire format's own parser and with the pure split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openledger.settlement.ledger import ingest
from openledger.settlement.ledger import split as sp
from openledger.settlement.ledger.errors import PoisonEvent
from openledger.wire import USAGE_FIELDS, Contributor, Price, UsageEvent, pack_usage_values

ADDR = st.integers(min_value=1, max_value=2**160 - 1).map(lambda n: f"0x{n:040x}")


def entry_of(fields: dict[str, str], wire: str) -> list[bytes]:
    """The stream entry of ``fields`` in a wire format: ``packed`` (what the gateway writes) or the
    first one, ``fields``. A field missing from ``fields`` is left out of the packed value too."""
    if wire == "fields":
        return ingest.entry_kv(fields)
    return [b"event", pack_usage_values([fields[name] for name in USAGE_FIELDS if name in fields]).encode()]


@pytest.fixture(params=["packed", "fields"])
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@st.composite
def events(draw: st.DrawFn) -> UsageEvent:
    price = Price(
        per_request=draw(st.integers(0, 10**20)),
        per_input_token=draw(st.integers(0, 10**15)),
        per_output_token=draw(st.integers(0, 10**15)),
    )
    tin, tout = draw(st.integers(0, 100_000)), draw(st.integers(0, 100_000))
    outcome = draw(st.sampled_from(["ok", "ok", "ok", "upstream_error", "timeout"]))
    # The whole configurable range: any fee <= 10000 with shares (of what is left) summing to <= 10000.
    fee = draw(st.integers(0, 10_000))
    n = draw(st.integers(0, 3))
    contributors = tuple(Contributor(draw(ADDR), draw(st.integers(0, 10_000 // max(n, 1)))) for _ in range(n))
    eid = draw(st.uuids(version=4)).hex
    return UsageEvent(
        event_id=f"{eid[:8]}-{eid[8:12]}-{eid[12:16]}-{eid[16:20]}-{eid[20:]}",
        agent=draw(st.sampled_from(["a/x", "a/y", "b/z"])),
        payer=draw(ADDR),
        model="ns/model",
        owner=draw(ADDR),
        price=price,
        input_tokens=tin,
        output_tokens=tout,
        cost=price.cost(tin, tout) if outcome == "ok" else 0,
        outcome=outcome,
        started_at_ms=draw(st.integers(0, 2**42)),
        finished_at_ms=draw(st.integers(0, 2**42)),
        contributors=contributors,
        pool=draw(st.sampled_from(["", "ns/p1", "ns/p2"])),
        fee_bps=fee,
    )


@settings(max_examples=50)
@given(batch=st.lists(events(), min_size=1, max_size=30), wire=st.sampled_from(["packed", "fields"]))
def test_batch_aggregation_equals_the_sum_of_per_event_splits(batch: list[UsageEvent], wire: str) -> None:
    parser = ingest.Parser()
    records = [parser.parse(b"%d-0" % i, entry_of(e.to_fields(), wire)) for i, e in enumerate(batch)]
    plan = ingest.assemble(records)
    expected: dict[str, dict[str, int]] = {}
    for e in batch:
        contributors = [(c.account, c.share_bps) for c in e.contributors]
        for account, amount in sp.event_postings(e.cost, e.payer, e.owner, e.pool, e.fee_bps, contributors):
            pool = expected.setdefault(e.pool, {})
            pool[account] = pool.get(account, 0) + amount
    want = {pool: sp.aggregate(p.items()) for pool, p in expected.items()}
    want = {pool: p for pool, p in want.items() if p}
    assert {e.pool: e.postings for e in plan.entries} == want
    for entry in plan.entries:
        assert sum(entry.postings.values()) == 0
    assert sum(a for a, _ in plan.spend.values()) == sum(e.cost for e in batch)
    data = plan.copy_data(1000)
    assert data.count(b"\n") == len(batch)


def test_record_body_is_the_copy_row_of_the_wire_fields(wire: str) -> None:
    event = UsageEvent(
        event_id="0192F0C4-0000-7000-8000-000000000001",
        agent="a/x",
        payer="0x" + "a" * 40,
        model="ns/m",
        owner="0x" + "b" * 40,
        price=Price(per_request=5),
        input_tokens=1,
        output_tokens=2,
        cost=5,
        outcome="ok",
        started_at_ms=1,
        finished_at_ms=7_200_001,
        extra={"note": "tab\there \\ back"},
    )
    record = ingest.Parser().parse(b"5-1", entry_of(event.to_fields(), wire))
    assert record.event_id == b"0192f0c4-0000-7000-8000-000000000001"
    assert record.hour == 2
    columns = record.body.split(b"\t")
    assert len(columns) == len(USAGE_FIELDS)
    assert columns[-1] == ingest.copy_escape(json.dumps(event.extra, separators=(",", ":")).encode())


def test_fields_in_another_order_or_without_optional_ones_parse_the_same() -> None:
    fields = {k: v for k, v in reversed(list(_ok_fields().items())) if k not in ("extra", "pool", "fee_bps")}
    record = ingest.parse_event(fields)
    assert record.shape.pool == "" and record.shape.fee_bps == 0


def _ok_fields() -> dict[str, str]:
    return UsageEvent(
        event_id="0192f0c4-0000-7000-8000-000000000002",
        agent="a/x",
        payer="0x" + "a" * 40,
        model="ns/m",
        owner="0x" + "b" * 40,
        price=Price(per_input_token=3),
        input_tokens=10,
        output_tokens=0,
        cost=30,
        outcome="ok",
        started_at_ms=1,
        finished_at_ms=2,
        contributors=(Contributor("0x" + "c" * 40, 1000),),
        pool="ns/p",
        fee_bps=100,
    ).to_fields()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "not-a-uuid"}, "'id'"),
        ({"cost": "31"}, "'cost'"),
        ({"cost": "-30"}, "'cost'"),
        ({"input_tokens": "1_0"}, "'input_tokens'"),
        ({"input_tokens": "99999999999999999999"}, "'input_tokens'"),
        ({"outcome": "weird"}, "'outcome'"),
        ({"owner": "bob"}, "'owner'"),
        ({"payer": "0x12"}, "'payer'"),
        ({"contributors": "0xzz:1:data"}, "'contributors'"),
        ({"fee_bps": "10001"}, "'fee_bps' is more than 10000 bps"),
        ({"extra": "{not json"}, "'extra'"),
        ({"agent": "a\x00b"}, "'agent'"),
        ({"model": None}, "'model'"),
        ({"pool": "ns/pool\twith-tab"}, "'pool'"),
        ({"pool": "no-slash"}, "'pool'"),
    ],
)
def test_poison_events_are_rejected_naming_the_field(change: dict[str, str | None], field: str, wire: str) -> None:
    fields = _ok_fields()
    for key, value in change.items():
        if value is None:
            del fields[key]
            if wire == "packed":  # a packed event has no names: a missing value is a wrong count
                field = "'event' has 19 tab-separated values"
        else:
            fields[key] = value
    with pytest.raises(PoisonEvent, match=field):
        ingest.Parser().parse(b"1-0", entry_of(fields, wire))


def test_record_fields_are_the_values_the_producer_sent(wire: str) -> None:
    fields = _ok_fields() | {"model": "ns/m\\x\ty", "extra": '{"note":"a\\\\tb"}'}
    assert ingest.record_fields(ingest.Parser().parse(b"1-0", entry_of(fields, wire))) == fields


def test_the_fast_and_the_precise_path_store_the_same_row(wire: str) -> None:
    fields = _ok_fields()
    parser = ingest.Parser()
    fast = parser.parse(b"1-0", entry_of(fields, wire))
    # An escaped character anywhere sends the entry down the precise path.
    escaped = parser.parse(b"1-0", entry_of(fields | {"model": "ns/m\\x"}, wire))
    assert escaped.body == fast.body.replace(b"ns/m", b"ns/m\\\\x")
    assert escaped[3:] == fast[3:]  # the same (cached) shape, cost, agent and hour


def test_a_packed_event_with_a_bad_escape_names_the_field() -> None:
    fields = _ok_fields() | {"model": "ns/m\\q"}
    values = [fields[name] for name in USAGE_FIELDS]
    with pytest.raises(PoisonEvent, match="'model' has an invalid escape"):
        ingest.Parser().parse(b"1-0", [b"event", "\t".join(values).encode()])


def test_failed_requests_are_recorded_without_an_entry() -> None:
    fields = _ok_fields() | {"outcome": "timeout", "cost": "0"}
    plan = ingest.assemble([ingest.parse_event(fields)])
    assert plan.entries == []
    assert plan.copy_data(1).endswith(b"\\N\n")
    assert plan.spend == {("a/x", 0): [0, 1]}


def test_array_literals_quote_every_element() -> None:
    from openledger.settlement.ledger.writer import _array

    assert _array(['a"b', "c\\d", "owner:0xab", "ns/pool"]) == '{"a\\"b","c\\\\d","owner:0xab","ns/pool"}'
    assert _array([]) == "{}"


def _raw_entry(fields: dict[str, str], wire: str, bad_field: str) -> list[bytes]:
    """``fields`` as raw stream bytes, with an invalid UTF-8 sequence inside ``bad_field``."""
    values = {k: v.encode() for k, v in fields.items()}
    values[bad_field] = values[bad_field][:1] + b"\xff\xfe" + values[bad_field][1:]
    if wire == "fields":
        return [x for key, value in values.items() for x in (key.encode(), value)]
    return [b"event", b"\t".join(values[name] for name in USAGE_FIELDS)]


@pytest.mark.parametrize("precise", [False, True], ids=["fast-path", "precise-path"])
@pytest.mark.parametrize("bad_field", ["agent", "payer", "model", "owner", "token", "contributors", "pool"])
def test_invalid_utf8_is_poison_naming_the_field(bad_field: str, precise: bool, wire: str) -> None:
    fields = _ok_fields()
    if precise:  # an escaped backslash elsewhere sends the entry down the precise path
        fields["extra"] = '{"note":"a\\\\\\\\b"}' if wire == "packed" else '{"note":"a\\\\b"}'
    with pytest.raises(PoisonEvent, match=f"field '{bad_field}' is not valid UTF-8"):
        ingest.Parser().parse(b"1-0", _raw_entry(fields, wire, bad_field))


def test_a_rejection_reason_never_raises_and_keeps_the_field_name() -> None:
    kv = _raw_entry(_ok_fields(), "packed", "agent")
    reason = ingest.explain_rejection(kv, PoisonEvent("usage event: field 'agent' is not valid UTF-8 (byte 1)"))
    assert "'agent'" in reason


def test_dead_letter_fields_carry_the_original_entry_unchanged(wire: str) -> None:
    kv = _raw_entry(_ok_fields(), wire, "model")
    flat = ingest.dead_letter_fields("usage", b"7-1", "why: 'model'", 5, "host-1", kv)
    meta, original = ingest.split_dead_letter(flat)
    assert original == kv
    assert meta == {
        b"dead_stream": b"usage",
        b"dead_id": b"7-1",
        b"dead_reason": b"why: 'model'",
        b"dead_deliveries": b"5",
        b"dead_consumer": b"host-1",
    }


def test_an_unforeseen_parser_error_makes_a_reason_naming_its_type() -> None:
    from openledger.settlement.ledger.worker import _rejection

    kv = entry_of(_ok_fields(), "packed")
    assert _rejection(kv, IndexError("tuple index out of range")) == (
        "usage event could not be parsed: IndexError: tuple index out of range"
    )
    assert _rejection(kv, PoisonEvent("usage event: field 'cost' is 1")) == "usage event: field 'cost' is 1"


def test_a_fee_plus_full_contributor_shares_is_ingested_not_poison(wire: str) -> None:
    """Fee 500 bps, then 10000 bps of the rest to contributors: the owner gets nothing, nothing is refused."""
    price = Price(per_request=10**18, per_input_token=0, per_output_token=0)
    event = UsageEvent(
        event_id="0190a8e0-0000-7000-8000-000000000001",
        agent="a/x",
        payer="0x" + "1" * 40,
        model="ns/model",
        owner="0x" + "2" * 40,
        price=price,
        input_tokens=0,
        output_tokens=0,
        cost=10**18,
        outcome="ok",
        started_at_ms=1,
        finished_at_ms=2,
        contributors=(Contributor("0x" + "3" * 40, 6000), Contributor("0x" + "4" * 40, 4000)),
        pool="ns/p1",
        fee_bps=500,
    )
    plan = ingest.assemble([ingest.Parser().parse(b"1-0", entry_of(event.to_fields(), wire))])
    (entry,) = plan.entries
    assert entry.postings == {
        sp.agent_account("0x" + "1" * 40): -(10**18),
        sp.fee_account("ns/p1"): 5 * 10**16,
        sp.contributor_account("0x" + "3" * 40): 57 * 10**16,
        sp.contributor_account("0x" + "4" * 40): 38 * 10**16,
    }
