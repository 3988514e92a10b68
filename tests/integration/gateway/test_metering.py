"""Exactly one usage event per served request, across graceful and hard gateway restarts."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import redis

from openledger.wire import PoolBinding, Price, UsageEvent
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    provision_agent,
    route_model,
    usage_events,
)


async def _load(gateway: GatewayProcess, key: str, bad_key: str, stop: asyncio.Event) -> tuple[list[str], Counter[str]]:
    served: list[str] = []
    outcomes: Counter[str] = Counter()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            i = 0
            while not stop.is_set():
                i += 1
                # Every 5th request uses a wrong key: refused, never metered.
                k = bad_key if i % 5 == 0 else key
                try:
                    async with session.post(
                        f"{gateway.url}/v1/models/iris:predict",
                        json={"instances": [IRIS_ROW]},
                        headers={"Authorization": f"Bearer {k}"},
                    ) as resp:
                        await resp.read()
                        outcomes[str(resp.status)] += 1
                        if resp.status == 200:
                            served.append(resp.headers["x-openledger-event-id"])
                except (aiohttp.ClientError, TimeoutError):
                    outcomes["connection_error"] += 1
                    await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(client(n)) for n in range(6)]
    await asyncio.gather(*tasks)
    return served, outcomes


def test_exactly_one_usage_event_per_served_request_across_gateway_restarts(
    start_gateway: Callable[..., GatewayProcess], model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    gateway = start_gateway()
    key = provision_agent(rds, namespace)
    price = Price(per_request=10**15, per_input_token=10**12, per_output_token=2 * 10**12)
    route_model(rds, namespace, "iris", model_servers.iris_url, price=price, pool=PoolBinding("pools/p", 500))

    async def scenario() -> tuple[list[str], Counter[str]]:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(gateway, key, "olk_bad", stop))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(gateway.stop, signal.SIGTERM)  # graceful: in-flight requests finish
        await asyncio.to_thread(gateway.start)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(gateway.stop, signal.SIGKILL)  # hard: in-flight requests are lost
        await asyncio.to_thread(gateway.start)
        await asyncio.sleep(1.5)
        stop.set()
        return await load

    served, outcomes = asyncio.run(scenario())
    time.sleep(0.2)
    events = usage_events(rds, gateway.stream, f"{namespace}/agent")
    ids = [e["id"] for e in events]
    assert len(served) > 50 and outcomes["401"] > 0, outcomes
    assert len(ids) == len(set(ids)), "an event id was written twice"
    assert len(served) == len(set(served))
    missing = set(served) - set(ids)
    assert not missing, f"{len(missing)} served requests have no usage event"
    # Only requests cut off by the SIGKILL (at most one per client) may have an event without a response.
    assert len(ids) - len(served) <= 6
    for fields in events:
        event = UsageEvent.from_fields(fields)  # the ledger's parser accepts every one
        assert event.outcome == "ok" and event.cost == price.cost(1, 1)
        assert event.pool == "pools/p" and event.fee_bps == 500 and event.payer.startswith("0x")
