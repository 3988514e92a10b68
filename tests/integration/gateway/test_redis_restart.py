"""Redis going away: the gateway answers 503 with Retry-After (never serves unmetered), then recovers.

Uses a private Redis (not the session's shared one, which other tests keep state in).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from openledger.local.processes import ManagedProcess, free_port, spawn, wait_ready
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
    usage_events,
    wait_for,
)


class PrivateRedis:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.process: ManagedProcess | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = spawn("redis-private", argv, self.log_dir / "redis.log", detached=False)
        wait_ready(self.process, lambda: bool(redis.Redis(port=self.port).ping()), 20)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_down_is_503_and_the_gateway_reconnects_after_a_restart(
    private_redis: PrivateRedis,
    start_gateway: Callable[..., GatewayProcess],
    model_servers: ModelServers,
    namespace: str,
) -> None:
    gateway = start_gateway(redis=private_redis.url)
    rds = redis.Redis.from_url(private_redis.url)
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    url = f"{gateway.url}/v1/models/iris:predict"
    assert post(url, {"instances": [IRIS_ROW]}, key)[0] == 200

    private_redis.stop()
    status, headers, body = post(url, {"instances": [IRIS_ROW]}, key)
    assert status == 503 and headers["retry-after"] == "1" and "unavailable" in body["error"]
    private_redis.start()

    # This Redis keeps no data across restarts (like the local platform's): the operator rewrites the records.
    rds = redis.Redis.from_url(private_redis.url)
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    wait_for(lambda: post(url, {"instances": [IRIS_ROW]}, key)[0] == 200, 10, "the gateway to reconnect")
    assert len(usage_events(rds, gateway.stream, f"{namespace}/agent")) == 1
    rds.close()
