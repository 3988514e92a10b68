"""Fixtures for the gateway tests: real Redis, real kserve model servers (the
local stand-in's ``ModelServer`` with an iris classifier and a bigram text
model), and real gateway processes.

Isolation on the shared Redis: every test provisions its own Agent in its own
namespace (``gw-<random>``), and each gateway process writes usage events to
its own stream (``OPENLEDGER_USAGE_STREAM``).
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from openledger.gateway.records import AgentConfig, AgentKeys, apikey_key, hash_api_key, period_id
from openledger.local.processes import ManagedProcess, free_port, spawn, stop_pid, wait_ready
from openledger.local.standin import serve_argv
from openledger.money import to_base_units
from openledger.wire import (
    USAGE_STREAM,
    ModelRoute,
    PoolBinding,
    Price,
    model_pool_key,
    model_route_key,
    usage_values,
)
from tests.waiting import wait_for  # noqa: F401 - re-exported to the tests

OWNER = "0x" + "ab" * 20
PAYER = "0x" + "cd" * 20


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


@dataclass
class ModelServers:
    iris_url: str  # V1 and V2, model name "iris"
    llm_url: str  # OpenAI paths, model name "llm"


@pytest.fixture(scope="session")
def model_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServers]:
    logs = tmp_path_factory.mktemp("model-servers")
    procs: list[ManagedProcess] = []
    ports = {"iris": free_port(), "llm": free_port()}
    for name, kind in (("iris", "v1"), ("llm", "openai")):
        procs.append(spawn(f"model-{name}", serve_argv(name, kind, ports[name]), logs / f"{name}.log", detached=False))
    try:
        for proc, name in zip(procs, ("iris", "llm"), strict=True):
            wait_ready(proc, lambda n=name: http_ok(f"http://127.0.0.1:{ports[n]}/v1/models/{n}"), 90)
        yield ModelServers(f"http://127.0.0.1:{ports['iris']}", f"http://127.0.0.1:{ports['llm']}")
    finally:
        for proc in procs:
            proc.stop(10)


@dataclass
class GatewayProcess:
    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    stream: str = field(default_factory=lambda: f"{USAGE_STREAM}:test:{secrets.token_hex(4)}")
    process: ManagedProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        argv = [
            sys.executable,
            "-m",
            "openledger.cli",
            "gateway",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        env = {**self.env, "OPENLEDGER_USAGE_STREAM": self.stream}
        self.process = spawn("gateway", argv, self.log_dir / f"gateway-{self.starts}.log", detached=False, env=env)
        wait_ready(self.process, lambda: http_ok(f"{self.url}/healthz"), 60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop_pid(self.process.pid, sig, 30)
            self.process = None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` matching ``labels`` on the gateway's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def start_gateway(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(redis: str | None = None, **settings: str) -> GatewayProcess:
        env = {"REDIS_URL": redis or redis_url, "OPENLEDGER_LOG_LEVEL": "WARNING"}
        env.update({f"OPENLEDGER_GATEWAY_{k.upper()}": v for k, v in settings.items()})
        gw = GatewayProcess(env, tmp_path)
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def shared_gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway for the tests that need no special settings (fast)."""
    gw = GatewayProcess({"REDIS_URL": redis_url, "OPENLEDGER_LOG_LEVEL": "WARNING"}, tmp_path_factory.mktemp("gw"))
    gw.start()
    yield gw
    gw.stop()


def redis_server(name: str, log_dir: Path, *extra: str, binary: Path | None = None) -> tuple[ManagedProcess, int]:
    """A private redis-server (for tests that flush, stop or replicate it); returns it and its port.

    ``binary``: another server speaking the protocol (valkey-server); ``extra`` overrides the defaults.
    """
    port = free_port()
    binary = binary or Path(shutil.which("redis-server") or "/usr/bin/redis-server")
    data = log_dir / name  # a replica writes the primary's snapshot here
    data.mkdir(exist_ok=True)
    server = str(binary)
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data)]
    process = spawn(name, [*argv, *extra], log_dir / f"{name}.log", detached=False)
    wait_ready(process, lambda: bool(redis.Redis(port=port).ping()), 20)
    return process, port


@pytest.fixture
def private_redis_port(tmp_path: Path) -> Iterator[int]:
    process, port = redis_server("redis-private", tmp_path)
    yield port
    process.stop(10)


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return f"gw-{secrets.token_hex(4)}"


def provision_agent(
    r: redis.Redis,
    namespace: str,
    name: str = "agent",
    models: tuple[str, ...] = ("iris", "llm"),
    *,
    rps: float = 10000,
    burst: int = 10000,
    tpm: int = 10**9,
    max_concurrency: int = 1000,
    budget: str | None = None,
    enforcement: str = "Hard",
    queue_max_depth: int = 100,
    queue_max_wait_ms: int = 5000,
) -> str:
    """Write an Agent's config as the controller would; returns its API key."""
    key = "olk_" + secrets.token_urlsafe(24)
    amount = to_base_units(budget) if budget is not None else None
    config = AgentConfig(
        ref=f"{namespace}/{name}",
        account=PAYER,
        models=models,
        requests_per_second=rps,
        burst=burst,
        tokens_per_minute=tpm,
        max_concurrency=max_concurrency,
        budget_base_units=amount,
        budget_enforcement=enforcement,
        queue_max_depth=queue_max_depth,
        queue_max_wait_ms=queue_max_wait_ms,
        key_hash=hash_api_key(key),
        version=1,
    )
    keys = AgentKeys(config.ref)
    r.hset(keys.config, mapping=config.to_fields())  # type: ignore[arg-type]
    if amount is not None:  # the operator creates the spend record once it knows the period's spend
        r.hset(keys.spend, mapping={"period": period_id(config.budget_period, time.time()), "spent": "0"})
    r.set(apikey_key(config.key_hash), config.ref)
    return key


def route_model(
    r: redis.Redis,
    namespace: str,
    name: str,
    url: str,
    protocol: str = "v1",
    price: Price | None = None,
    pool: PoolBinding | None = None,
) -> ModelRoute:
    route = ModelRoute(
        model=f"{namespace}/{name}",
        url=url,
        protocol=protocol,
        price=price or Price(per_request=10**15),
        owner=OWNER,
        generation=1,
    )
    r.set(model_route_key(namespace, name), route.to_json())
    if pool is not None:
        r.set(model_pool_key(namespace, name), pool.to_json())
    return route


def usage_events(r: redis.Redis, stream: str, agent: str | None = None) -> list[dict[str, str]]:
    events = []
    for _, fields in r.xrange(stream, "-", "+"):
        decoded = usage_values(fields)
        if agent is None or decoded["agent"] == agent:
            events.append(decoded)
    return events


def post(
    url: str, body: Any, key: str | None = None, timeout_s: float = 10, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
