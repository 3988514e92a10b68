"""Usage events for settlement tests, written through the ledger's own ingest path."""

from __future__ import annotations

import uuid

from openledger.settlement.ledger.ingest import assemble, parse_event
from openledger.settlement.ledger.writer import BatchWriter
from openledger.wire import Contributor, Price, UsageEvent

PRICE = Price(per_request=10**15, per_input_token=10**12, per_output_token=2 * 10**12)


def usage_event(
    pool: str,
    owner: str,
    contributors: tuple[tuple[str, int], ...] = (),
    *,
    tokens: int = 100,
    fee_bps: int = 500,
    model: str = "ns/m",
) -> UsageEvent:
    return UsageEvent(
        event_id=str(uuid.uuid4()),
        agent="ns/agent",
        payer="0x" + "9" * 40,
        model=model,
        owner=owner,
        price=PRICE,
        input_tokens=tokens,
        output_tokens=tokens,
        cost=PRICE.cost(tokens, tokens),
        outcome="ok",
        started_at_ms=1_700_000_000_000,
        finished_at_ms=1_700_000_000_100,
        contributors=tuple(Contributor(a, bps, "data") for a, bps in contributors),
        pool=pool,
        fee_bps=fee_bps,
    )


def ingest(database_url: str, events: list[UsageEvent]) -> None:
    writer = BatchWriter(database_url)
    try:
        writer.write(assemble([parse_event(e.to_fields()) for e in events]))
    finally:
        writer.close()
