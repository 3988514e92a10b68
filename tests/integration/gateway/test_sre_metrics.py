"""The gateway metrics the alerts, dashboards and autoscalers use move with real requests.

``openledger_gateway_inflight_requests`` counts a stream until it ends (and never leaks when the
client hangs up), ``openledger_gateway_budget_store_up`` follows Redis going away and coming back,
``openledger_gateway_budget_limit_base_units`` carries the Agent's budget and its enforcement.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import redis

from openledger.money import to_base_units
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
)
from tests.integration.gateway.sse_upstream import SseUpstream
from tests.integration.gateway.test_redis_restart import PrivateRedis
from tests.integration.gateway.test_streaming import CHAT, PRICE, Sse
from tests.waiting import wait_for

INFLIGHT = "openledger_gateway_inflight_requests"
STORE_UP = "openledger_gateway_budget_store_up"
LIMIT = "openledger_gateway_budget_limit_base_units"


@pytest.fixture
def upstream() -> Iterator[SseUpstream]:
    server = SseUpstream()
    yield server
    server.close()


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def test_a_stream_is_in_flight_until_it_ends_and_a_hang_up_does_not_leak_it(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    model = f"{namespace}/llm"
    upstream.words, upstream.delay_s = 100, 0.1  # 10 s: still streaming when the second one ends
    sse = Sse(shared_gateway.url, {**CHAT, "stream": True}, key)
    events = sse.events()
    json.loads(next(events))
    assert shared_gateway.metric(INFLIGHT, model=model) == 1
    upstream.words = 3
    second = Sse(shared_gateway.url, {**CHAT, "stream": True}, key)
    next(second.events())
    assert shared_gateway.metric(INFLIGHT, model=model) == 2
    for _ in second.events():  # read to the end: [DONE]
        pass
    wait_for(lambda: shared_gateway.metric(INFLIGHT, model=model) == 1, 5, "the finished stream to leave")
    sse.hang_up()
    assert upstream.cancelled.wait(5), "the model's request was not cancelled"
    wait_for(lambda: shared_gateway.metric(INFLIGHT, model=model) == 0, 5, "the abandoned stream to leave")


def test_budget_store_up_follows_redis_going_away_and_coming_back(
    private_redis: PrivateRedis,
    start_gateway: Callable[..., GatewayProcess],
    model_servers: ModelServers,
    namespace: str,
) -> None:
    gateway = start_gateway(redis=private_redis.url)
    url = f"{gateway.url}/v1/models/iris:predict"
    rds = redis.Redis.from_url(private_redis.url)
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
    assert gateway.metric(STORE_UP) == 1

    private_redis.stop()
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 503
    assert gateway.metric(STORE_UP) == 0

    private_redis.start()
    rds = redis.Redis.from_url(private_redis.url)
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    wait_for(lambda: post(url, {"instances": [IRIS_ROW]}, key)[0] == 200, 10, "the gateway to reconnect")
    assert gateway.metric(STORE_UP) == 1
    assert gateway.metric(INFLIGHT, model=f"{namespace}/iris") == 0  # answered, refused or failed: none left
    rds.close()


def test_budget_limit_carries_the_agents_budget_and_enforcement(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, model_servers: ModelServers
) -> None:
    agent = f"{namespace}/agent"
    url = f"{shared_gateway.url}/v1/models/iris:predict"
    route_model(rds, namespace, "iris", model_servers.iris_url)
    key = provision_agent(rds, namespace, budget="5", enforcement="Hard")
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
    assert shared_gateway.metric(LIMIT, agent=agent, enforcement="Hard") == to_base_units("5")
    remaining = shared_gateway.metric("openledger_gateway_budget_remaining_base_units", agent=agent)
    assert 0 < remaining < to_base_units("5")

    key = provision_agent(rds, namespace, budget="7", enforcement="Soft")  # the Agent's spec edited
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
    assert shared_gateway.metric(LIMIT, agent=agent, enforcement="Soft") == to_base_units("7")
    assert f'agent="{agent}",enforcement="Hard"' not in _scrape(shared_gateway)

    key = provision_agent(rds, namespace)  # no budget at all: no limit series
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200
    assert f'{LIMIT}{{agent="{agent}"' not in _scrape(shared_gateway)


def _scrape(gateway: GatewayProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=2) as resp:
        return str(resp.read().decode())
