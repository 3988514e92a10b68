"""The bounded queue: a saturated Agent queues requests up to maxDepth for at most maxWaitSeconds."""

from __future__ import annotations

import threading
import time

import redis

from openledger.gateway.records import AgentKeys
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
)


def _occupy_slot(rds: redis.Redis, ref: str) -> str:
    """Take the Agent's only concurrency slot as another gateway replica's in-flight request would."""
    keys = AgentKeys(ref)
    rds.zadd(keys.inflight, {"other-replica-request": (time.time() + 3600) * 1e6})
    rds.hset(keys.reserved, "other-replica-request", 0)
    return "other-replica-request"


def _free_slot(rds: redis.Redis, ref: str, request_id: str) -> None:
    keys = AgentKeys(ref)
    rds.zrem(keys.inflight, request_id)
    rds.hdel(keys.reserved, request_id)


def test_queue_timeout_answers_429_with_retry_after(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, max_concurrency=1, queue_max_depth=5, queue_max_wait_ms=1000)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    _occupy_slot(rds, f"{namespace}/agent")
    started = time.monotonic()
    status, headers, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)
    waited = time.monotonic() - started
    assert status == 429 and body["error"].startswith("queued") and headers["retry-after"] == "1"
    assert 0.9 <= waited < 3.0
    assert rds.xlen(AgentKeys(f"{namespace}/agent").queue) == 0  # the waiter left the queue


def test_queue_full_answers_429_at_once_and_a_queued_request_is_served_when_a_slot_frees(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    ref = f"{namespace}/agent"
    key = provision_agent(rds, namespace, max_concurrency=1, queue_max_depth=1, queue_max_wait_ms=10000)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    slot = _occupy_slot(rds, ref)
    url = f"{shared_gateway.url}/v1/models/iris:predict"
    results: list[int] = []
    waiter = threading.Thread(target=lambda: results.append(post(url, {"instances": [IRIS_ROW]}, key, 15)[0]))
    waiter.start()
    deadline = time.monotonic() + 5
    while rds.xlen(AgentKeys(ref).queue) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rds.xlen(AgentKeys(ref).queue) == 1
    started = time.monotonic()
    status, headers, body = post(url, {"instances": [IRIS_ROW]}, key)
    assert status == 429 and body["error"].startswith("queue is full") and "retry-after" in headers
    assert time.monotonic() - started < 0.5
    _free_slot(rds, ref, slot)
    waiter.join(10)
    assert results == [200]
    assert int(rds.hget(AgentKeys(ref).stats, "queue_full") or 0) == 1
