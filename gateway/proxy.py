"""Calling the model: one upstream client whatever the scheme, a circuit breaker per Model, a retry budget,
and a bounded wait for a model that refuses connections (``gateway_connect_retry_s``).

``http://`` upstreams (in-cluster InferenceService URLs) go through the small keep-alive
pool (``upstream.py``); ``https://`` through aiohttp. Either way a call returns an
``Upstream``: whether the model saw the request decides whether it is metered.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from openledger.gateway import metrics as m
from openledger.gateway.breaker import BreakerConfig, BreakerState, CircuitBreaker
from openledger.gateway.protocols import Route, upstream_path
from openledger.gateway.retry import RetryBudget, backoff_s, connect_pause_s
from openledger.gateway.streaming import ModelStream, SessionStream
from openledger.gateway.upstream import UpstreamBroken, UpstreamPool, UpstreamRefused
from openledger.settings import Settings
from openledger.wire import ModelRoute

_RETRYABLE_STATUS = frozenset({502, 503})
MAX_ATTEMPTS = 3


@dataclass
class Upstream:
    status: int
    body: bytes
    content_type: bytes
    reached: bool  # the model saw the request (an HTTP answer, a timeout, a dropped connection)
    outcome: str  # ok | upstream_error | timeout
    upstream_s: float
    stream: ModelStream | None = None  # an open event stream (``stream: true`` answered with SSE)


def _refused() -> Upstream:
    return Upstream(502, b"", b"application/json", False, "upstream_error", 0.0)


def _broken() -> Upstream:
    return Upstream(502, b"", b"application/json", True, "upstream_error", 0.0)


def _timed_out() -> Upstream:
    return Upstream(504, b"", b"application/json", True, "timeout", 0.0)


class Proxy:
    """The gateway's client of model servers (one per process; ``start``/``close`` with the app)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout_s = settings.gateway_upstream_timeout_s
        self.connect_retry_s = settings.gateway_connect_retry_s
        self.retry_budget = RetryBudget(ratio=settings.gateway_retry_ratio)
        self.breaker_config = BreakerConfig(settings.gateway_breaker_failures, settings.gateway_breaker_cooldown_s)
        self.breakers: dict[str, CircuitBreaker] = {}
        self.session: aiohttp.ClientSession | None = None  # https:// upstreams only
        self.pool = UpstreamPool(max_connections=settings.gateway_upstream_connections)

    def start(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.gateway_upstream_connections, keepalive_timeout=30, ttl_dns_cache=300
            )
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        self.pool.close()

    def breaker(self, model_ref: str) -> CircuitBreaker:
        breaker = self.breakers.get(model_ref)
        if breaker is None:
            breaker = self.breakers[model_ref] = CircuitBreaker(self.breaker_config)
            m.CIRCUIT_STATE.labels(model_ref).set(int(breaker.state))  # a series from the first request on
        return breaker

    async def call(
        self, route: Route, model_ref: str, model_route: ModelRoute, raw: bytes, breaker: CircuitBreaker, stream: bool
    ) -> Upstream:
        """Call the model (retrying per the breaker and the retry budget); ``stream``: open its event stream."""
        assert self.session is not None, "gateway not started"
        url = model_route.url.rstrip("/") + upstream_path(route, model_ref.split("/", 1)[1])
        self.retry_budget.deposit()
        started = time.monotonic()
        deadline = started + self.timeout_s
        connect_until = started + min(self.connect_retry_s, self.timeout_s)
        attempt = refused = 0
        while True:
            t0 = time.perf_counter()
            timeout_s = max(0.001, deadline - time.monotonic())
            if stream:
                result = await self._attempt_stream(url, raw, timeout_s)
            else:
                result = await self._attempt(url, raw, timeout_s)
            result.upstream_s = time.perf_counter() - t0
            failed = not result.reached or result.outcome == "timeout" or result.status >= 500
            m.child(m.UPSTREAM_ATTEMPTS, model_ref, _attempt_result(result)).inc()
            if not failed:
                breaker.record_success()
                return result
            if not result.reached and time.monotonic() + (pause := connect_pause_s(refused)) < connect_until:
                refused += 1  # no endpoint took it: wait for one (the breaker hears the call's verdict only)
                await asyncio.sleep(pause)
                continue
            breaker.record_failure(time.monotonic())
            retryable = not result.reached or result.status in _RETRYABLE_STATUS
            attempt += 1
            if not (retryable and attempt < MAX_ATTEMPTS and breaker.state is BreakerState.CLOSED):
                return result
            if not self.retry_budget.try_withdraw():
                return result
            pause = backoff_s(attempt - 1)
            if time.monotonic() + pause >= deadline:
                return result
            await asyncio.sleep(pause)

    async def _attempt(self, url: str, raw: bytes, timeout_s: float) -> Upstream:
        if url.startswith("http://"):
            return await self._attempt_pool(url, raw, timeout_s)
        assert self.session is not None
        try:
            async with self.session.post(
                url,
                data=raw,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                body = await resp.read()
                ctype = resp.headers.get("Content-Type", "application/json").encode()
                outcome = "ok" if resp.status < 400 else "upstream_error"
                return Upstream(resp.status, body, ctype, True, outcome, 0.0)
        except aiohttp.ClientConnectorError:
            return _refused()
        except TimeoutError:
            return _timed_out()
        except aiohttp.ClientError:
            return _broken()

    async def _attempt_stream(self, url: str, raw: bytes, timeout_s: float) -> Upstream:
        """Open the model's stream; an answer that is not an event stream is read whole (errors, JSON)."""
        opened: ModelStream
        try:
            if url.startswith("http://"):
                base, path = _split(url)
                opened = await self.pool.open_stream(base, path, raw, timeout_s)
            else:
                assert self.session is not None
                deadline = asyncio.get_running_loop().time() + timeout_s
                response = await self.session.post(
                    url,
                    data=raw,
                    headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                )
                opened = SessionStream(response, deadline)
        except (UpstreamRefused, aiohttp.ClientConnectorError):
            return _refused()
        except TimeoutError:
            return _timed_out()
        except (UpstreamBroken, aiohttp.ClientError):
            return _broken()
        if opened.status == 200 and opened.content_type.startswith(b"text/event-stream"):
            return Upstream(200, b"", opened.content_type, True, "ok", 0.0, opened)
        return await _read_whole(opened)

    async def _attempt_pool(self, url: str, raw: bytes, timeout_s: float) -> Upstream:
        """Plain http:// upstreams (in-cluster InferenceService URLs): the small keep-alive pool."""
        base, path = _split(url)
        try:
            status, body, ctype = await self.pool.post(base, path, raw, timeout_s)
        except UpstreamRefused:
            return _refused()
        except TimeoutError:
            return _timed_out()
        except UpstreamBroken:
            return _broken()
        return Upstream(status, body, ctype, True, "ok" if status < 400 else "upstream_error", 0.0)


def _split(url: str) -> tuple[str, str]:
    """``http://host:port/path`` → (``http://host:port``, ``/path``)."""
    slash = url.find("/", 7)
    return (url[:slash], url[slash:]) if slash > 0 else (url, "/")


async def _read_whole(stream: ModelStream) -> Upstream:
    """Read a non-streamed answer to the end (errors, or a model that ignored ``stream``)."""
    chunks: list[bytes] = []
    try:
        while chunk := await stream.read():
            chunks.append(chunk)
    except TimeoutError:
        return _timed_out()
    except UpstreamBroken:
        return _broken()
    finally:
        stream.close()
    status = stream.status
    outcome = "ok" if status < 400 else "upstream_error"
    return Upstream(status, b"".join(chunks), stream.content_type, True, outcome, 0.0)


def _attempt_result(result: Upstream) -> str:
    if not result.reached:
        return "refused"
    if result.outcome == "timeout":
        return "timeout"
    return "error" if result.status >= 500 else "ok"
