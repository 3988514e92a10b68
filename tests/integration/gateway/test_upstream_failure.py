"""A failing model: the circuit opens and retries stay within the 10 % retry budget; a model that
refuses connections is waited for (``gateway_connect_retry_s``), never metered while it refuses."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import redis
from aiohttp import web

from openledger.gateway.records import AgentKeys
from openledger.local.processes import free_port
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    provision_agent,
    route_model,
    usage_events,
)


async def _run_against_failing_upstream(
    gateway_url: str, key: str, port: int, requests: int
) -> tuple[int, Counter[int]]:
    """Serve 503 (as a KServe server whose model is down) and count what reaches it."""
    hits = 0

    async def predict(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"error": "Model with name iris is not ready."}, status=503)

    app = web.Application()
    app.router.add_post("/v1/models/{name}", predict)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    codes: Counter[int] = Counter()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            sem = asyncio.Semaphore(8)

            async def one() -> None:
                async with (
                    sem,
                    session.post(f"{gateway_url}/v1/models/iris:predict", json={"instances": [IRIS_ROW]}) as resp,
                ):
                    await resp.read()
                    codes[resp.status] += 1

            await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        await runner.cleanup()
    return hits, codes


def test_failing_model_opens_the_circuit_and_attempts_stay_within_1_1x_requests(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str
) -> None:
    gateway = start_gateway(breaker_failures="5", breaker_cooldown_s="30")
    key = provision_agent(rds, namespace)
    port = free_port()
    route_model(rds, namespace, "iris", f"http://127.0.0.1:{port}")
    hits, codes = asyncio.run(_run_against_failing_upstream(gateway.url, key, port, 300))
    assert sum(codes.values()) == 300
    assert hits <= 1.1 * 300
    assert codes[503] >= 250  # most are refused by the open circuit without reaching the model
    assert hits < 40, hits  # the model saw a handful, not a storm
    assert gateway.metric("openledger_gateway_circuit_state", model=f"{namespace}/iris") == 2
    attempts = gateway.metric("openledger_gateway_upstream_attempts_total", model=f"{namespace}/iris")
    assert attempts == hits
    # Requests that reached the model are metered (cost 0); circuit-open ones are not.
    events = usage_events(rds, gateway.stream, f"{namespace}/agent")
    assert all(e["outcome"] == "upstream_error" and e["cost"] == "0" for e in events)
    assert 0 < len(events) <= hits  # one per client request that reached it, retries included in one
    keys = AgentKeys(f"{namespace}/agent")
    assert rds.zcard(keys.inflight) == 0 and int(rds.hget(keys.reserved, "_total") or 0) == 0


def test_unreachable_model_is_502_then_circuit_open_and_never_metered(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str
) -> None:
    gateway = start_gateway(breaker_failures="3", breaker_cooldown_s="30", connect_retry_s="0.5")
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", f"http://127.0.0.1:{free_port()}")  # nothing listens there

    async def run() -> list[tuple[int, dict[str, object], float]]:
        out = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            for _ in range(10):
                started = time.monotonic()
                async with session.post(f"{gateway.url}/v1/models/iris:predict", json={"instances": [IRIS_ROW]}) as r:
                    out.append((r.status, await r.json(), time.monotonic() - started))
        return out

    results = asyncio.run(run())
    assert [s for s, _, _ in results[:3]] == [502, 502, 502]
    assert all(took >= 0.375 for _, _, took in results[:3]), results  # each waited out the connect window
    assert all(s == 503 and b["error"].endswith("circuit open") for s, b, _ in results[3:])
    assert usage_events(rds, gateway.stream, f"{namespace}/agent") == []
    # 0.5 s holds connects at 0, 25, 75, 175 and 375 ms: five per request, then the circuit opens.
    refused = gateway.metric("openledger_gateway_upstream_attempts_total", model=f"{namespace}/iris")
    assert 3 <= refused <= 3 * 5, refused


def test_a_model_that_starts_listening_within_the_connect_window_answers_and_is_metered_once(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str
) -> None:
    """As after Ready or a rollout, before kube-proxy sends the Service's traffic to the new pod: the
    request waits for the model instead of failing, and only the answer that reached it is metered."""
    gateway = start_gateway(breaker_failures="3", connect_retry_s="5")
    key = provision_agent(rds, namespace)
    port = free_port()
    route_model(rds, namespace, "iris", f"http://127.0.0.1:{port}")

    async def predict(request: web.Request) -> web.Response:
        return web.json_response({"predictions": [1]})

    async def run() -> tuple[int, object, float]:
        app = web.Application()
        app.router.add_post("/v1/models/{name}", predict)
        runner = web.AppRunner(app)
        await runner.setup()

        async def listen_later() -> None:
            await asyncio.sleep(1.0)
            await web.TCPSite(runner, "127.0.0.1", port).start()

        started = time.monotonic()
        later = asyncio.create_task(listen_later())
        try:
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
                session.post(f"{gateway.url}/v1/models/iris:predict", json={"instances": [IRIS_ROW]}) as r,
            ):
                return r.status, await r.json(), time.monotonic() - started
        finally:
            await later
            await runner.cleanup()

    status, body, took = asyncio.run(run())
    assert (status, body) == (200, {"predictions": [1]}), body
    assert took >= 1.0, took
    model = f"{namespace}/iris"
    assert gateway.metric("openledger_gateway_upstream_attempts_total", model=model, result="ok") == 1
    assert gateway.metric("openledger_gateway_upstream_attempts_total", model=model, result="refused") >= 2
    assert gateway.metric("openledger_gateway_circuit_state", model=model) == 0  # refusals within a call: no failure
    events = usage_events(rds, gateway.stream, f"{namespace}/agent")
    assert [(e["outcome"], e["cost"]) for e in events] == [("ok", str(10**15))]


def test_upstream_timeout_is_504_and_metered_as_timeout(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str, model_servers: ModelServers
) -> None:
    gateway = start_gateway(upstream_timeout_s="0.3")
    key = provision_agent(rds, namespace)
    port = free_port()
    route_model(rds, namespace, "iris", f"http://127.0.0.1:{port}")

    async def run() -> tuple[int, dict[str, object]]:
        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(2)
            return web.json_response({"predictions": [0]})

        app = web.Application()
        app.router.add_post("/v1/models/{name}", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            url = f"{gateway.url}/v1/models/iris:predict"
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
                session.post(url, json={"instances": [IRIS_ROW]}) as r,
            ):
                return r.status, await r.json()
        finally:
            await runner.cleanup()

    status, body = asyncio.run(run())
    assert status == 504 and "did not answer" in str(body["error"])
    events = usage_events(rds, gateway.stream, f"{namespace}/agent")
    assert [(e["outcome"], e["cost"]) for e in events] == [("timeout", "0")]
