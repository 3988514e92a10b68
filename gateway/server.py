"""``openledger gateway``: run the ASGI gateway on uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging
import os

import click

from openledger.settings import get_settings

log = logging.getLogger(__name__)


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
        timeout_graceful_shutdown=30,
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
