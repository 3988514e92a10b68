"""Rate limits (GCRA, requests and tokens) and Hard budgets under concurrency, end to end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import redis

from openledger.gateway.records import AgentKeys
from openledger.wire import Price
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
    usage_events,
)


async def _hammer(
    url: str, key: str, body: dict[str, object], clients: int, duration_s: float
) -> tuple[Counter[int], float]:
    codes: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {key}"}
    start = time.monotonic()
    first_ok: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() - start < duration_s:
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                codes[resp.status] += 1
                if resp.status == 200 and not first_ok:
                    first_ok.append(time.monotonic())
                if resp.status == 429:
                    await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return codes, time.monotonic() - (first_ok[0] if first_ok else start)


def test_request_limiter_holds_the_configured_rate_within_2_percent_over_30_s(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    rate, burst = 40, 10
    key = provision_agent(rds, namespace, rps=rate, burst=burst)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    url = f"{shared_gateway.url}/v1/models/iris:predict"
    codes, elapsed = asyncio.run(_hammer(url, key, {"instances": [IRIS_ROW]}, clients=3, duration_s=30))
    assert set(codes) <= {200, 429}, codes
    sustained = (codes[200] - burst) / elapsed
    assert abs(sustained - rate) / rate <= 0.02, (codes, elapsed, sustained)
    assert codes[429] > 0
    assert int(rds.hget(AgentKeys(f"{namespace}/agent").stats, "rate_limited") or 0) == codes[429]
    assert (
        shared_gateway.metric("openledger_gateway_limiter_rejections_total", agent=f"{namespace}/agent") == codes[429]
    )


def test_token_limit_refuses_with_retry_after_and_too_large_requests_with_413(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    # 120 tokens a minute (2 a second): each request is charged its estimate (~24) up
    # front and corrected to the model's reported usage after the call.
    key = provision_agent(rds, namespace, tpm=120)
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    url = f"{shared_gateway.url}/v1/completions"
    body = {"model": "llm", "prompt": "the agent", "max_tokens": 20}
    statuses = [post(url, body, key) for _ in range(30)]
    codes = [s for s, _, _ in statuses]
    assert 4 <= codes.count(200) <= 25 and 429 in codes, codes
    events = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    used = sum(int(e["input_tokens"]) + int(e["output_tokens"]) for e in events)
    assert used <= 120 + 24 + 2 * 5  # the burst, one estimate of slack, and what accrued meanwhile
    status, headers, err = next(r for r in statuses if r[0] == 429)
    assert err["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
    status, _, err = post(url, {**body, "max_tokens": 5000}, key)
    assert status == 413 and err["error"]["code"] == "too_many_tokens"
    assert all(e["outcome"] == "ok" for e in usage_events(rds, shared_gateway.stream, f"{namespace}/agent"))


async def _spend(url: str, key: str, clients: int, per_client: int) -> Counter[int]:
    codes: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {key}"}

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(per_client):
            async with session.post(url, json={"instances": [IRIS_ROW]}, headers=headers) as resp:
                await resp.read()
                codes[resp.status] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return codes


def test_hard_budget_is_never_exceeded_under_50_concurrent_clients(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    # 0.3 per request + 0.1 per instance + 0.05 per prediction = 0.45 a request; budget 10.
    price = Price(per_request=3 * 10**17, per_input_token=10**17, per_output_token=5 * 10**16)
    key = provision_agent(rds, namespace, budget="10", enforcement="Hard")
    route_model(rds, namespace, "iris", model_servers.iris_url, price=price)
    codes = asyncio.run(_spend(f"{shared_gateway.url}/v1/models/iris:predict", key, clients=50, per_client=3))
    assert set(codes) <= {200, 402}, codes
    events = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    spent = sum(int(e["cost"]) for e in events)
    assert spent <= 10 * 10**18
    assert codes[200] == len(events) == 22  # floor(10 / 0.45): every unit of budget is usable, none more
    keys = AgentKeys(f"{namespace}/agent")
    assert rds.zcard(keys.inflight) == 0 and int(rds.hget(keys.reserved, "_total") or 0) == 0
    status, headers, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)
    assert status == 402 and "exhausted" in body["error"] and int(headers["retry-after"]) >= 1


def test_soft_budget_serves_past_the_amount(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, budget="1", enforcement="Soft")
    route_model(rds, namespace, "iris", model_servers.iris_url, price=Price(per_request=6 * 10**17))
    codes = [post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)[0] for _ in range(3)]
    assert codes == [200, 200, 200]
