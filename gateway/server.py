"""``openledger gateway``: run the ASGI gateway on uvicorn (uvloop + httptools).

On SIGTERM uvicorn stops accepting and waits ``graceful_shutdown_s`` for requests
in flight, longer than any admitted request can take (``lifetimes.py``), so a
rollout never cuts a completion off unmetered. The chart's preStop sleep and
terminationGracePeriodSeconds are sized around it.
"""

from __future__ import annotations

import logging
import math
import os

import click

from openledger.gateway.lifetimes import shutdown_timeout_s
from openledger.settings import Settings, get_settings

log = logging.getLogger(__name__)


def graceful_shutdown_s(settings: Settings) -> float:
    """The setting when given, else derived from the timeouts (always longer than the upstream timeout)."""
    if settings.gateway_shutdown_timeout_s is not None:
        return settings.gateway_shutdown_timeout_s
    wait_s = settings.gateway_durability_timeout_ms / 1000
    return shutdown_timeout_s(settings.gateway_upstream_timeout_s, settings.gateway_redis_timeout_s, wait_s)


def run(host: str, port: int, metrics_port: int | None, cpu: int | None = None) -> None:
    import uvicorn

    from openledger.gateway.app import Gateway
    from openledger.metrics import start_metrics_server

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    settings = get_settings()
    if metrics_port:
        start_metrics_server(metrics_port, host)
    app = Gateway(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_config=None,
        backlog=4096,
        timeout_graceful_shutdown=math.ceil(graceful_shutdown_s(settings)),
    )
    log.info("gateway listening", extra={"action": "start", "port": port, "usage_stream": settings.usage_stream})
    uvicorn.Server(config).run()


@click.command("gateway")
@click.option("--host", default=None, help="Bind address (default: settings bind_host).")
@click.option("--port", type=int, default=None, help="HTTP port (default: OPENLEDGER_GATEWAY_PORT).")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Prometheus port (default: OPENLEDGER_GATEWAY_METRICS_PORT; 0 = off).",
)
@click.option("--cpu", type=int, default=None, help="Pin the process to this CPU (benchmarks).")
def gateway_command(host: str | None, port: int | None, metrics_port: int | None, cpu: int | None) -> None:
    """The inference gateway: auth, limits, budget, queue, proxy and metering."""
    settings = get_settings()
    run(
        host or settings.bind_host,
        port or settings.gateway_port,
        settings.gateway_metrics_port if metrics_port is None else metrics_port,
        cpu,
    )
