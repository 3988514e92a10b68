"""The Agent controller's spend rebuild against real Redis and PostgreSQL (in this process).

An Agent's spend record (``AgentKeys.spend``) is rebuilt from the ledger plus the stream's
events the ledger has not ingested yet; a settle during the rebuild makes it scan again;
without PostgreSQL the record stays absent (the gateway answers 503, never an open budget).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from openledger.controllers import agent
from openledger.gateway.records import AgentConfig, AgentKeys, apikey_key, period_bounds_s, period_id
from openledger.local.processes import free_port
from openledger.settings import get_settings
from openledger.wire import UsageEvent
from tests.integration.ledger.conftest import LedgerEnv, ThreadWorker, make_event

BUDGET = 10**30


def config_for(ref: str, period: str = "Day", budget: int | None = BUDGET) -> AgentConfig:
    return AgentConfig(
        ref=ref,
        account="0x" + "cd" * 20,
        models=("m",),
        budget_base_units=budget,
        budget_period=period,
        key_hash="h" * 64,
        version=1,
    )


def event(ref: str, i: int, finished_at_ms: int | None = None) -> UsageEvent:
    finished = finished_at_ms or int(time.time() * 1000)
    return make_event(i, agent=ref, started_at_ms=finished - 20, finished_at_ms=finished, outcome="ok")


@pytest.fixture
def ref() -> str:
    return f"ns-{secrets.token_hex(4)}/agent"


@pytest.fixture
async def controller(ledger_env: LedgerEnv, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[aioredis.Redis]:
    """The Agent controller's module state pointed at this test's Redis, database and stream."""
    monkeypatch.setenv("OPENLEDGER_DATABASE_URL", ledger_env.database_url)
    monkeypatch.setenv("OPENLEDGER_USAGE_STREAM", ledger_env.stream)
    get_settings.cache_clear()
    client = aioredis.Redis.from_url(ledger_env.redis_url)
    monkeypatch.setitem(agent._state, "redis", client)
    monkeypatch.setattr(agent, "_database_retry_at", 0.0)
    yield client
    await client.aclose()
    get_settings.cache_clear()


@pytest.fixture
def ingest(ledger_env: LedgerEnv) -> Iterator[Callable[[int], None]]:
    def run(expected_events: int) -> None:
        worker = ThreadWorker(ledger_env.config())
        try:
            ledger_env.wait_for(lambda: ledger_env.count() == expected_events, 30, f"{expected_events} events")
        finally:
            worker.close()

    yield run


async def spend_record(r: aioredis.Redis, ref: str) -> dict[str, str]:
    raw = await r.hgetall(AgentKeys(ref).spend)
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_spend_is_the_ledgers_plus_the_streams_uningested_events_of_this_period(
    controller: aioredis.Redis, ledger_env: LedgerEnv, ingest: Callable[[int], None], ref: str
) -> None:
    config = config_for(ref)
    await controller.hset(AgentKeys(ref).config, mapping=config.to_fields())  # type: ignore[arg-type]
    start_s, _ = period_bounds_s("Day", time.time())
    ingested = [event(ref, 1), event(ref, 2)]
    yesterday = event(ref, 3, finished_at_ms=start_s * 1000 - 1)  # the previous period: not counted
    other_agent = event("ns/other", 4)
    ledger_env.produce([*ingested, yesterday, other_agent])
    ingest(4)
    # Not ingested yet, one in each wire format.
    pending = [event(ref, 5), event(ref, 6)]
    ledger_env.produce([pending[0], pending[1].to_fields()])
    assert all(e.cost > 0 for e in [*ingested, *pending])

    assert await agent.rebuild_spend(config) == ""
    expected = sum(e.cost for e in [*ingested, *pending])
    assert await spend_record(controller, ref) == {"period": period_id("Day", time.time()), "spent": str(expected)}

    # It exists now: a second rebuild leaves it alone (the gateway owns it from here).
    await controller.hset(AgentKeys(ref).spend, "spent", str(expected + 1))
    assert await agent.rebuild_spend(config) == ""
    assert (await spend_record(controller, ref))["spent"] == str(expected + 1)


async def test_a_request_settled_during_the_rebuild_makes_it_scan_again(
    controller: aioredis.Redis, ledger_env: LedgerEnv, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    config = config_for(ref)
    await controller.hset(AgentKeys(ref).config, mapping=config.to_fields())  # type: ignore[arg-type]
    first = event(ref, 1)
    ledger_env.produce([first])
    late = event(ref, 2)
    real = agent.read_ledger_spend
    calls: list[int] = []

    def settle_meanwhile(*args: Any) -> Any:
        if not calls:  # what the gateway's settle does while the spend record is absent
            ledger_env.redis.xadd(ledger_env.stream, late.to_entry())  # type: ignore[arg-type]
            ledger_env.redis.incr(AgentKeys(ref).spend_gen)
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(agent, "read_ledger_spend", settle_meanwhile)
    assert await agent.rebuild_spend(config) == ""
    assert len(calls) == 2
    assert (await spend_record(controller, ref))["spent"] == str(first.cost + late.cost)


async def test_without_postgresql_the_spend_stays_unknown(
    controller: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    monkeypatch.setenv("OPENLEDGER_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    get_settings.cache_clear()
    config = config_for(ref)
    await controller.hset(AgentKeys(ref).config, mapping=config.to_fields())  # type: ignore[arg-type]
    problem = await agent.rebuild_spend(config)
    assert "PostgreSQL unavailable" in problem and not await controller.exists(AgentKeys(ref).spend)
    usage, reported = await agent._ensure_spend(config)
    assert usage.spent_base_units is None and "PostgreSQL" in reported


async def test_a_new_budget_period_kind_drops_the_record_and_the_rebuild_counts_the_new_period(
    controller: aioredis.Redis, ledger_env: LedgerEnv, ref: str
) -> None:
    day = config_for(ref, "Day")
    version = await agent.write_config(day, None)
    assert await agent.rebuild_spend(day) == ""
    assert (await spend_record(controller, ref))["period"] == period_id("Day", time.time())
    hour = config_for(ref, "Hour")
    await agent.write_config(hour, AgentConfig.from_fields({**day.to_fields(), "version": str(version)}))
    assert not await controller.exists(AgentKeys(ref).spend)
    ledger_env.produce([now := event(ref, 1)])
    assert await agent.rebuild_spend(hour) == ""
    assert await spend_record(controller, ref) == {"period": period_id("Hour", time.time()), "spent": str(now.cost)}


async def test_revocation_ends_access_and_leaves_in_flight_reservations_to_expire(
    controller: aioredis.Redis, ref: str
) -> None:
    keys = AgentKeys(ref)
    config = config_for(ref)
    await agent.write_config(config, None)
    await controller.hset(keys.spend, mapping={"period": "x", "spent": "5"})
    request = str(uuid.uuid4())
    await controller.zadd(keys.inflight, {request: (time.time() + 60) * 1e6})
    await controller.hset(keys.reserved, mapping={request: str(10**40), "_total": str(10**40)})
    await agent.revoke(ref)
    assert not await controller.exists(apikey_key(config.key_hash), keys.config, keys.queue)
    assert await controller.zscore(keys.inflight, request)
    assert await controller.hget(keys.reserved, "_total") == str(10**40).encode()
    ttl_ms = agent.revoked_in_flight_ttl_ms()
    assert 60_000 < ttl_ms < 600_000  # minutes: outlives a request, never lingers
    for key in (*keys.in_flight_keys(), keys.spend):  # the spend record takes the late settles
        assert 0 < await controller.pttl(key) <= ttl_ms
    # The same Agent created again: its records are permanent again (its live slots included).
    await agent.write_config(config, None)
    for key in (*keys.in_flight_keys(), keys.spend):
        assert await controller.pttl(key) == -1


async def test_a_rebuild_for_a_config_no_longer_in_redis_writes_nothing(
    controller: aioredis.Redis, ledger_env: LedgerEnv, ref: str
) -> None:
    await agent.write_config(config_for(ref, "Day"), None)
    stale = config_for(ref, "Hour")  # what a rebuild started before the spec changed to Day
    assert "config changed" in await agent.rebuild_spend(stale)
    assert not await controller.exists(AgentKeys(ref).spend)
